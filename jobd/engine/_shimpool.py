"""A few exec shims started ahead of need, so that a job's start does not wait ~10 ms for a
Python interpreter to boot. Imports only the standard library and trio.

Each idle shim (`_shim.py`) already runs in its own session with fresh stdout/stderr pipes
and stdin on /dev/null, and blocks reading its spec from a control pipe; it has joined no
cgroup, dropped nothing and exec'd nothing yet, so until a job is handed to it, it is only
an idle child of the server. `take()` hands one out (or spawns one at once when the pool is
empty); `run()`, a task of the job manager's nursery, refills the pool and kills the idle
shims when it ends. A shim whose server dies reads EOF on its control pipe and exits.

    pool = ShimPool(size=4)
    await nursery.start(pool.run)
    shim = await pool.take()
    await shim.hand({"procs": [...], "uid": 65534, "gid": 65534, "cwd": "/", "argv": [...],
                     "env": {...}})
    report = await shim.verdict()      # b"" once the command is executing
"""

from __future__ import annotations

import collections
import fcntl
import logging
import marshal
import os
import subprocess
import sys
from collections.abc import Mapping

import trio

from . import _shim

# How many shims wait for a job. Refilling costs the server one fork+exec (~1 ms); the
# interpreter then boots in the child, off the server's CPU time.
POOL_SIZE = 4
# After a failed refill (out of fds or processes), try again this often.
REFILL_RETRY = 1.0
log = logging.getLogger(__name__)
# The job's stdout and stderr pipes hold this much before the job blocks (Linux default
# 64 KiB): fewer wake-ups for the pump, which reads up to as much at a time.
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Shim:
    """One started shim, waiting for its job: the process (its pid is the job's main pid
    once it execs) and our ends of its control and status pipes."""

    def __init__(self, proc: trio.Process, control: int, status: int) -> None:
        self.proc = proc
        self._control: int | None = control
        self._status: int | None = status

    async def hand(self, spec: Mapping[str, object]) -> None:
        """Send the job's spec; the shim joins the cgroup, drops privileges and execs."""
        control, self._control = self._control, None
        assert control is not None
        async with trio.lowlevel.FdStream(control) as stream:
            # marshal, not json: the shim then need not import json (and re) to read it.
            await stream.send_all(marshal.dumps(dict(spec)))

    async def verdict(self) -> bytes:
        """The shim's failure report, or b"" once the exec succeeded (the status pipe is
        close-on-exec in the shim, so success is a bare EOF)."""
        status, self._status = self._status, None
        assert status is not None
        report = b""
        async with trio.lowlevel.FdStream(status) as stream:
            while chunk := await stream.receive_some(4096):
                report += chunk
        return report

    def close_fds(self) -> None:
        for fd in (self._control, self._status):
            if fd is not None:
                os.close(fd)
        self._control = self._status = None

    async def discard(self) -> None:
        """Kill and reap an idle shim (it holds nothing but its pipes). Shield the caller."""
        self.close_fds()  # EOF on its control pipe: an idle shim exits by itself
        self.proc.kill()
        await self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                await pipe.aclose()


async def spawn_shim() -> Shim:
    control_r, control_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-S", _shim.__file__, str(control_r), str(status_w)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(control_r, status_w),
            start_new_session=True,  # own session and process group
            env={},  # the job's environment comes with its spec
            cwd="/",
        )
    except BaseException:
        os.close(control_w)
        os.close(status_r)
        raise
    finally:
        os.close(control_r)
        os.close(status_w)
    for pipe in (proc.stdout, proc.stderr):
        try:
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[union-attr]
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works too
    return Shim(proc, control_w, status_r)


class ShimPool:
    """Idle shims ready for `take()`; `run()` keeps `size` of them."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self._size = size
        self._idle: collections.deque[Shim] = collections.deque()
        self._taken = trio.Event()

    async def take(self) -> Shim:
        if self._idle:
            shim = self._idle.popleft()
            self._taken.set()
            return shim
        return await spawn_shim()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refill until cancelled; then kill every idle shim."""
        task_status.started()
        try:
            failing = False
            while True:
                try:
                    while len(self._idle) < self._size:
                        self._idle.append(await spawn_shim())
                except OSError as exc:
                    # EMFILE, EAGAIN, ENOMEM: a Start meanwhile spawns its own shim and gets
                    # RESOURCE_EXHAUSTED if that fails too; never end the manager for it.
                    if not failing:
                        log.warning("cannot refill the shim pool (%s); retrying", exc)
                    failing = True
                    await trio.sleep(REFILL_RETRY)
                    continue
                failing = False
                self._taken = trio.Event()
                await self._taken.wait()
        finally:
            with trio.CancelScope(shield=True):
                while self._idle:
                    await self._idle.popleft().discard()
