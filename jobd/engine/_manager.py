"""The job manager: one trio nursery owns every job; each job is a task in it with its own
cancel scope, its own cgroup leaf and its own output store. Imports only the standard
library, trio and trio-util (no gRPC, TLS or CLI).

Life of a job: `start` validates, creates the leaf with its limits, spawns the exec shim
(which joins the leaf, drops privileges and execs the command) and waits for the shim's
verdict, so a command that cannot run creates no job. The job's task then pumps output and
waits for the main process; when it exits, whatever it left in the cgroup is killed, the
output drains to EOF, usage is read and the leaf removed. `stop` sends SIGTERM to every
process of the job and, after the grace period, cancels the job's scope, whose cleanup
SIGKILLs the cgroup. Leaving the manager stops every job.
"""

from __future__ import annotations

import logging
import marshal
import math
import os
import pwd
import resource
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_util import AsyncValue

from . import _shimpool
from ._cgroup import CgroupTree, JobCgroup, Layout, Mode, ProcessGroup, block_device_of
from ._cgroup import detect_layout as _detect_layout
from ._errors import CgroupError, InvalidArgument, JobdError, NotFound, Unavailable
from ._lock import lock_directory
from ._output import OutputStore
from ._statistics import Counters, EngineStatistics
from ._types import Chunk, EndReason, JobInfo, Limits, State, Stream, Usage

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Up to one pipe-full (_shimpool.PIPE_SIZE) per read: fewer, larger reads and output chunks.
READ_SIZE = _shimpool.PIPE_SIZE
# Bound on shielded cleanup: killing and reaping a cgroup takes milliseconds; if the kernel
# takes longer than this something is badly wrong and we stop waiting rather than hang.
CLEANUP_TIMEOUT = 30.0
MiB = 1024 * 1024
# Far above the ranges distributions give users (1000+), system services (61184-65519,
# systemd's dynamic users) and containers (/etc/subuid, typically 100000-165535 and up).
JOB_UID_FIRST, JOB_UID_LAST = 1_000_000, 1_999_999
log = logging.getLogger(__name__)
NO_LIMITS = Limits()  # every limit unset: the server's defaults apply


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine runs jobs. Limits of 0 mean "none"."""

    data_dir: Path
    run_as: str | None = "nobody"  # None: jobs run as the server's own user
    # Each job gets a uid of its own from this range (gid and home stay the run-as user's),
    # so that no job can signal, trace or inspect another's processes. None: every job
    # runs with the run-as user's own uid.
    job_uids: tuple[int, int] | None = (JOB_UID_FIRST, JOB_UID_LAST)
    cgroup_name: str = "jobd"
    allow_no_cgroups: bool = False  # run without limits when cgroups are unusable
    default_limits: Limits = Limits(cpus=1.0, memory_bytes=512 * MiB, pids=1024)
    max_limits: Limits = field(
        default_factory=lambda: Limits(
            cpus=float(os.cpu_count() or 1),
            memory_bytes=_host_memory(),
            pids=32768,
        )
    )
    stop_grace: float = 5.0
    io_devices: tuple[str, ...] | None = None  # None: the disk holding data_dir
    layout: Layout | None = None  # None: detect from /proc (tests may pass a fake)

    def __post_init__(self) -> None:
        """An operator's mistake is refused at start-up, not found job by job later."""
        for name in ("cpus", "memory_bytes", "pids", "io_read_bps", "io_write_bps"):
            default = getattr(self.default_limits, name)
            cap = getattr(self.max_limits, name)
            for kind, value in (("default", default), ("maximum", cap)):
                if not math.isfinite(value) or value < 0:
                    raise JobdError(f"the {kind} limit {name}={value} must be a number >= 0")
            if cap and (default > cap or not default):
                raise JobdError(
                    f"the default limit {name}={default:g} must be set and at most the "
                    f"maximum {cap:g}"
                )
        if not math.isfinite(self.stop_grace) or self.stop_grace < 0:
            raise JobdError(f"the stop grace must be >= 0 seconds, not {self.stop_grace}")


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int | None
    gid: int
    name: str
    home: str


