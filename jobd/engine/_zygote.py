"""The server's side of the zygote (`_shim.py --zygote`): one pre-booted, single-threaded shim
that forks a new shim per request in ~1 ms instead of an interpreter boot (~16 ms of CPU on
the Start's path, back to back or concurrent). Imports only the standard library and trio.

The zygote clones each shim with CLONE_PARENT, so the shim is the server's own child, as a
booted one is: `ForkedProcess` waits for it through a pidfd and reads its exact wait status
with waitpid, signals it through the pidfd; nothing of a job depends on the zygote staying
alive. The server makes the shim's four pipes and sends the zygote the child's ends
(SCM_RIGHTS over a SOCK_SEQPACKET unix socket); the zygote answers the pid. Forks asked for
while an exchange is under way go together in the next one (a burst of Starts with an empty
pool: 46 forks in 2 exchanges instead of 46).

    zygote = await start_zygote()            # spawned with trio's process API
    pid = await zygote.fork([stdout_w, stderr_w, control_r, status_w])
    proc = ForkedProcess(pid, stdout_r, stderr_r)
    await zygote.aclose()                    # also: it exits on EOF when the server dies
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import trio

from . import _shim

# Bound on one exchange with the zygote (a fork takes ~1 ms); past it the zygote is hung
# and is killed (the shims fall back to a boot of their own).
FORK_TIMEOUT = 10.0


class ZygoteGone(Exception):
    """The zygote died or hung: boot the shim instead."""


class ForkedProcess:
    """A shim the zygote forked as the server's child: what the job manager uses of
    `trio.Process` (pid, returncode, wait, send_signal, kill, its pipes as trio streams)."""

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        # Our unreaped child: its pid cannot be reused, so this is the process we forked.
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # EMFILE: the caller sees it; the shim is not left a zombie
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        self.returncode: int | None = None
        self.stdin: trio.abc.SendStream | None = None  # a job with stdin boots its shim
        self.stdout: trio.abc.ReceiveStream | None = trio.lowlevel.FdStream(stdout)
        self.stderr: trio.abc.ReceiveStream | None = trio.lowlevel.FdStream(stderr)
        self._wait_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ForkedProcess {self.pid}: returncode {self.returncode}>"

    async def wait(self) -> int:
        """Its exit code, or -N for signal N, once it has ended (like `trio.Process.wait`)."""
        async with self._wait_lock:
            if self.returncode is None:
                assert self._pidfd is not None
                await trio.lowlevel.wait_readable(self._pidfd)  # readable: it has exited
                self._reap()
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._set_status(status)
        return self.returncode

    def _reap(self) -> None:
        _pid, status = os.waitpid(self.pid, 0)  # it has exited: does not block
        self._set_status(status)

    def _set_status(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def send_signal(self, sig: int) -> None:
        """Signal it through its pidfd (never another process that took its pid)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class _Request:
    """One shim's fork, waiting to be sent in the next exchange with the zygote."""

    __slots__ = ("fds", "taken", "done", "pid", "error")

    def __init__(self, fds: Sequence[int]) -> None:
        self.fds = fds
        self.taken = False  # in an exchange (sent, or being sent): its answer will come
        self.done = trio.Event()
        self.pid = 0
        self.error: BaseException | None = None


