"""The job manager: one trio nursery owns every job; each job is a task in it with its own
cancel scope, its own cgroup leaf and its own output store. Imports only the standard
library, trio and trio-util (no gRPC, TLS or CLI).

Life of a job: `start` validates, takes a pooled exec shim (`_shimpool.py`: already booted
and inside a spare leaf named with the id the job then gets) or spawns one, writes the
leaf's limits (or creates the leaf), hands the shim the job (it joins the leaf if it has
not, drops privileges and execs the command) and waits for the shim's verdict, so a command
that cannot run creates no job. The job's task then pumps output and
waits for the main process; when it exits, whatever it left in the cgroup is killed, the
output drains to EOF, usage is read and the leaf removed. `stop` sends SIGTERM to every
process of the job and, after the grace period, cancels the job's scope, whose cleanup
SIGKILLs the cgroup. Leaving the manager stops every job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import marshal
import math
import os
import pwd
import resource
import signal
import stat
import struct
import termios
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from trio_util import AsyncValue

from . import _sandbox, _shimpool
from ._cgroup import CgroupTree, JobCgroup, Layout, Mode, ProcessGroup, block_device_of
from ._cgroup import detect_layout as _detect_layout
from ._errors import (
    AlreadyExists,
    CgroupError,
    FailedPrecondition,
    InvalidArgument,
    JobdError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    exhausted,
)
from ._lock import lock_directory
from ._output import MAX_CHUNK, OutputStore
from ._quota import Quota
from ._records import JobPage, Records
from ._retention import OutputSpace, default_max_data
from ._statistics import Counters, EngineStatistics
from ._stdin import StdinPipe
from ._store import Put, StoreError
from ._types import Chunk, EndReason, JobInfo, Limits, Network, State, Stream, Usage
from ._uidrange import claim_uid_range, release_uid_range
from ._validate import validate_labels, validate_name, validate_size, validate_timeout

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Up to one pipe-full (_shimpool.PIPE_SIZE) per read: fewer, larger reads and output chunks.
READ_SIZE = _shimpool.PIPE_SIZE
# A pipe holding at least this much is spliced into the output (`_pump`).
SPLICE_READ = 128 * 1024
# Bound on shielded cleanup: killing and reaping a cgroup takes milliseconds; if the kernel
# takes longer than this something is badly wrong and we stop waiting rather than hang.
CLEANUP_TIMEOUT = 30.0
# Where new jobs' output dirs are made ahead (`OutputSpace.keep_staged`), in the data dir.
STAGING = "staged-output"
MiB = 1024 * 1024
# Far above the ranges distributions give users (1000+), system services (61184-65519,
# systemd's dynamic users) and containers (/etc/subuid, typically 100000-165535 and up).
JOB_UID_FIRST, JOB_UID_LAST = 1_000_000, 1_999_999
log = logging.getLogger(__name__)
NO_LIMITS = Limits()  # every limit unset: the server's defaults apply
# The server's default limits are written into the pooled shims' spare leaves while they
# wait only if they are at least these (`JobManager._spare_limits`).
SPARE_LIMITS_MIN_MEMORY = 64 * 1024 * 1024
SPARE_LIMITS_MIN_CPUS = 0.1
SPARE_LIMITS_MIN_PIDS = 16


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768


# Per-job maxima that leave the host alive however many jobs ask for them: a quarter of the
# kernel's pid space, three quarters of its memory (issue 9: they were all of each).
DEFAULT_MAX_PIDS_FRACTION = 4
DEFAULT_MAX_MEMORY_FRACTION = 0.75
# A job's soft RLIMIT_NOFILE, as systemd gives services (select() breaks above 1024); the
# hard limit stays the server's, so a job that needs more can raise its own.
DEFAULT_JOB_NOFILE = 1024


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
            memory_bytes=int(_host_memory() * DEFAULT_MAX_MEMORY_FRACTION),
            pids=max(_pid_max() // DEFAULT_MAX_PIDS_FRACTION, 1024),
        )
    )
    # Running jobs in all and per owner (0: no limit); a Start past them: ResourceExhausted.
    max_jobs: int = 1000
    max_jobs_per_user: int = 100
    job_nofile: int = DEFAULT_JOB_NOFILE  # soft RLIMIT_NOFILE of each job (0: the server's)
    # Called with the final JobInfo once each job has ended (the server's audit log).
    on_job_end: Callable[[JobInfo], None] | None = None
    stop_grace: float = 5.0
    io_devices: tuple[str, ...] | None = None  # None: the disk holding data_dir
    # Output bounds (jobd/engine/_retention.py): one job's kept output, and all jobs' output
    # (None: a quarter of the data dir's filesystem). 0: no bound.
    max_job_output: int = 1024 * MiB
    max_data: int | None = None
    layout: Layout | None = None  # None: detect from /proc (tests may pass a fake)
    default_network: Network = Network.HOST  # for a Start that names none
    deny_host_network: bool = False  # a Start asking for the host's network is refused
    tmp_size: int = 0  # bytes per private /tmp, /var/tmp, /dev/shm; 0: the memory limit bounds it
    allow_user_namespaces: bool = False  # else a seccomp filter refuses CLONE_NEWUSER
    # An ended job's record and output are removed this many seconds after it ended (0: kept
    # until removed).
    keep_finished: float = 7 * 86400.0
    # Where running servers register their job_uids range, so that two never overlap (a
    # tmpfs: empty at boot). Tests point it at a directory of their own.
    uid_registry: Path = Path("/run/jobd/uid-ranges")

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
        if self.default_network not in (Network.HOST, Network.NONE):
            raise JobdError("the default network must be host or none")
        if self.deny_host_network and self.default_network is Network.HOST:
            raise JobdError(
                "--deny-host-network refuses the host network, so the default cannot be host: "
                "pass --default-network none too"
            )
        if self.tmp_size < 0:
            raise JobdError(f"the tmp size must be >= 0 bytes, not {self.tmp_size}")
        if not math.isfinite(self.keep_finished) or self.keep_finished < 0:
            raise JobdError(
                f"--keep-finished must be >= 0 seconds (0: forever), not {self.keep_finished}"
            )
        if self.max_job_output < 0 or (self.max_data or 0) < 0:
            raise JobdError("--max-job-output and --max-data must be >= 0 (0: no bound)")
        for name in ("max_jobs", "max_jobs_per_user", "job_nofile"):
            if getattr(self, name) < 0:
                raise JobdError(f"{name} must be >= 0, not {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int | None
    gid: int
    name: str
    home: str


class _Job:
    """Mutable state of one running job; only the manager touches it, and drops it when the
    job has ended (what remains is its `JobInfo` in the records). Readers get `JobInfo`."""

    def __init__(
        self, start: JobInfo, cgroup: JobCgroup | ProcessGroup, output: OutputStore
    ) -> None:
        self.start = start  # the record as started (seq, owner, command, limits, ...)
        self.id = start.id
        self.cgroup = cgroup
        self.output = output
        self.proc: _shimpool.ShimProcess | None = None
        self.cancel_scope = trio.CancelScope()
        # When the job must be SIGKILLed (trio time); inf until a stop is requested. A later
        # stop with a shorter grace moves it earlier.
        self.kill_at: AsyncValue[float] = AsyncValue(math.inf)
        self.stop_reason = EndReason.UNSPECIFIED  # set by the first stop request
        self.failed = False  # a task of jobd's own failed for it (logged)
        self.final: JobInfo | None = None
        self.ended = trio.Event()
        self.stdin: StdinPipe | None = None  # started with stdin: the pipe Input feeds

    @property
    def stop_requested(self) -> bool:
        return bool(self.kill_at.value != math.inf)

    def info(self) -> JobInfo:
        if self.final is not None:
            return self.final
        return dataclasses.replace(
            self.start,
            usage=self.cgroup.usage(),
            output_bytes=self.output.size,
            output_start=self.output.start,
            output_blocked=self.output.blocked,
        )

    def finish(self, returncode: int | None, usage: Usage) -> None:
        """Decide the final state: `exit_code`/`signal` say how the main process ended,
        `state`/`reason` why."""
        code, sig = 0, 0
        if returncode is None or returncode < 0:
            sig = -returncode if returncode is not None else int(signal.SIGKILL)
        else:
            code = returncode
        oom = sig == signal.SIGKILL and usage.oom_kills > 0
        if self.stop_reason is not EndReason.UNSPECIFIED:
            state, reason = State.STOPPED, self.stop_reason
        elif self.failed:
            # jobd lost control of it (a task of its own failed): the closest reason.
            state, reason = State.KILLED, EndReason.SERVER_LOST
        elif oom:
            state, reason = State.KILLED, EndReason.OOM
        elif sig:
            state, reason = State.KILLED, EndReason.SIGNAL
        else:
            state, reason = State.EXITED, EndReason.EXIT
        self.final = dataclasses.replace(
            self.start,
            state=state,
            reason=reason,
            exit_code=code,
            signal=sig,
            oom_killed=oom and state is State.KILLED,
            ended_at=time.time(),
            usage=usage,
            output_bytes=self.output.size,
            output_start=self.output.start,
        )


class JobManager:
    """Start, stop, inspect and read jobs. Create with `open_job_manager`."""

    def __init__(
        self, config: EngineConfig, tree: CgroupTree | None, run_as: _RunAs, records: Records
    ) -> None:
        self._config = config
        self._tree = tree
        self._run_as = run_as
        self._records = records
        self._jobs: dict[str, _Job] = {}  # running jobs only
        self._starting: set[str] = set()  # recorded, not yet running: not shown
        self._limits: dict[Limits, Limits] = {}
        self._quota = Quota(config.max_jobs, config.max_jobs_per_user)
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self._shims: _shimpool.ShimPool | None = None  # set while the manager is open
        self._sandbox: _sandbox.Sandbox | None = None  # set while the manager is open
        output_dir = config.data_dir / "output"
        max_data = config.max_data
        self._output = OutputSpace(
            output_dir,
            max_job_output=config.max_job_output,
            max_data=default_max_data(output_dir) if max_data is None else max_data,
        )
        self._counters = Counters()

    def refuse_new_jobs(self) -> None:
        """From now on `start` raises Unavailable (the server is shutting down)."""
        self._closing = True

    def statistics(self) -> EngineStatistics:
        """Counts for metrics; cheap (no walk over the jobs)."""
        return self._counters.snapshot(
            self._records.states,
            dropped=self._output.dropped_bytes,
            stored=self._output.stored_bytes,
            blocked=self._output.blocked_count,
        )

    def running_count(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.ended.is_set())

    @property
    def cgroup_mode(self) -> Mode:
        return self._tree.layout.mode if self._tree else Mode.NONE

    # ----------------------------------------------------------------- queries

    @staticmethod
    def _canonical(job_id: str) -> str:
        try:
            return str(uuid.UUID(job_id))
        except (ValueError, TypeError, AttributeError):
            raise InvalidArgument(f"malformed job id {job_id!r}: expected a UUID") from None

    def _info(self, job_id: str) -> JobInfo | None:
        job = self._jobs.get(job_id)
        if job is not None:
            return job.info()
        if job_id in self._starting:
            return None
        info = self._records.get(job_id)
        output = self._output.get(job_id)
        if info is not None and output is not None and output.start != info.output_start:
            # --max-data dropped older output of this ended job since its record was made.
            info = dataclasses.replace(info, output_start=output.start)
        return info

    def status(self, job_id: str) -> JobInfo:
        canonical = self._canonical(job_id)
        info = self._info(canonical)
        if info is None:
            raise NotFound(f"no job {canonical}")
        return info

    def list(self, owner: str | None = None) -> list[JobInfo]:
        """Every kept job of `owner`, or of everyone when None, newest first."""
        return self.list_page(owner, limit=len(self._records) + 1).jobs

    def list_page(
        self,
        owner: str | None = None,
        *,
        before: int | None = None,
        limit: int = 100,
        states: frozenset[State] = frozenset(),
        labels: Mapping[str, str] | None = None,
        id_prefix: str = "",
        name: str = "",
    ) -> JobPage:
        """Up to `limit` kept jobs with seq < `before` matching every filter, newest first
        (running ones as they are now). See `Records.page`."""
        return self._records.page(
            self._info, owner, before=before, limit=limit, states=states, labels=labels or {},
            id_prefix=id_prefix, name=name,
        )  # fmt: skip

    def read_output(
        self,
        job_id: str,
        offset: int = 0,
        *,
        follow: bool = False,
        tail_lines: int = 0,
        since: float | None = None,
        stream: Stream | None = None,
        max_chunk: int | Callable[[], int] = MAX_CHUNK,
        on_wait: Callable[[bool], None] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Chunks of the job's combined output from `offset` (or the last `tail_lines` lines,
        or what was written at/after `since`; only `stream` when given; see OutputStore.read);
        with `follow`, live until the job has ended and everything was delivered."""
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, not {offset}")
        canonical = self._canonical(job_id)
        output = self._output.get(canonical)
        if output is None or self._info(canonical) is None:
            raise NotFound(f"no job {canonical}")
        return output.read(
            offset, follow=follow, tail_lines=tail_lines, since=since, stream=stream,
            max_chunk=max_chunk, on_wait=on_wait,
        )

    async def wait(self, job_id: str) -> JobInfo:
        """The job's final state, once it has ended."""
        info = self.status(job_id)
        job = self._jobs.get(info.id)
        if job is not None:
            await job.ended.wait()
            assert job.final is not None
            return job.final
        return info

    async def remove(self, job_id: str, *, force: bool = False) -> JobInfo:
        """Forget an ended job: its record and output. A running one only with `force`,
        which stops it first (reason STOP)."""
        info = self.status(job_id)
        if info.state is State.RUNNING:
            if not force:
                raise FailedPrecondition(
                    f"job {info.id} is still running: stop it first, or remove it with force"
                )
            info = await self.stop(info.id)
        self._forget(info.id)
        return info

    def _forget(self, job_id: str) -> None:
        if self._records.remove(job_id) is not None:
            self._output.remove(job_id)

    def _expired(self, job_id: str) -> None:
        """--keep-finished passed for this ended job."""
        if job_id in self._jobs:
            return
        try:
            self._forget(job_id)
        except OSError as exc:  # its files stay; never end the manager for it
            log.error("job %s: cannot remove its output: %s", job_id, exc)

    async def feed_stdin(self, job_id: str, chunks: AsyncIterable[bytes]) -> JobInfo:
        """Write chunks to the stdin of a job started with stdin, then close it (EOF); once
        per job. Returns the job's state when done (early if the job stopped reading; at
        once if it has ended)."""
        info = self.status(job_id)
        job = self._jobs.get(info.id)
        if job is None:
            return info  # ended: its stdin is gone with it
        if job.stdin is None:
            raise FailedPrecondition(
                f"job {job.id} was started without stdin: start it with stdin "
                "(`jobd-client run -i`) to send it input"
            )
        job.stdin.claim()
        if not job.ended.is_set():
            await job.stdin.feed(chunks)
        job.stdin.close()
        return job.info()

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
        # Most jobs share a few sets of limits: one object each for every record that has
        # them (72 bytes less per kept job), in a cache of bounded size.
        if len(self._limits) > 1024:
            self._limits.clear()
        return self._limits.setdefault(limits, limits)

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
        # Whether it exists is checked by the shim's chdir, as the job's uid: checked here as
        # root, "Permission denied" vs "does not exist" told anyone what root-only
        # directories hold (issue 9).
        if self._sandbox is not None:
            self._sandbox.check_working_dir(cwd)
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
        *,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float = 0.0,  # noqa: ASYNC109  (the job's run time, not this call's)
        network: int = Network.UNSPECIFIED,  # a Network; any other number is refused
        stdin: bool = False,
    ) -> JobInfo:
        """Start a job; returns once the command is executing and its record committed (or
        raises, creating nothing). With stdin, the job's stdin is a pipe that `feed_stdin`
        fills (else /dev/null)."""
        if self._closing or self._nursery is None:
            raise Unavailable("jobd is shutting down and starts no new jobs")
        argv, full_env, cwd = self._validate(command, env or {}, working_dir)
        validate_size(argv, cwd)
        record = JobInfo(
            id="",  # below: a pooled shim's spare leaf names the job
            owner=owner,
            command=argv,
            state=State.RUNNING,
            working_dir=cwd,
            name=validate_name(name),
            labels=validate_labels(labels or {}),
            timeout=validate_timeout(timeout),
            network=self._network(network),
            limits=self.effective_limits(limits),
            uid=self._uid_for(owner),
        )
        self._check_name(record)
        self._quota.admit(owner)  # released when the job ends (_ended)
        # The pool refills only once no Start is under way: not competing with this one.
        pool = self._shims
        with pool.starting() if pool is not None else contextlib.nullcontext():
            # A pooled shim waits in a spare leaf named with a fresh id (cgroup v2 cannot
            # rename a leaf): the job takes that id. From here `_start` owns the shim.
            shim = None if stdin or pool is None else pool.take()
            job_id = shim.leaf.name if shim is not None and shim.leaf else str(uuid.uuid4())
            # Recorded before it runs: its output cannot fill the disk before its record is
            # in (a crash in between leaves a record that the next start-up calls SERVER_LOST).
            record = dataclasses.replace(
                record, id=job_id, seq=self._records.next_seq(), started_at=time.time()
            )
            self._records.add(record)  # takes its name; hidden from queries until it runs
            self._starting.add(record.id)
            try:
                job = await self._start(record, full_env, stdin, shim)
            except BaseException:
                self._records.remove(record.id, forgotten=False)
                self._quota.release(owner)
                raise
            finally:
                self._starting.discard(record.id)
        return job.start

    def _network(self, requested: int) -> Network:
        """The network a Start gets: what it asked for, or the server's default."""
        if requested not in tuple(Network):
            raise InvalidArgument(f"unknown network {int(requested)}: use HOST or NONE")
        network = Network(requested) or self._config.default_network
        if network is Network.HOST and self._config.deny_host_network:
            raise InvalidArgument(
                "this server refuses the host network to jobs (--deny-host-network): ask for "
                "NETWORK_NONE or leave the network unset"
            )
        if network is Network.NONE and not (self._sandbox and self._sandbox.network_none):
            raise FailedPrecondition(
                "this host cannot give a job a network of its own (no network namespaces; "
                "the server log says why at start-up): ask for NETWORK_HOST"
            )
        return network

    def _check_name(self, record: JobInfo) -> None:
        if record.name and self._records.named(record.owner, record.name) is not None:
            raise AlreadyExists(
                f"{record.owner} already has a job named {record.name!r}: pick another name, "
                "or remove that job first"
            )

    def _uid_for(self, owner: str) -> int | None:
        """The owner's own uid (or the run-as user's own when jobs share it)."""
        if self._config.job_uids is None or self._run_as.uid is None:
            return self._run_as.uid
        return self._records.uid_for(owner)

    async def _start(
        self,
        record: JobInfo,
        full_env: dict[str, str],
        stdin: bool,
        shim: _shimpool.Shim | None,
    ) -> _Job:
        """Run the recorded job with `shim` (a pooled one, in its spare leaf named after the
        job; or None: a new one, joining a leaf made now). Creates nothing that outlives a
        failure: the shim is killed, the leaf and the output removed."""
        assert self._nursery is not None
        cgroup: JobCgroup | ProcessGroup | None = None
        output: OutputStore | None = None
        proc: _shimpool.ShimProcess | None = None
        try:
            # A pooled shim gets its spec first: it reads it and prepares the call while the
            # record is committed and the output made; only `_spawn`'s go lets the job run.
            handed = shim is not None and shim.leaf is not None
            try:
                if handed:
                    assert shim is not None and shim.leaf is not None
                    await self._hand(shim, record, full_env, shim.leaf)
                await self._records.write_durably(Put(record))
            except StoreError as exc:
                raise ResourceExhausted(f"cannot record the job in the data dir: {exc}") from exc
            except OSError as exc:
                raise exhausted("start the job", exc) from exc
            try:
                if shim is None and self._shims is not None:
                    shim = await self._shims.new_shim(stdin=stdin)  # forked, or booted
                elif shim is None:
                    prep = self._sandbox.prep if self._sandbox else None
                    shim = await _shimpool.spawn_shim(prep, stdin=stdin)
                cgroup = self._leaf_for(record, shim)
                output = self._output.create(record.id)  # ResourceExhausted when it cannot
                if not handed:
                    await self._hand(shim, record, full_env, cgroup)
                proc = await self._spawn(shim, record.command, full_env, record.working_dir)
            except OSError as exc:
                raise exhausted("start the job", exc) from exc
        except BaseException:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
                if shim is not None:
                    await shim.discard()  # the shim first: it may not have joined the leaf
                if cgroup is not None:
                    cgroup.signal_all(signal.SIGKILL)  # also a process group's
                    await self._teardown(cgroup, None, output, remove_output=True)
            raise
        assert cgroup is not None and output is not None
        job = _Job(record, cgroup, output)
        job.proc = proc
        if proc.stdin is not None:
            job.stdin = StdinPipe(record.id, proc.stdin)
        self._jobs[record.id] = job
        self._counters.starts += 1
        # No checkpoint since the shim's verdict: the job is registered and owned by the
        # nursery atomically, so a cancellation cannot leave it half-created.
        self._nursery.start_soon(self._supervise, job, name=f"job {record.id}")
        return job

    def _leaf_for(self, record: JobInfo, shim: _shimpool.Shim) -> JobCgroup | ProcessGroup:
        """The job's leaf with its limits: the shim's spare (already joined), or a new one."""
        limits = self._leaf_limits(record.limits)
        try:
            if shim.leaf is not None:
                shim.leaf.apply_limits(limits)
                return shim.leaf
            if self._tree is None:
                group = ProcessGroup(record.id)
                group.pgid = shim.proc.pid
                return group
            leaf = self._tree.leaf(record.id)
            leaf.create(limits)
            return leaf
        except CgroupError as exc:
            # The kernel refused a value (e.g. a limit it cannot apply on this host).
            raise InvalidArgument(f"cannot apply limits {record.limits}: {exc}") from exc
        except OSError as exc:
            raise exhausted("create the job's cgroup", exc) from exc

    def _spare_limits(self) -> Limits:
        """The leaf limits of a job that asks for none, written into each pooled shim's spare
        leaf while it waits (a Start with these writes nothing): unless they are so low that
        they would hold up the idle shim's own preparation (its PID 1's mounts and
        namespaces take a few MiB and milliseconds of CPU), then none until Start."""
        limits = self._leaf_limits(self.effective_limits(NO_LIMITS))
        roomy = (
            (not limits.memory_bytes or limits.memory_bytes >= SPARE_LIMITS_MIN_MEMORY)
            and (not limits.cpus or limits.cpus >= SPARE_LIMITS_MIN_CPUS)
            and (not limits.pids or limits.pids >= SPARE_LIMITS_MIN_PIDS)
        )
        return limits if roomy else Limits()

    def _leaf_limits(self, limits: Limits) -> Limits:
        """The leaf's own limits: a sandboxed job's PID 1 is a process of its leaf that is
        not the job's own, so its pids limit counts it on top."""
        if limits.pids and self._sandbox is not None and self._sandbox.namespaces:
            return dataclasses.replace(limits, pids=limits.pids + _sandbox.HELPER_PROCESSES)
        return limits

    async def _hand(
        self,
        shim: _shimpool.Shim,
        record: JobInfo,
        env: dict[str, str],
        cgroup: JobCgroup | ProcessGroup,
    ) -> None:
        """Give `shim` the job's spec; it runs nothing before `_spawn`'s go."""
        spec = {
            "procs": [] if shim.leaf is not None else cgroup.procs_files,  # else joined ahead
            "uid": record.uid,
            "gid": self._run_as.gid,
            "cwd": record.working_dir,
            "argv": list(record.command),
            "env": env,
            "sandbox": self._sandbox.job_plan(record.network) if self._sandbox else None,
            "nofile": self._config.job_nofile,
        }
        await shim.hand(spec, go=False)

    async def _spawn(
        self, shim: _shimpool.Shim, argv: tuple[str, ...], env: dict[str, str], cwd: str
    ) -> _shimpool.ShimProcess:
        """Let the handed job run (its record and output exist): `shim`'s process then runs
        the command in the job's leaves and namespaces (see `_shim.py`: with namespaces it is
        the shim, which ends exactly as the command did). On any failure the caller kills
        the shim."""
        proc = shim.proc
        await shim.go()
        report = await shim.verdict()
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
            if report["errno"] in (errno.ENOENT, errno.ENOTDIR):
                return InvalidArgument(
                    f"working_dir {cwd!r} does not exist or is not a directory (for user {user})"
                )
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
                        if job.start.timeout:
                            waiters.start_soon(self._timer, job)
                        await proc.wait()
                        waiters.cancel_scope.cancel()
                # The main process is gone (or the job was cancelled): kill what it left
                # behind. The pumps see EOF once the last holder of the pipes is dead.
                await job.cgroup.kill()
                await job.cgroup.wait_empty()
                # Output still in the pipes is kept, waiting for disk room if need be; but a
                # stopped job ends now (what cannot be stored then is lost, and logged).
                if job.stop_requested:
                    job.output.stop_waiting()
        except Exception:
            job.failed = True
            log.exception("job %s failed inside jobd; killing it", job.id)
        finally:
            if self._closing and not job.stop_requested and proc.returncode is None:
                job.stop_reason = EndReason.SERVER_SHUTDOWN  # cancelled by the shutdown
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + CLEANUP_TIMEOUT
                try:
                    await self._teardown(job.cgroup, proc, job.output, job=job)
                except Exception:
                    log.exception("cleaning up job %s failed", job.id)
            if cs.cancelled_caught:
                log.error(
                    "job %s: its processes did not die within %.0f s; its cgroup is left "
                    "for the next start-up to reap", job.id, CLEANUP_TIMEOUT
                )

    async def _timer(self, job: _Job) -> None:
        await trio.sleep(job.start.timeout)
        log.info("job %s: its timeout of %g s passed, stopping it", job.id, job.start.timeout)
        self._request_stop(job, self._config.stop_grace, EndReason.TIMEOUT)

    async def _stopper(self, job: _Job) -> None:
        await job.kill_at.wait_value(lambda at: at != math.inf)
        if job.kill_at.value > trio.current_time():
            job.cgroup.signal_all(signal.SIGTERM)
        while True:
            with trio.move_on_at(job.kill_at.value) as timer:
                await job.kill_at.wait_transition()
            if timer.cancelled_caught:
                break
        job.cancel_scope.cancel()

    async def _pump(self, job: _Job, pipe: trio.abc.ReceiveStream, stream: Stream) -> None:
        # A pipe holding much is spliced into the output file (one copy in the kernel, instead
        # of a read into a new bytes object and a pwrite): only once FIONREAD says the bytes
        # are there, from a nonblocking pipe, so that nothing waits. Small reads (seq's 4 KiB
        # writes) are read, and kept in the memory tail for live followers.
        fd = pipe.fileno() if isinstance(pipe, trio.lowlevel.FdStream) else -1
        while True:
            if fd >= 0 and (ready := _pipe_bytes(fd)) >= SPLICE_READ:
                got = await job.output.write_from(stream, fd, min(ready, READ_SIZE))
                self._counters.output_written += got
                continue
            data = await pipe.receive_some(READ_SIZE)
            if not data:
                break
            # Waits while the disk has no room: the job then blocks on its pipe.
            await job.output.write(stream, bytes(data))
            self._counters.output_written += len(data)

    async def _teardown(
        self,
        cgroup: JobCgroup | ProcessGroup,
        proc: _shimpool.ShimProcess | None,
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
                await cgroup.kill()
            # Without a process, a Start failed: its shim's PID 1 may have died mid-join.
            await cgroup.wait_empty(joining=proc is None)
            if proc is not None:
                await proc.wait()
                if output is not None and job is not None:
                    # Pumps were cancelled between reads; what is left in the pipes is
                    # output too. Every writer is dead, so this reaches EOF at once (and
                    # what a full disk cannot take is not waited for).
                    output.stop_waiting()
                    pipes = ((proc.stdout, Stream.STDOUT), (proc.stderr, Stream.STDERR))
                    for pipe, stream in pipes:
                        if pipe is not None:
                            while data := await pipe.receive_some(READ_SIZE):
                                await output.write(stream, bytes(data))
                                self._counters.output_written += len(data)
                self._close_streams(proc)
            usage = await cgroup.finish()
        finally:
            if output is not None:
                output.close()
                if remove_output:
                    self._output.remove(output.job_id)
            if job is not None:
                self._ended(job, proc.returncode if proc else None, usage)

    @staticmethod
    def _close_streams(proc: _shimpool.ShimProcess) -> None:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()  # type: ignore[union-attr]  # trio's FdStream, typed as its ABC

    def _ended(self, job: _Job, returncode: int | None, usage: Usage) -> None:
        """The job is over: its final record replaces the running one, and nothing of it but
        that record (and its output) stays."""
        if job.final is None:
            job.finish(returncode, usage)
        assert job.final is not None
        self._counters.ends[job.final.reason] += 1
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        self._records.ended(job.final)
        job.ended.set()
        self._quota.release(job.start.owner)
        if self._config.on_job_end is not None:
            try:
                self._config.on_job_end(job.final)
            except Exception:
                log.exception("on_job_end failed for job %s", job.id)

    def _request_stop(self, job: _Job, grace: float, reason: EndReason) -> None:
        if job.ended.is_set():
            return
        if job.stop_reason is EndReason.UNSPECIFIED:
            job.stop_reason = reason  # the first stop says why
        at = trio.current_time() + grace
        if at < job.kill_at.value:
            job.kill_at.value = at
        if job.proc is not None and job.proc.returncode is not None:
            job.output.stop_waiting()  # only its output, blocked on a full disk, is left

    async def stop(
        self, job_id: str, grace: float | None = None, *, reason: EndReason = EndReason.STOP
    ) -> JobInfo:
        """SIGTERM every process of the job, SIGKILL what is left after `grace` seconds
        (server default when None; 0 kills at once). Returns once every process is gone.
        Stopping a job that has ended returns its final state."""
        info = self.status(job_id)
        if grace is None:
            grace = self._config.stop_grace
        if not math.isfinite(grace) or grace < 0:
            raise InvalidArgument(f"grace must be >= 0 seconds, not {grace}")
        job = self._jobs.get(info.id)
        if job is None:
            return info
        self._request_stop(job, grace, reason)
        if job.proc is not None and job.proc.returncode is not None:
            job.output.stop_waiting()  # only its output, blocked on a full disk, is left
        await job.ended.wait()
        assert job.final is not None
        return job.final

    async def _stop_all(self, grace: float) -> None:
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                nursery.start_soon(
                    partial(self.stop, job.id, grace, reason=EndReason.SERVER_SHUTDOWN)
                )


def _pipe_bytes(fd: int) -> int:
    """Bytes a pipe holds now (FIONREAD); 0 when it cannot say."""
    try:
        count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        return count
    except OSError:
        return 0


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
    it if the server dies). Returns the locked descriptor; closing it releases the lock."""
    fd = lock_directory(output_dir)
    if fd is None:
        raise JobdError(
            f"another jobd is using the data dir {output_dir.parent}: stop it, or give this "
            "one another --data-dir"
        )
    # Files of the first milestone's layout (one .out/.idx pair per job, no segments).
    stale = [p for p in output_dir.iterdir() if p.suffix in (".out", ".idx") and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d output file(s) of the first milestone's layout", len(stale))
    return fd


def _lost(job: JobInfo, output: OutputStore) -> JobInfo:
    """A job found RUNNING in the store: its server died (the tree's reap killed it)."""
    return dataclasses.replace(
        job,
        state=State.KILLED,
        reason=EndReason.SERVER_LOST,
        signal=int(signal.SIGKILL),
        ended_at=time.time(),
        output_bytes=output.size,
        output_start=output.start,
    )


def _log_reaped(reaped: list[str], records: Records) -> None:
    """Say what the tree's reap removed at start-up: leaves of recorded jobs, and the spare
    leaves of the predecessor's idle shims (a leaf without a record never ran a job: a job's
    record is committed before its command may run)."""
    jobs = [name for name in reaped if records.get(name) is not None]
    if jobs:
        log.warning("reaped %d job cgroup(s) left by a previous jobd: %s",
                    len(jobs), ", ".join(jobs))
    if len(reaped) > len(jobs):
        log.info("removed %d idle spare leaf(s) of a previous jobd's shim pool",
                 len(reaped) - len(jobs))


def _prune_output(space: OutputSpace, kept: set[str]) -> None:
    """Delete the output of jobs the store does not keep (a predecessor's, reaped with its
    tree: no client can ask for it and nothing else would ever remove it)."""
    stale = space.on_disk() - kept
    for job_id in stale:
        space.remove(job_id)
    if stale:
        log.warning("removed the output of %d job(s) that no record keeps", len(stale))


@asynccontextmanager
async def open_job_manager(config: EngineConfig) -> AsyncIterator[JobManager]:
    """Open the engine: the one nursery owning every job.

    Synopsis::

        async with open_job_manager(EngineConfig(data_dir=Path("/var/lib/jobd"))) as jobs:
            job = await jobs.start("alice", ["echo", "hi"])
            async for chunk in jobs.read_output(job.id, follow=True):
                ...

    Leaving the block normally stops every job with the configured grace (reason
    SERVER_SHUTDOWN); leaving it by an exception or cancellation kills them at once. Either
    way no process or cgroup of a job is left behind, and every record is committed: the next
    manager on this data dir has them all. Jobs a crashed predecessor left RUNNING are
    recorded KILLED, reason SERVER_LOST.
    """
    run_as = _resolve_run_as(config.run_as)
    _prepare_data_dir(config.data_dir)
    _raise_fd_limit()
    async with AsyncExitStack() as stack:
        tree = _open_tree(config)  # reaps what a crashed predecessor left running
        if tree is not None:
            stack.callback(tree.close)
        output_dir = config.data_dir / "output"
        stack.callback(os.close, _claim_output_dir(output_dir))
        span = config.job_uids if run_as.uid is not None else None
        if span is not None:
            try:
                uid_fd = claim_uid_range(config.uid_registry, span, config.data_dir)
            except OSError as exc:
                raise JobdError(
                    f"cannot register --job-uids in {config.uid_registry}: {exc.strerror}"
                ) from exc
            stack.callback(release_uid_range, config.uid_registry, span, uid_fd)
        try:
            records = await Records.open(config.data_dir / "jobs.sqlite3", uid_range=span)
        except StoreError as exc:
            raise JobdError(str(exc)) from exc
        stack.push_async_callback(records.aclose)
        manager = JobManager(config, tree, run_as, records)
        manager._sandbox = await _open_sandbox(config, tree)
        stack.callback(manager._output.close)  # every descriptor released; the files stay
        _prune_output(manager._output, kept={job.id for job in records})
        if tree is not None:
            _log_reaped(tree.reaped, records)
        for job in records:
            output = manager._output.open(job.id)
            if job.state is State.RUNNING:
                records.ended(_lost(job, output))
                manager._counters.ends[EndReason.SERVER_LOST] += 1
                log.warning("job %s was running when its server died: recorded KILLED", job.id)
        async with trio.open_nursery() as upkeep:
            await upkeep.start(records.run)
            await upkeep.start(records.expire, config.keep_finished, manager._expired)
            try:
                async with trio.open_nursery() as nursery:
                    manager._nursery = nursery
                    await nursery.start(manager._output.run)
                    await nursery.start(manager._output.keep_staged, config.data_dir / STAGING)
                    manager._shims = _shimpool.ShimPool(
                        manager._sandbox.prep,
                        leaf=partial(_spare_leaf, tree) if tree is not None else None,
                        spare_limits=manager._spare_limits(),
                    )
                    await nursery.start(manager._shims.run)
                    try:
                        yield manager
                        manager._closing = True
                        await manager._stop_all(config.stop_grace)
                    finally:
                        manager._closing = True
                        nursery.cancel_scope.cancel()
            finally:
                upkeep.cancel_scope.cancel()


def _spare_leaf(tree: CgroupTree) -> JobCgroup:
    """A pooled shim's spare leaf, named with the id of the job that will take it."""
    return tree.leaf(str(uuid.uuid4()))


async def _open_sandbox(config: EngineConfig, tree: CgroupTree | None) -> _sandbox.Sandbox:
    """Find what isolation this host allows and say it: never pretend."""
    settings = _sandbox.SandboxSettings(
        tmp_size=config.tmp_size, allow_user_namespaces=config.allow_user_namespaces
    )
    jobs_dirs = [tree.unified_jobs, *tree.v1_jobs.values()] if tree else []
    sandbox = await _sandbox.probe_sandbox(
        settings, tree.layout if tree else None, [str(d) for d in jobs_dirs if d]
    )
    log.info("isolation: %s", sandbox.describe())
    if not sandbox.namespaces and config.default_network is Network.NONE:
        raise JobdError(
            "--default-network none needs network namespaces, which this host refuses: "
            f"{sandbox.describe()}"
        )
    if tree is None and sandbox.namespaces and not config.tmp_size:
        log.warning(
            "without cgroups nothing bounds a job's /tmp, /var/tmp and /dev/shm but "
            "--tmp-size (unset: half the host's memory each)"
        )
    return sandbox


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