class _Job:
    """Mutable state of one job; only the manager touches it. Readers get `JobInfo`."""

    def __init__(
        self,
        id: str,
        owner: str,
        command: tuple[str, ...],
        limits: Limits,
        cgroup: JobCgroup | ProcessGroup,
        output: OutputStore,
    ) -> None:
        self.id = id
        self.owner = owner
        self.command = command
        self.limits = limits
        self.cgroup = cgroup
        self.output = output
        self.started_at = time.time()
        self.proc: trio.Process | None = None
        self.uid: int | None = None
        self.cancel_scope = trio.CancelScope()
        # When the job must be SIGKILLed (trio time); inf until a stop is requested. A later
        # stop with a shorter grace moves it earlier.
        self.kill_at: AsyncValue[float] = AsyncValue(math.inf)
        self.term_sent = False
        self.final: JobInfo | None = None
        self.ended = trio.Event()

    @property
    def stop_requested(self) -> bool:
        return bool(self.kill_at.value != math.inf)

    def info(self) -> JobInfo:
        if self.final is not None:
            return self.final
        return JobInfo(
            id=self.id,
            owner=self.owner,
            command=self.command,
            state=State.RUNNING,
            started_at=self.started_at,
            limits=self.limits,
            usage=self.cgroup.usage(),
        )

    def finish(self, returncode: int | None, usage: Usage) -> None:
        """Decide the final state from how the main process ended."""
        code, sig = 0, 0
        if returncode is None or returncode < 0:
            sig = -returncode if returncode is not None else int(signal.SIGKILL)
        else:
            code = returncode
        if self.stop_requested:
            state = State.STOPPED
            # A job that traps SIGTERM and exits by itself was still stopped by our SIGTERM.
            sig = sig or int(signal.SIGTERM if self.term_sent else signal.SIGKILL)
            code = 0
        elif sig:
            state = State.KILLED
        else:
            state = State.EXITED
        self.final = JobInfo(
            id=self.id,
            owner=self.owner,
            command=self.command,
            state=state,
            exit_code=code,
            signal=sig,
            oom_killed=state is State.KILLED and sig == signal.SIGKILL and usage.oom_kills > 0,
            started_at=self.started_at,
            ended_at=time.time(),
            limits=self.limits,
            usage=usage,
        )


