"""The server's side of the zygote (`_shim.py --zygote`): one pre-booted, single-threaded shim
that forks a new shim per request in ~1 ms instead of an interpreter boot (~16 ms of CPU on
the Start's path, back to back or concurrent). Imports only the standard library and trio.

The zygote clones each shim with CLONE_PARENT, so the shim is the server's own child, as a
booted one is: `ForkedProcess` waits for it through a pidfd and reads its exact wait status
with waitpid, signals it through the pidfd; nothing of a job depends on the zygote staying
alive. The server makes the shim's four pipes and sends the zygote the child's ends
(SCM_RIGHTS over a SOCK_SEQPACKET unix socket); the zygote answers the pid.

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


class Zygote:
    """A running zygote: `fork()` one shim at a time. Create with `start_zygote`."""

    def __init__(self, proc: trio.Process, sock: trio.socket.SocketType) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = trio.Lock()
        self.forks = 0  # shims forked (tests, statistics)

    async def fork(self, fds: Sequence[int]) -> int:
        """Fork a shim with `fds` (its stdout and stderr write ends, control read end,
        status write end; the caller keeps and closes its copies); its pid. Raises
        ZygoteGone when the zygote has died or does not answer, OSError when the fork failed
        (EAGAIN, ENOMEM: as a boot would)."""
        assert len(fds) == _shim.ZYGOTE_FDS
        fd_array = array.array("i", fds)
        async with self._lock:
            # Shielded and bounded: a request cut between the send and the answer would
            # leave the next caller reading this one's pid.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FORK_TIMEOUT
                try:
                    await self._sock.sendmsg(
                        [b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array)]
                    )
                    answer = await self._sock.recv(8)
                except (OSError, trio.ClosedResourceError) as exc:
                    self._lost()
                    raise ZygoteGone(f"the zygote's socket failed: {exc}") from exc
            if scope.cancelled_caught or len(answer) != 4:
                self._lost()
                raise ZygoteGone("the zygote died" if not scope.cancelled_caught
                                 else f"the zygote did not answer within {FORK_TIMEOUT:.0f} s")
        pid = int.from_bytes(answer, sys.byteorder, signed=True)
        if pid <= 0:
            err = -pid or 22
            raise OSError(err, os.strerror(err), "fork (zygote)")
        self.forks += 1
        return pid

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
