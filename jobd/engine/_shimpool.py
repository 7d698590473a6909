"""A few exec shims started ahead of need, each already inside a spare cgroup leaf, so that
a job's start waits neither ~10 ms for a Python interpreter to boot nor for its first
`cgroup.procs` write (after an idle spell the kernel makes that write wait for an RCU grace
period, 6-15 ms here). Imports only the standard library, trio and the engine's `_cgroup`.

Each idle shim (`_shim.py`) already runs in its own session with fresh stdout/stderr pipes
and stdin on /dev/null, has done its preparation (the namespaces and mounts no job decides,
`_sandbox.py`) and blocks reading its spec from a control pipe. Given a `leaf` factory, each
pooled shim also has a spare leaf of its own, created empty (no limits) and already joined
by the process that becomes the job (PID 1 of its namespace, or the shim itself without
namespaces); cgroup v2 cannot rename a leaf, so a spare is named with the id the job that
takes it will get. It has dropped nothing and exec'd nothing yet, so until a job is handed
to it, it is only an idle child of the server. `take()` hands one out (None when the pool is
empty: the caller gets a new one with `new_shim()`, which joins at once); `run()`, a task of
the job manager's nursery, refills the pool whenever no Start is under way (`starting()`; at
once when it is down to its last shim) and, when it ends, kills the idle shims and removes
their spare leaves. The pool holds POOL_SIZE shims, or as many as the last burst of Starts
that ran it dry (up to POOL_MAX) until POOL_SHRINK seconds pass without one. A shim whose
server dies reads EOF on its control pipe and exits; its spare leaf, like every leaf a dead
server left, is reaped at the next start-up.

New shims are forked by the zygote (`_zygote.py`: one pre-booted shim, ~1 ms a fork instead
of an interpreter's boot, ~16 ms of CPU), which `run()` keeps running; a forked shim is the
server's own child, as a booted one. A job with stdin, and every shim while the zygote is
down (it died, or cannot start; said once in the log, restarted ZYGOTE_RESTART later), is
booted by `spawn_shim`.

    pool = ShimPool(sandbox.prep, size=4, leaf=lambda: tree.leaf(str(uuid.uuid4())))
    await nursery.start(pool.run)
    shim = pool.take() or await pool.new_shim()
    # shim.leaf: its spare leaf, joined (set its limits now), or None (create the job's leaf)
    await shim.hand({"procs": [...], "uid": 65534, "gid": 65534, "cwd": "/", "argv": [...],
                     "env": {...}, "sandbox": sandbox.job_plan(network)})
    report = await shim.verdict()      # b"" once the command is executing
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import marshal
import math
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import trio
from trio_util import AsyncValue

from . import _shim, _zygote
from ._cgroup import JobCgroup
from ._errors import CgroupError
from ._types import Limits

# How many shims wait for a job. A refill costs one fork of the zygote (~1 ms; a boot, when
# the zygote is down, ~16 ms of CPU on a 2-core host, competing with the server).
POOL_SIZE = 4
# A burst of Starts that ran the pool dry grows it to the burst's size (the Starts under way
# then), up to POOL_MAX: the next burst of that size finds its shims waiting. Each idle shim
# and its PID 1 cost ~1.4 MiB Pss, two pids, five of the server's fds and a leaf in each
# hierarchy (so POOL_MAX is lowered to a twentieth of the fd limit: a grown pool never takes
# more than a quarter of it); after POOL_SHRINK seconds with no Start finding the pool empty,
# the pool is back to POOL_SIZE.
POOL_MAX = 64
POOL_SHRINK = 300.0
# A refill asks the zygote for up to this many shims at once (one exchange for all).
REFILL_BATCH = 8
# With more than one idle shim left, a refill waits until this long after the last Start
# ended: its first step (the spare leaf's mkdirs, the fork request: 1-8 ms of the event
# loop) would otherwise run before the Start's answer is written (trio wakes the refill
# and the writer in the same batch, the writer's TLS send takes two steps).
REFILL_DELAY = 0.01
# After a failed refill (out of fds or processes), try again this often.
REFILL_RETRY = 1.0
# Bound on killing an idle shim and removing its spare leaf at shutdown.
DISCARD_TIMEOUT = 10.0
# After the zygote died (or could not start), start a new one this much later (doubled
# after each failure to start, up to ZYGOTE_RESTART_MAX); meanwhile shims boot one each.
ZYGOTE_RESTART = 1.0
ZYGOTE_RESTART_MAX = 300.0
log = logging.getLogger(__name__)
# The job's stdout and stderr pipes hold this much before the job blocks (Linux default
# 64 KiB): fewer wake-ups for the pump, which reads up to as much at a time.
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# A shim's process: booted (`spawn_shim`) or forked by the zygote (`fork_shim`); either way
# the server's own child.
ShimProcess = trio.Process | _zygote.ForkedProcess


class Shim:
    """One started shim, waiting for its job: the process (its pid is the job's main pid
    once it execs) and our ends of its control and status pipes."""

    def __init__(
        self, proc: ShimProcess, control: int, status: int, leaf: JobCgroup | None = None
    ) -> None:
        self.proc = proc
        self._control: int | None = control
        self._status: int | None = status
        self.leaf = leaf  # its spare leaf, joined ahead (pooled shims only)

    async def hand(self, spec: Mapping[str, object], *, go: bool = True) -> None:
        """Send the job's spec (length-prefixed): the shim reads it and prepares the call, then
        waits for `go` (sent too with go=True), upon which it joins the cgroup, drops
        privileges and execs. Written at once, no checkpoint, when it fits the pipe (a spec
        does, but for a huge environment); else the rest waits for room."""
        control = self._control
        assert control is not None
        # marshal, not json: the shim then need not import json (and re) to read it.
        message = marshal.dumps(dict(spec))
        os.set_blocking(control, False)
        await _write_all(control, len(message).to_bytes(4, "little") + message)
        if go:
            await self.go()

    async def go(self) -> None:
        """The job may run now (its record and output exist): one byte, and the control pipe
        is closed. No checkpoint when the pipe has room for it (it has, but behind a spec the
        shim has not read yet that filled it)."""
        control, self._control = self._control, None
        assert control is not None
        try:
            await _write_all(control, b"G")
        finally:
            os.close(control)

    async def verdict(self) -> bytes:
        """The shim's failure report, or b"" once the exec succeeded (the status pipe is
        close-on-exec in the shim, so success is a bare EOF). Read straight from the pipe
        (no FdStream: its checkpoints before each read and at its close were three passes of
        the scheduler on a Start's path, each running whatever else was ready)."""
        status, self._status = self._status, None
        assert status is not None
        report = b""
        try:
            os.set_blocking(status, False)
            while True:
                try:
                    chunk = os.read(status, 4096)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(status)
                    continue
                if not chunk:
                    return report
                report += chunk
        finally:
            os.close(status)

    def close_fds(self) -> None:
        for fd in (self._control, self._status):
            if fd is not None:
                os.close(fd)
        self._control = self._status = None

    async def discard(self) -> None:
        """Kill and reap an idle shim (it holds nothing but its pipes and its spare leaf, which
        is emptied and removed). Shield the caller."""
        self.close_fds()  # EOF on its control pipe: an idle shim exits by itself
        self.proc.kill()
        if self.leaf is not None:
            self.leaf.signal_all(signal.SIGKILL)  # its PID 1 too (it would follow by itself)
        await self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                await pipe.aclose()
        if self.leaf is not None:
            await self.leaf.wait_empty(joining=True)  # it may have been killed mid-join
            self.leaf.remove()


async def spawn_shim(
    prep: Mapping[str, object] | None = None, *, stdin: bool = False, leaf: JobCgroup | None = None,
    limits: Limits = Limits(),  # noqa: B008  (frozen)
) -> Shim:
    """A new shim, told its preparation at once (length-prefixed; it fits the pipe). With
    stdin, its stdin (the job's) is a pipe whose write end is `proc.stdin`, else /dev/null.
    Pooled shims have /dev/null: a job with stdin takes a new one (a fd cannot be handed
    through the spec pipe, and this keeps the pool unchanged). With `leaf` (not yet created),
    the leaf is created with `limits` (none by default) and the shim joins it while idle."""
    async with _spare_leaf(prep, leaf, limits) as joining:
        return await _spawn(joining, stdin, leaf)


@contextlib.asynccontextmanager
async def _spare_leaf(
    prep: Mapping[str, object] | None, leaf: JobCgroup | None, limits: Limits
) -> AsyncIterator[dict[str, object]]:
    """The shim's preparation, joining `leaf` (created here with `limits`: the job's own
    are written when a job takes it, if they differ) while idle; the leaf is removed if the
    shim is not made. The mkdirs run in a worker thread: they take the kernel's cgroup
    mutex, which the shims joining their leaves hold for RCU grace periods (`_cgroup.py`,
    "What blocks")."""
    joining = dict(prep or {})
    if leaf is not None:
        await trio.to_thread.run_sync(leaf.create, limits)
        joining["join"] = leaf.procs_files
    try:
        yield joining
    except BaseException:
        if leaf is not None:
            leaf.remove()
        raise


async def _spawn(prep: dict[str, object], stdin: bool, leaf: JobCgroup | None) -> Shim:
    message = marshal.dumps(prep)
    message = len(message).to_bytes(4, "little") + message
    control_r, control_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-S", _shim.__file__, str(control_r), str(status_w)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
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
    os.write(control_w, message)  # a few hundred bytes: fits the empty pipe, never blocks
    for pipe in (proc.stdout, proc.stderr):
        _enlarge(pipe.fileno())  # type: ignore[union-attr]
    return Shim(proc, control_w, status_r, leaf)


async def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the non-blocking pipe `fd`, waiting only while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


def _enlarge(pipe: int) -> None:
    try:
        fcntl.fcntl(pipe, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default size works too


async def fork_shim(
    zygote: _zygote.Zygote, prep: Mapping[str, object] | None = None, *,
    leaf: JobCgroup | None = None, limits: Limits = Limits(),  # noqa: B008  (frozen)
) -> Shim:
    """`spawn_shim` without stdin, forked by the zygote: the same shim, its stdin /dev/null,
    its preparation told at once, joining `leaf` (created now, with `limits`) while idle.
    Raises `_zygote.ZygoteGone` when the zygote is gone (then spawn one)."""
    async with _spare_leaf(prep, leaf, limits) as joining:
        return await _fork(zygote, joining, leaf)


async def _fork(zygote: _zygote.Zygote, prep: dict[str, object], leaf: JobCgroup | None) -> Shim:
    message = marshal.dumps(prep)
    message = len(message).to_bytes(4, "little") + message
    ours: list[int] = []
    theirs: list[int] = []
    try:
        for _ in range(_shim.ZYGOTE_FDS):  # stdout, stderr, control, status
            r, w = os.pipe()
            ours.append(r)
            theirs.append(w)
        # The shim writes stdout, stderr, status; it reads control.
        theirs[2], ours[2] = ours[2], theirs[2]
        try:
            pid = await zygote.fork(theirs)
        finally:
            for fd in theirs:
                os.close(fd)
            theirs = []
        stdout, stderr, control, status = ours
        for pipe in (stdout, stderr):
            _enlarge(pipe)
        proc = _zygote.ForkedProcess(pid, stdout, stderr)
    except BaseException:
        for fd in ours + theirs:
            os.close(fd)
        raise
    os.write(control, message)  # a few hundred bytes: fits the empty pipe, never blocks
    return Shim(proc, control, status, leaf)


class ShimPool:
    """Idle shims ready for `take()`; `run()` keeps `size` of them, each in a spare leaf of
    its own when given a `leaf` factory (a new, not yet created leaf per call)."""

    def __init__(
        self,
        prep: Mapping[str, object] | None = None,
        size: int = POOL_SIZE,
        *,
        leaf: Callable[[], JobCgroup] | None = None,
        max_size: int | None = None,
        spare_limits: Limits = Limits(),  # noqa: B008  (frozen)
    ) -> None:
        self._prep = prep
        # A spare leaf's limits while its shim is idle: those of a job that asks for none
        # (written then at Start only if the job's differ), or none.
        self._spare_limits = spare_limits
        self._size = size
        if max_size is None:  # its idle shims' fds (5 each) at most a quarter of the limit
            max_size = min(POOL_MAX, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 20)
        self._max = max(size, max_size)
        self._target = size  # grown by Starts that found it empty, back to size when idle
        self._missed_at = -math.inf  # when a Start last found it empty
        self._leaf = leaf
        self._idle: collections.deque[Shim] = collections.deque()
        self._taken = trio.Event()
        self.idle_count = AsyncValue(0)  # len(idle shims), to wait on (`wait_value(size)`)
        self._starts = 0  # Starts under way (`starting()`)
        self._quiet_at = -math.inf  # REFILL_DELAY after the last Start ended (trio time)
        self._stirred = trio.Event()  # set (and replaced) when a Start ends or takes a shim
        # The zygote while one runs (`run()` owns it), else None: shims are booted.
        self.zygote: AsyncValue[_zygote.Zygote | None] = AsyncValue(None)
        self._zygote_lost = trio.Event()

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around a Start: while more than one idle shim is left, the pool refills only once
        no Start is under way (and REFILL_DELAY after the last one ended). A refill's spawn
        (a thread for the fork, the GIL) and its interpreter's boot (~16 ms of CPU) would
        otherwise compete with the Start itself
        (150 ms apart through the server, alternated: p50 26.2/26.4/25.8 ms refilling at
        once, 22.2/19.7/21.4 after). A pool down to its last shim refills at once: under a
        stream of Starts it would otherwise run dry, and each Start then waits for a whole
        interpreter boot of its own."""
        self._starts += 1
        try:
            yield
        finally:
            self._starts -= 1
            self._quiet_at = trio.current_time() + REFILL_DELAY
            self._stir()

    def _stir(self) -> None:
        self._stirred.set()
        self._stirred = trio.Event()

    async def _wait_to_refill(self) -> None:
        """While more than one idle shim is left: until no Start is under way and none
        ended in the last REFILL_DELAY (its answer is written first)."""
        while len(self._idle) > 1:
            if self._starts:
                await self._stirred.wait()
            elif trio.current_time() < self._quiet_at:
                with trio.move_on_at(self._quiet_at):
                    await self._stirred.wait()  # (or a Start began or took a shim)
            else:
                return

    @property
    def target(self) -> int:
        """How many idle shims the pool refills to now (`size` .. `max_size`)."""
        return self._target

    def take(self) -> Shim | None:
        """An idle shim, or None when the pool is empty (the caller makes one with
        `new_shim()`, and the pool grows to the number of Starts under way)."""
        if not self._idle:
            # As many as the Starts under way (each took one or makes its own): the burst
            # that ran the pool dry, which the next one of that size then finds waiting.
            self._target = min(self._max, max(self._target, self._starts))
            self._missed_at = trio.current_time()
            self._taken.set()
            return None
        shim = self._idle.popleft()
        self.idle_count.value = len(self._idle)
        self._taken.set()
        self._stir()
        return shim

    async def new_shim(self, *, stdin: bool = False, leaf: JobCgroup | None = None) -> Shim:
        """A new shim (see `spawn_shim`): forked by the zygote when it runs, else (a job with
        stdin, no zygote) booted. A `leaf` gets the pool's spare limits."""
        zygote = self.zygote.value
        limits = self._spare_limits if leaf is not None else Limits()
        if zygote is not None and not stdin:
            try:
                return await fork_shim(zygote, self._prep, leaf=leaf, limits=limits)
            except _zygote.ZygoteGone as exc:
                if self.zygote.value is zygote:
                    log.warning("%s; shims boot an interpreter each until it is restarted",
                                exc)
                    self.zygote.value = None
                    self._zygote_lost.set()
        return await spawn_shim(self._prep, stdin=stdin, leaf=leaf, limits=limits)

    async def _run_zygote(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep a zygote running (started once it has booted, or once it could not start):
        when it dies, shims are booted until a new one has started."""
        started, failing = False, False
        delay = ZYGOTE_RESTART
        while True:
            try:
                zygote: _zygote.Zygote | None = await _zygote.start_zygote()
            except (OSError, _zygote.ZygoteGone) as exc:
                if not failing:  # said once, not at every retry
                    log.warning("cannot start the zygote (%s); shims boot an interpreter each "
                                "until it starts", exc)
                failing, zygote = True, None
            if zygote is not None:
                if failing:
                    log.info("the zygote started: shims are forked again")
                failing, delay = False, ZYGOTE_RESTART
                self._zygote_lost = trio.Event()
                self.zygote.value = zygote
            if not started:
                started = True
                task_status.started()
            if zygote is not None:
                try:
                    async with trio.open_nursery() as watch:
                        watch.start_soon(self._zygote_died, zygote, watch.cancel_scope)
                        await self._zygote_lost.wait()  # it hung or its socket failed
                        watch.cancel_scope.cancel()
                finally:
                    if self.zygote.value is zygote:
                        self.zygote.value = None
                    with trio.CancelScope(shield=True):
                        await zygote.aclose()
            await trio.sleep(delay if failing else ZYGOTE_RESTART)  # (after a death)
            if failing:
                delay = min(delay * 2, ZYGOTE_RESTART_MAX)

    async def _zygote_died(self, zygote: _zygote.Zygote, scope: trio.CancelScope) -> None:
        await zygote.proc.wait()
        if self.zygote.value is zygote:
            log.warning("the zygote died (status %s); shims boot an interpreter each until "
                        "it is restarted", zygote.proc.returncode)
            self.zygote.value = None
        scope.cancel()

    def spare_leaves(self) -> list[str]:
        """The names of the idle shims' spare leaves (each a future job's id)."""
        return [shim.leaf.name for shim in self._idle if shim.leaf is not None]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the zygote, fill the pool (started once it is full, or once filling failed),
        then refill it until cancelled; then kill every idle shim and remove its spare leaf,
        and end the zygote."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_zygote)
            await self._fill(task_status)

    async def _refill(self) -> None:
        """A new idle shim; after a burst (more missing than `size`), up to REFILL_BATCH
        of them, asked for together (one zygote exchange). Between Starts one at a time:
        several shims preparing at once compete with the next Start for the cores."""
        missing = self._target - len(self._idle)
        count = min(REFILL_BATCH, missing) if missing > self._size else 1
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                leaf = self._leaf() if self._leaf else None
                shim = await self.new_shim(leaf=leaf)
            except (OSError, CgroupError) as exc:
                errors.append(exc)
                return
            self._idle.append(shim)  # no checkpoint since it was made: never lost
            self.idle_count.value = len(self._idle)

        if count <= 1:
            await one()
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)
        if errors:
            raise errors[0]

    async def _shrink(self) -> None:
        """Once no Start has found the pool empty for POOL_SHRINK seconds, back to `size`:
        the extra idle shims are killed and their spare leaves removed."""
        with trio.move_on_at(self._missed_at + POOL_SHRINK):
            await self._taken.wait()
            return
        self._target = self._size
        with trio.move_on_after(DISCARD_TIMEOUT, shield=True):
            while len(self._idle) > self._target:
                shim = self._idle.pop()
                await shim.discard()
                self.idle_count.value = len(self._idle)  # once it is gone

    async def _fill(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            failing, started = False, False
            while True:
                try:
                    while len(self._idle) < self._target:
                        await self._wait_to_refill()
                        await self._refill()
                except (OSError, CgroupError) as exc:
                    # EMFILE, EAGAIN, ENOMEM, no room for a leaf: a Start meanwhile spawns its
                    # own shim and gets RESOURCE_EXHAUSTED if that fails too; never end the
                    # manager for it.
                    if not failing:
                        log.warning("cannot refill the shim pool (%s); retrying", exc)
                    failing = True
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep(REFILL_RETRY)
                    continue
                failing = False
                if not started:
                    started = True
                    task_status.started()
                self._taken = trio.Event()
                if self._target > self._size:
                    await self._shrink()
                else:
                    await self._taken.wait()
        finally:
            with trio.move_on_after(DISCARD_TIMEOUT, shield=True) as scope:
                while self._idle:
                    shim = self._idle.popleft()
                    self.idle_count.value = len(self._idle)
                    await shim.discard()
            if scope.cancelled_caught:
                log.error("idle shims did not die within %.0f s; their spare leaves are left "
                          "for the next start-up to reap", DISCARD_TIMEOUT)