class JobManager:
    """Start, stop, inspect and read jobs. Create with `open_job_manager`."""

    def __init__(self, config: EngineConfig, tree: CgroupTree | None, run_as: _RunAs) -> None:
        self._config = config
        self._tree = tree
        self._run_as = run_as
        self._uids_in_use: set[int] = set()
        self._next_uid = config.job_uids[0] if config.job_uids else 0
        self._jobs: dict[str, _Job] = {}
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self._shims: _shimpool.ShimPool | None = None  # set while the manager is open
        self._output_dir = config.data_dir / "output"
        self._counters = Counters()

    def refuse_new_jobs(self) -> None:
        """From now on `start` raises Unavailable (the server is shutting down)."""
        self._closing = True

    def statistics(self) -> EngineStatistics:
        """Counts for metrics; cheap (no walk over the jobs)."""
        return self._counters.snapshot()

    def running_count(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.ended.is_set())

    @property
    def cgroup_mode(self) -> Mode:
        return self._tree.layout.mode if self._tree else Mode.NONE

    # ----------------------------------------------------------------- queries

    def _get(self, job_id: str) -> _Job:
        try:
            canonical = str(uuid.UUID(job_id))
        except (ValueError, TypeError, AttributeError):
            raise InvalidArgument(f"malformed job id {job_id!r}: expected a UUID") from None
        job = self._jobs.get(canonical)
        if job is None:
            raise NotFound(f"no job {canonical}")
        return job

    def status(self, job_id: str) -> JobInfo:
        return self._get(job_id).info()

    def list(self, owner: str | None = None) -> list[JobInfo]:
        """Jobs of `owner`, or of everyone when None, oldest first."""
        return [j.info() for j in self._jobs.values() if owner is None or j.owner == owner]

    def read_output(
        self, job_id: str, offset: int = 0, *, follow: bool = False
    ) -> AsyncIterator[Chunk]:
        """Chunks of the job's combined output from `offset`; with `follow`, live until the
        job has ended and everything was delivered."""
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, not {offset}")
        return self._get(job_id).output.read(offset, follow=follow)

    # ----------------------------------------------------------------- start

    def effective_limits(self, requested: Limits) -> Limits:
        """Fill unset limits from the defaults and check them against the maximums."""
        default, maximum = self._config.default_limits, self._config.max_limits
        values: dict[str, float] = {}
        for name in ("cpus", "memory_bytes", "pids", "io_read_bps", "io_write_bps"):
            value = getattr(requested, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"limit {name} must be a finite number >= 0, not {value}")
            value = value or getattr(default, name)
            cap = getattr(maximum, name)
            if cap and value > cap:
                raise InvalidArgument(f"limit {name}={value:g} exceeds the server maximum {cap:g}")
            values[name] = value
        limits = Limits(
            cpus=float(values["cpus"]),
            memory_bytes=int(values["memory_bytes"]),
            pids=int(values["pids"]),
            io_read_bps=int(values["io_read_bps"]),
            io_write_bps=int(values["io_write_bps"]),
        )
        if limits.cpus and limits.cpus < 0.01:
            raise InvalidArgument(f"limit cpus={limits.cpus:g} is below the minimum 0.01")
        if limits.memory_bytes and limits.memory_bytes < MiB:
            raise InvalidArgument(
                f"limit memory_bytes={limits.memory_bytes} is below the minimum {MiB} (1 MiB)"
            )
        return limits

    def _validate(
        self, command: Sequence[str], env: Mapping[str, str], working_dir: str
    ) -> tuple[tuple[str, ...], dict[str, str], str]:
        if not command or not command[0]:
            raise InvalidArgument("empty command: give the program to run and its arguments")
        for arg in command:
            if "\0" in arg:
                raise InvalidArgument(f"command argument {arg!r} contains a NUL byte")
        for key, value in env.items():
            if not key or "=" in key or "\0" in key:
                raise InvalidArgument(
                    f"bad environment variable name {key!r}: it must be non-empty "
                    "and contain no '=' or NUL"
                )
            if "\0" in value:
                raise InvalidArgument(f"environment variable {key} contains a NUL byte")
        cwd = working_dir or "/"
        if "\0" in cwd:
            raise InvalidArgument("working_dir contains a NUL byte")
        if not os.path.isabs(cwd):
            raise InvalidArgument(f"working_dir {cwd!r} must be an absolute path")
        if not os.path.isdir(cwd):
            raise InvalidArgument(f"working_dir {cwd!r} does not exist or is not a directory")
        run_as = self._run_as
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": run_as.home,
            "USER": run_as.name,
            "LOGNAME": run_as.name,
            "LANG": "C.UTF-8",
        }
        full_env.update(env)
        return tuple(command), full_env, cwd

    async def start(
        self,
        owner: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        limits: Limits = NO_LIMITS,
    ) -> JobInfo:
        """Start a job; returns once the command is executing (or raises, creating nothing)."""
        if self._closing or self._nursery is None:
            raise Unavailable("jobd is shutting down and starts no new jobs")
        argv, full_env, cwd = self._validate(command, env or {}, working_dir)
        effective = self.effective_limits(limits)
        job_id = str(uuid.uuid4())
        uid = self._take_uid()
        try:
            return await self._start(job_id, uid, owner, argv, full_env, cwd, effective)
        except BaseException:
            self._release_uid(uid)
            raise

    def _take_uid(self) -> int | None:
        """A uid no running job has (or the run-as user's own when jobs share it)."""
        span = self._config.job_uids
        if span is None or self._run_as.uid is None:
            return self._run_as.uid
        first, last = span
        for _ in range(last - first + 1):
            uid = self._next_uid
            self._next_uid = first if uid >= last else uid + 1
            if uid not in self._uids_in_use:
                self._uids_in_use.add(uid)
                return uid
        raise Unavailable(f"all {last - first + 1} job uids are in use: wait for jobs to end")

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None:
            self._uids_in_use.discard(uid)

    async def _start(
        self,
        job_id: str,
        uid: int | None,
        owner: str,
        argv: tuple[str, ...],
        full_env: dict[str, str],
        cwd: str,
        effective: Limits,
    ) -> JobInfo:
        assert self._nursery is not None
        cgroup: JobCgroup | ProcessGroup = (
            self._tree.leaf(job_id) if self._tree else ProcessGroup(job_id)
        )
        try:
            cgroup.create(effective)
        except CgroupError as exc:
            # The kernel refused a value (e.g. a limit it cannot apply on this host).
            raise InvalidArgument(f"cannot apply limits {effective}: {exc}") from exc
        output: OutputStore | None = None
        proc: trio.Process | None = None
        try:
            output = OutputStore(self._output_dir, job_id)
            proc = await self._spawn(argv, full_env, cwd, cgroup, uid)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(cgroup, proc, output, remove_output=True)
            raise
        job = _Job(job_id, owner, argv, effective, cgroup, output)
        job.proc = proc
        job.uid = uid
        self._jobs[job_id] = job
        self._counters.started()
        # No checkpoint since the shim's verdict: the job is registered and owned by the
        # nursery atomically, so a cancellation cannot leave it half-created.
        self._nursery.start_soon(self._supervise, job, name=f"job {job_id}")
        return job.info()

    async def _spawn(
        self,
        argv: tuple[str, ...],
        env: dict[str, str],
        cwd: str,
        cgroup: JobCgroup | ProcessGroup,
        uid: int | None,
    ) -> trio.Process:
        run_as = self._run_as
        spec = {
            "procs": cgroup.procs_files,
            "uid": uid,
            "gid": run_as.gid,
            "cwd": cwd,
            "argv": list(argv),
            "env": env,
        }
        # A pre-started shim (its interpreter has already booted), or a new one.
        shim = await (self._shims.take() if self._shims else _shimpool.spawn_shim())
        proc = shim.proc
        if isinstance(cgroup, ProcessGroup):
            cgroup.pgid = proc.pid
        try:
            await shim.hand(spec)
            report = await shim.verdict()
        except BaseException:
            with trio.CancelScope(shield=True):
                shim.close_fds()
                # The shim itself first: it may not have joined the cgroup yet.
                proc.kill()
                cgroup.signal_all(signal.SIGKILL)
                await proc.wait()
                self._close_streams(proc)
            raise
        if report:
            await proc.wait()
            self._close_streams(proc)
            raise self._exec_error(marshal.loads(report), argv, env, cwd)
        return proc

    def _exec_error(
        self, report: dict[str, object], argv: tuple[str, ...], env: dict[str, str], cwd: str
    ) -> JobdError:
        stage, error, what = report["stage"], report["error"], report["what"]
        user = self._run_as.name
        if stage == "exec":
            program = argv[0]
            if report["errno"] == 2 and "/" not in program:
                return InvalidArgument(
                    f"cannot execute {program!r}: not found in PATH "
                    f"({env.get('PATH', DEFAULT_PATH)}); give a full path or set PATH"
                )
            return InvalidArgument(f"cannot execute {program!r} as user {user}: {error}")
        if stage == "chdir":
            return InvalidArgument(f"cannot use working_dir {cwd!r} as user {user}: {error}")
        return CgroupError(f"job setup failed ({stage} {what}): {error}")

    # ----------------------------------------------------------------- run and stop

    async def _supervise(self, job: _Job) -> None:
        """The job's task. A failure here (a cgroup file the kernel refuses, a full disk) ends
        this job, logged, and never the manager or any other job."""
        proc = job.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, job, proc.stdout, Stream.STDOUT)
                nursery.start_soon(self._pump, job, proc.stderr, Stream.STDERR)
                with job.cancel_scope:
                    async with trio.open_nursery() as waiters:
                        waiters.start_soon(self._stopper, job)
                        await proc.wait()
                        waiters.cancel_scope.cancel()
                # The main process is gone (or the job was cancelled): kill what it left
                # behind. The pumps see EOF once the last holder of the pipes is dead.
                job.cgroup.signal_all(signal.SIGKILL)
                await job.cgroup.wait_empty()
        except Exception:
            log.exception("job %s failed inside jobd; killing it", job.id)
        finally:
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + CLEANUP_TIMEOUT
                clean = False
                try:
                    await self._teardown(job.cgroup, proc, job.output, job=job)
                    clean = True
                except Exception:
                    log.exception("cleaning up job %s failed", job.id)
            if cs.cancelled_caught:
                log.error(
                    "job %s: its processes did not die within %.0f s; its cgroup is left "
                    "for the next start-up to reap", job.id, CLEANUP_TIMEOUT
                )
            elif clean:
                # Every process of the job is gone: its uid may serve another job.
                self._release_uid(job.uid)

    async def _stopper(self, job: _Job) -> None:
        await job.kill_at.wait_value(lambda at: at != math.inf)
        if job.kill_at.value > trio.current_time():
            job.term_sent = True
            job.cgroup.signal_all(signal.SIGTERM)
        while True:
            with trio.move_on_at(job.kill_at.value) as timer:
                await job.kill_at.wait_transition()
            if timer.cancelled_caught:
                break
        job.cancel_scope.cancel()

    async def _pump(self, job: _Job, pipe: trio.abc.ReceiveStream, stream: Stream) -> None:
        while data := await pipe.receive_some(READ_SIZE):
            job.output.write(stream, bytes(data))
            self._counters.output(len(data))

    async def _teardown(
        self,
        cgroup: JobCgroup | ProcessGroup,
        proc: trio.Process | None,
        output: OutputStore | None,
        *,
        job: _Job | None = None,
        remove_output: bool = False,
    ) -> None:
        """Kill everything of a job, wait for it, keep the rest of its output, read final
        usage and remove its leaf. Runs shielded; every step is bounded."""
        usage = Usage()
        try:
            if proc is not None or not isinstance(cgroup, ProcessGroup):
                cgroup.signal_all(signal.SIGKILL)
            await cgroup.wait_empty()
            if proc is not None:
                await proc.wait()
                if output is not None and job is not None:
                    # Pumps were cancelled between reads; what is left in the pipes is
                    # output too. Every writer is dead, so this reaches EOF at once.
                    pipes = ((proc.stdout, Stream.STDOUT), (proc.stderr, Stream.STDERR))
                    for pipe, stream in pipes:
                        if pipe is not None:
                            while data := await pipe.receive_some(READ_SIZE):
                                output.write(stream, bytes(data))
                                self._counters.output(len(data))
                self._close_streams(proc)
            usage = cgroup.usage()
            cgroup.remove()
        finally:
            if output is not None:
                output.close()
                if remove_output:
                    output.remove()
            if job is not None:
                if job.final is None:
                    job.finish(proc.returncode if proc else None, usage)
                final = job.info()
                self._counters.job_ended(final.state, _end_reason(final))
                job.ended.set()

    @staticmethod
    def _close_streams(proc: trio.Process) -> None:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()  # type: ignore[attr-defined]

    async def stop(self, job_id: str, grace: float | None = None) -> JobInfo:
        """SIGTERM every process of the job, SIGKILL what is left after `grace` seconds
        (server default when None; 0 kills at once). Returns once every process is gone.
        Stopping a job that has ended returns its final state."""
        job = self._get(job_id)
        if grace is None:
            grace = self._config.stop_grace
        if not math.isfinite(grace) or grace < 0:
            raise InvalidArgument(f"grace must be >= 0 seconds, not {grace}")
        if not job.ended.is_set():
            at = trio.current_time() + grace
            if at < job.kill_at.value:
                job.kill_at.value = at
            await job.ended.wait()
        assert job.final is not None
        return job.final

    async def _stop_all(self, grace: float) -> None:
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                if not job.ended.is_set():
                    nursery.start_soon(self.stop, job.id, grace)