class Zygote:
    """A running zygote: `fork()` shims. Create with `start_zygote`. Forks asked for while an
    exchange is under way go together in the next one (up to `_shim.ZYGOTE_BATCH`): a burst
    of Starts with an empty pool waits for a few exchanges, not one per shim."""

    def __init__(self, proc: trio.Process, sock: trio.socket.SocketType) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = trio.Lock()
        self._pending: list[_Request] = []
        self.forks = 0  # shims forked (tests, statistics)
        self.exchanges = 0  # requests sent (tests, statistics)

    async def fork(self, fds: Sequence[int]) -> int:
        """Fork a shim with `fds` (its stdout and stderr write ends, control read end,
        status write end; the caller keeps and closes its copies); its pid. Raises
        ZygoteGone when the zygote has died or does not answer, OSError when the fork failed
        (EAGAIN, ENOMEM: as a boot would)."""
        assert len(fds) == _shim.ZYGOTE_FDS
        request = _Request(fds)
        self._pending.append(request)
        try:
            async with self._lock:
                if not request.taken:  # else an earlier caller's exchange carried it
                    await self._exchange()
        except trio.Cancelled:
            if not request.taken:  # cancelled before it was sent: nothing was forked
                self._pending.remove(request)
                raise
            # Sent in another caller's exchange: its shim must not be lost, so its pid is
            # returned (the cancellation comes at the caller's next checkpoint, whose cleanup
            # kills the shim); that exchange is shielded and bounded.
            with trio.CancelScope(shield=True):
                await request.done.wait()
        except BaseException:
            if not request.taken:
                self._pending.remove(request)
            raise
        assert request.done.is_set()
        if request.error is not None:
            raise request.error
        return request.pid

    async def _exchange(self) -> None:
        """Send every pending fork (up to ZYGOTE_BATCH) in one request; read their pids."""
        batch = self._pending[:_shim.ZYGOTE_BATCH]
        del self._pending[:_shim.ZYGOTE_BATCH]
        for request in batch:
            request.taken = True
        try:
            await self._send(batch)
        finally:
            for request in batch:  # never left waiting, whatever happened
                if not request.done.is_set():
                    request.error = request.error or ZygoteGone("the exchange failed")
                    request.done.set()

    async def _send(self, batch: list[_Request]) -> None:
        fd_array = array.array("i", [fd for request in batch for fd in request.fds])
        error: BaseException | None = None
        answer = b""
        # Shielded and bounded: a request cut between the send and the answer would leave
        # the next exchange reading this one's pids.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FORK_TIMEOUT
            try:
                await self._sock.sendmsg(
                    [b"F" * len(batch)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array)]
                )
                answer = await self._sock.recv(4 * _shim.ZYGOTE_BATCH)
            except (OSError, trio.ClosedResourceError) as exc:
                self._lost()
                error = ZygoteGone(f"the zygote's socket failed: {exc}")
        if error is None and (scope.cancelled_caught or len(answer) != 4 * len(batch)):
            self._lost()
            error = ZygoteGone("the zygote died" if not scope.cancelled_caught
                               else f"the zygote did not answer within {FORK_TIMEOUT:.0f} s")
        self.exchanges += 1
        for i, request in enumerate(batch):
            if error is not None:
                request.error = ZygoteGone(str(error))  # one each: raised in its own task
            else:
                pid = int.from_bytes(answer[4 * i:4 * i + 4], sys.byteorder, signed=True)
                if pid <= 0:
                    err = -pid or 22
                    request.error = OSError(err, os.strerror(err), "fork (zygote)")
                else:
                    request.pid = pid
                    self.forks += 1
            request.done.set()

    def _lost(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    async def aclose(self) -> None:
        """EOF on its socket (it exits by itself), kill, reap. Shield the caller. Waits for
        a fork under way (bounded by FORK_TIMEOUT), so that its shim is not lost."""
        async with self._lock:
            self._sock.close()
        self._lost()
        await self.proc.wait()


async def start_zygote() -> Zygote:
    """Spawn the zygote (trio's process API, in the caller's nursery's lifetime: the caller
    owns it) and wait until it has booted. Raises OSError or ZygoteGone when it cannot."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:  # Linux < 5.3: a forked shim could not be waited on
        raise ZygoteGone(f"no pidfd_open on this host ({exc})") from None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-S", _shim.__file__, "--zygote", str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
            env={},
            cwd="/",
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    zygote = Zygote(proc, trio.socket.from_stdlib_socket(ours))
    ready = None
    try:
        with trio.move_on_after(FORK_TIMEOUT):  # a boot takes 20-200 ms; never wait forever
            ready = await zygote._sock.recv(1)
    except BaseException:
        with trio.CancelScope(shield=True):
            await zygote.aclose()
        raise
    if ready != b"R":
        with trio.CancelScope(shield=True):
            await zygote.aclose()
        if ready is None:
            raise ZygoteGone(f"the zygote did not boot within {FORK_TIMEOUT:.0f} s")
        raise ZygoteGone(f"the zygote exited as it booted (status {proc.returncode})")
    return zygote