def _end_reason(info: JobInfo) -> EndReason:
    """Why a job ended, from its final state (until the record carries the reason itself)."""
    if info.state is State.EXITED:
        return EndReason.EXIT
    if info.state is State.STOPPED:
        return EndReason.STOP
    return EndReason.OOM if info.oom_killed else EndReason.SIGNAL


def _resolve_run_as(name: str | None) -> _RunAs:
    if name is None:
        entry = pwd.getpwuid(os.getuid())
        return _RunAs(uid=None, gid=entry.pw_gid, name=entry.pw_name, home=entry.pw_dir)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise JobdError(f"no user {name!r} to run jobs as: pass --run-as USER") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise JobdError(
            f"running jobs as {name!r} needs root: run jobd as root, or --run-as yourself"
        )
    return _RunAs(uid=entry.pw_uid, gid=entry.pw_gid, name=entry.pw_name, home=entry.pw_dir)


def _raise_fd_limit() -> None:
    """Each job holds four descriptors (two pipes, two output files): lift the soft limit
    to the hard one so a thousand jobs do not run the server out of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _prepare_data_dir(path: Path) -> None:
    """The data dir holds every job's output: only the server may read it."""
    (path / "output").mkdir(parents=True, exist_ok=True)
    for d in (path, path / "output"):
        if stat.S_IMODE(d.stat().st_mode) & 0o077 and d.stat().st_uid == os.geteuid():
            d.chmod(0o700)


def _claim_output_dir(output_dir: Path) -> int:
    """Hold an exclusive flock on the output dir while the manager is open (the kernel drops
    it if the server dies), then delete the job output a crashed predecessor left there: its
    jobs died with it (the tree's reap), so no client can ask for it and nothing would ever
    remove it. Returns the locked descriptor; closing it releases the lock."""
    fd = lock_directory(output_dir)
    if fd is None:
        raise JobdError(
            f"another jobd is using the data dir {output_dir.parent}: stop it, or give this "
            "one another --data-dir"
        )
    stale = [p for p in output_dir.iterdir() if p.suffix in (".out", ".idx")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d output file(s) left by a previous jobd", len(stale))
    return fd


@asynccontextmanager
async def open_job_manager(config: EngineConfig) -> AsyncIterator[JobManager]:
    """Open the engine: the one nursery owning every job.

    Synopsis::

        async with open_job_manager(EngineConfig(data_dir=Path("/var/lib/jobd"))) as jobs:
            job = await jobs.start("alice", ["echo", "hi"])
            async for chunk in jobs.read_output(job.id, follow=True):
                ...

    Leaving the block normally stops every job with the configured grace; leaving it by an
    exception or cancellation kills them at once. Either way no process, cgroup or output
    file of a job is left behind.
    """
    run_as = _resolve_run_as(config.run_as)
    _prepare_data_dir(config.data_dir)
    _raise_fd_limit()
    tree = _open_tree(config)
    try:
        output_lock = _claim_output_dir(config.data_dir / "output")
    except BaseException:
        if tree is not None:
            tree.close()
        raise
    manager = JobManager(config, tree, run_as)
    try:
        async with trio.open_nursery() as nursery:
            manager._nursery = nursery
            manager._shims = _shimpool.ShimPool()
            await nursery.start(manager._shims.run)
            try:
                yield manager
                manager._closing = True
                await manager._stop_all(config.stop_grace)
            finally:
                manager._closing = True
                nursery.cancel_scope.cancel()
    finally:
        for job in manager._jobs.values():
            job.output.remove()
        os.close(output_lock)
        if tree is not None:
            tree.close()


def _open_tree(config: EngineConfig) -> CgroupTree | None:
    layout = config.layout or _detect_layout()
    problem = ""
    if layout.mode is Mode.NONE:
        problem = "no usable cgroups on this host (need cgroup v2, or v2 plus v1 controllers)"
    elif os.geteuid() != 0 and config.layout is None:
        problem = "jobd is not running as root, so it cannot manage cgroups"
    if problem:
        if config.allow_no_cgroups:
            return None
        raise CgroupError(f"{problem}; to run jobs without any limits, pass --no-cgroups")
    devices = config.io_devices
    if devices is None:
        devices = (block_device_of(config.data_dir),)
    tree = CgroupTree(layout, config.cgroup_name, io_devices=devices)
    tree.open()
    return tree
