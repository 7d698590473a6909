"""cgroup drivers: find the host's layout (pure v2, hybrid, none), build jobd's tree under the
cgroup the process was started in, and give each job a leaf with limits, usage and kill.
Imports only the standard library and trio: no knowledge of jobs, output or the network.

Theory of operation. A job's *membership* lives in one place per hierarchy: the shim
(`_shim.py`) writes its own pid into every `cgroup.procs` of the job's leaves before it execs
the command, so nothing the job forks can start outside them. On pure v2 one leaf carries
membership, limits and kill. On the hybrid layout (v2 mounted without controllers at
/sys/fs/cgroup/unified, controllers on v1 hierarchies) the v2 leaf carries membership,
`cgroup.events` and `cgroup.kill`, and a v1 leaf per controller carries limits and usage.

What blocks. A leaf's mkdir and rmdir and a write to `cgroup.kill` can sleep in the kernel:
measured over 600 back-to-back Starts, the event loop slept (off the CPU, not preempted)
0.4 s in mkdirs, 0.6 s in kills and 0.1 s in rmdirs, p99 10-12 ms each, and every task stood
still meanwhile. (Likely, from the kernel's source: they take the global cgroup mutex, which a
process joining a cgroup, as each idle shim joins its spare leaf, holds while it waits for an
RCU grace period.) So the job's end (`kill`, `finish`) and the
pool's spare leaves run them in a worker thread; reading files (`cgroup.events`, usage) and
writing limits take no such lock.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import trio

from ._errors import CgroupError, InvalidArgument
from ._lock import lock_directory
from ._types import Limits, Usage

log = logging.getLogger(__name__)

CPU_PERIOD_USEC = 100_000
# v1 controllers jobd uses on hybrid hosts, and what for.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
T = TypeVar("T")
R = TypeVar("R")


class Mode(enum.Enum):
    V2 = "v2"  # everything through one cgroup2 hierarchy
    HYBRID = "hybrid"  # v2 for membership and kill, v1 controllers for limits and usage
    NONE = "none"  # no cgroups: process groups only, no limits (operator must allow it)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the hierarchies are mounted and where this process sits in each."""

    mode: Mode
    unified: Path | None = None  # our own cgroup in the v2 hierarchy (absolute path)
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> our own cgroup in it

    def describe(self) -> str:
        parts = [f"mode {self.mode.value}"]
        if self.unified:
            parts.append(f"v2 at {self.unified}")
        parts += [f"{name} at {path}" for name, path in sorted(self.v1.items())]
        return ", ".join(parts)


def detect_layout(
    mountinfo: str | None = None, proc_cgroup: str | None = None, *, root: Path = Path("/")
) -> Layout:
    """Read /proc/self/mountinfo and /proc/self/cgroup (or the given texts, for tests).

    `root` prefixes every mount point, so a test can point the driver at a fake tree.
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if proc_cgroup is None:
        proc_cgroup = Path("/proc/self/cgroup").read_text()

    v2_mount: Path | None = None
    v1_mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) < 5 or len(post_fields) < 3:
            continue
        fstype, mount_point, super_opts = post_fields[0], fields[4], post_fields[2]
        if fields[3] != "/":
            continue  # a bind mount of a sub-tree: our paths would not line up; skip it
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = root / mount_point.lstrip("/")
        elif fstype == "cgroup":
            for opt in super_opts.split(","):
                if opt in V1_CONTROLLERS:
                    v1_mounts.setdefault(opt, root / mount_point.lstrip("/"))

    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        hier_id, controllers, path = line.split(":", 2)
        if hier_id == "0" and controllers == "":
            own[""] = path
        for name in controllers.split(","):
            if name in V1_CONTROLLERS:
                own[name] = path

    unified = v2_mount / own[""].lstrip("/") if v2_mount and "" in own else None
    v1 = {
        name: mount / own[name].lstrip("/")
        for name, mount in v1_mounts.items()
        if name in own
    }
    if unified is None:
        return Layout(Mode.NONE)
    available = set((v2_mount / "cgroup.controllers").read_text().split()) if v2_mount else set()
    if {"memory", "pids"} <= available:
        return Layout(Mode.V2, unified=unified)
    if all(name in v1 for name in V1_CONTROLLERS):
        return Layout(Mode.HYBRID, unified=unified, v1=v1)
    return Layout(Mode.NONE)


def block_device_of(path: Path) -> str:
    """The "MAJ:MIN" of the whole disk holding `path` (io limits apply to disks, not
    partitions)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dev / "partition").exists():
        parent = (sys_dev.resolve().parent / "dev").read_text().strip()
        return parent
    if major == 0 or not sys_dev.exists():
        raise CgroupError(
            f"{path} is not on a block device (device {major}:{minor}); io limits need one: "
            "pass --io-device MAJ:MIN or put the data dir on a disk"
        )
    return f"{major}:{minor}"


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control, cgroup.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _pids(procs_file: Path) -> list[int]:
    try:
        return [int(p) for p in _read(procs_file).split()]
    except FileNotFoundError:
        return []


async def _wait_until_empty(populated: Callable[[], bool]) -> None:
    delay = 0.001
    while populated():
        # cgroup.events signals changes with POLLPRI, which trio's epoll loop does not
        # watch; a short back-off poll is simple and costs nothing measurable.
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)


class _Batched(Generic[T, R]):
    """`await batched(item)`: `fn(items)` in a worker thread, for every item queued while the
    previous call ran (one thread hand-off for a burst of ended jobs, not one each: a wave of
    50 jobs ending spent 10% of the loop's samples handing 50 calls to threads, py-spy).
    No task of its own: the first caller that finds no call under way makes it."""

    def __init__(self, fn: Callable[[list[T]], list[R | Exception]]) -> None:
        self._fn = fn
        self._queue: list[list[Any]] = []  # [item, result or _PENDING]
        self._busy = False
        self._done = trio.Event()

    async def __call__(self, item: T) -> R:
        slot: list[Any] = [item, _PENDING]
        self._queue.append(slot)
        while slot[1] is _PENDING:
            if self._busy:
                try:
                    await self._done.wait()  # (its slot may be in the next call)
                except BaseException:
                    self._queue = [q for q in self._queue if q is not slot]
                    raise
                continue
            batch, self._queue = self._queue, []
            self._busy = True
            # What the others get if the call itself fails (it cannot be cancelled).
            results: list[Any] = [CgroupError("a worker thread failed")] * len(batch)
            try:
                results = await trio.to_thread.run_sync(self._fn, [b[0] for b in batch])
            finally:
                self._busy = False
                for b, result in zip(batch, results, strict=True):
                    b[1] = result
                done, self._done = self._done, trio.Event()
                done.set()
        if isinstance(slot[1], Exception):
            raise slot[1]
        return cast(R, slot[1])


_PENDING = object()


class JobCgroup:
    """The leaves of one job: one per hierarchy in use."""

    def __init__(self, tree: CgroupTree, name: str) -> None:
        self._tree = tree
        self.name = name
        self.unified = tree.unified_jobs / name if tree.unified_jobs else None
        self.v1 = {ctrl: base / name for ctrl, base in tree.v1_jobs.items()}
        self.limits = Limits()  # what was written (`create`, `apply_limits`)
        self._final: Usage | None = None  # read by `finish` before it removes the leaf
        # Seen empty after its job ran (`kill`, `wait_empty`): it stays so, nothing to read.
        self._emptied = False

    @property
    def dirs(self) -> list[Path]:
        return ([self.unified] if self.unified else []) + list(self.v1.values())

    @property
    def procs_files(self) -> list[str]:
        """Every `cgroup.procs` the shim must join, v1 first, the v2 leaf (kill unit) last."""
        return [str(d / "cgroup.procs") for d in (*self.v1.values(), self.unified) if d]

    def create(self, limits: Limits) -> None:
        made: list[Path] = []
        try:
            for d in self.dirs:
                d.mkdir()
                made.append(d)
            self._set_limits(limits)
        except FileExistsError as exc:
            self._rmdir_all(made)
            raise CgroupError(f"cgroup {exc.filename} already exists") from exc
        except BaseException:
            self._rmdir_all(made)
            raise

    def apply_limits(self, limits: Limits) -> None:
        """Write the limits of a leaf created earlier (a pooled shim's spare leaf, which its
        future job's PID 1 has already joined), empty or with the server's defaults: nothing
        when it has these already. Each limit the leaf has is replaced by one (`limits`
        sets every limit the leaf has: effective limits always do)."""
        if limits != self.limits:
            self._set_limits(limits)

    def _set_limits(self, limits: Limits) -> None:
        tree = self._tree
        raising_memory = bool(self.limits.memory_bytes) and (
            limits.memory_bytes > self.limits.memory_bytes
        )
        self.limits = limits
        if tree.layout.mode is Mode.V2:
            assert self.unified is not None
            d = self.unified
            if limits.cpus:
                _write(d / "cpu.max", f"{round(limits.cpus * CPU_PERIOD_USEC)} {CPU_PERIOD_USEC}")
            if limits.memory_bytes:
                _write(d / "memory.max", str(limits.memory_bytes))
                _write(d / "memory.swap.max", "0")
            if limits.pids:
                _write(d / "pids.max", str(limits.pids))
            io = []
            if limits.io_read_bps:
                io.append(f"rbps={limits.io_read_bps}")
            if limits.io_write_bps:
                io.append(f"wbps={limits.io_write_bps}")
            for dev in tree.io_devices if io else ():
                _write(d / "io.max", f"{dev} {' '.join(io)}")
        elif tree.layout.mode is Mode.HYBRID:
            if limits.cpus:
                cpu = self.v1["cpu"]
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_USEC))
                _write(cpu / "cpu.cfs_quota_us", str(round(limits.cpus * CPU_PERIOD_USEC)))
            if limits.memory_bytes:
                mem = self.v1["memory"]
                # No swap: memory+swap may not exceed memory. Absent when swap accounting is off.
                # The kernel keeps memory <= memory+swap at every write: raised, memory+swap
                # first; lowered (or from none), memory first.
                memsw = mem / "memory.memsw.limit_in_bytes"
                with_swap = memsw.exists()
                if raising_memory and with_swap:
                    _write(memsw, str(limits.memory_bytes))
                _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
                if with_swap and not raising_memory:
                    _write(memsw, str(limits.memory_bytes))
            if limits.pids:
                _write(self.v1["pids"] / "pids.max", str(limits.pids))
            blkio = self.v1["blkio"]
            for dev in tree.io_devices:
                if limits.io_read_bps:
                    _write(blkio / "blkio.throttle.read_bps_device", f"{dev} {limits.io_read_bps}")
                if limits.io_write_bps:
                    _write(
                        blkio / "blkio.throttle.write_bps_device", f"{dev} {limits.io_write_bps}"
                    )

    def pids(self) -> list[int]:
        if self.unified:
            return _pids(self.unified / "cgroup.procs")
        return []

    def populated(self) -> bool:
        if self.unified is None:
            return False
        try:
            return _keyed(_read(self.unified / "cgroup.events")).get("populated", 0) != 0
        except FileNotFoundError:
            return False

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every process in the job. SIGKILL uses `cgroup.kill` where the kernel
        has it, which also catches processes forked while we iterate."""
        assert self.unified is not None
        if sig == signal.SIGKILL and (self.unified / "cgroup.kill").exists():
            try:
                _write(self.unified / "cgroup.kill", "1")
                return
            except CgroupError as exc:
                log.warning("%s; killing the processes one by one", exc)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def wait_empty(self, *, joining: bool = False) -> None:
        """Return once no process is left in the job's cgroup. `joining`: a process may have
        been killed while it joined the leaves (a shim's PID 1, in `procs_files`' order, v1
        first and the v2 leaf last): then it can still be dying in a v1 leaf, which no rmdir
        removes meanwhile, after the v2 leaf was seen empty; wait for the v1 leaves too."""
        if not self._emptied:
            await _wait_until_empty(self.populated)
            self._emptied = True
        if joining:  # (also once `kill` has seen the v2 leaf empty)
            await _wait_until_empty(self._populated_v1)

    def _populated_v1(self) -> bool:
        return any(_pids(d / "cgroup.procs") for d in self.v1.values())

    async def kill(self) -> None:
        """SIGKILL every process left in the job's leaf, in a worker thread (see "What
        blocks"); nothing once it was seen empty (an emptied leaf stays empty: only jobd
        puts processes into it, and only before its job runs)."""
        if self._emptied:
            return
        if not self.populated():
            self._emptied = True
            return
        await self._tree.kill_leaf(self)

    async def finish(self) -> Usage:
        """The emptied leaf's final usage, then the leaf removed, in a worker thread (with the
        other leaves finished meanwhile). A leaf the kernel will not remove is logged and
        left for the next start-up to reap."""
        return await self._tree.finish_leaf(self)

    def _finish(self) -> Usage:
        usage = self._final = self.usage()
        try:
            self.remove()
        except CgroupError as exc:
            log.error("%s; it is left for the next start-up to reap", exc)
        return usage

    def usage(self) -> Usage:
        """CPU time, peak memory and OOM kills, live while running and final after (once
        `finish` has begun, what it read: a Status meanwhile must not read a leaf that its
        worker thread is removing)."""
        if self._final is not None:
            return self._final
        try:
            return self._usage()
        except (OSError, ValueError):  # ENOENT, or ENODEV from a leaf removed meanwhile
            return self._final or Usage()

    def _usage(self) -> Usage:
        if self._tree.layout.mode is Mode.V2:
            assert self.unified is not None
            d = self.unified
            cpu = _keyed(_read(d / "cpu.stat")).get("usage_usec", 0)
            peak_file = d / "memory.peak"
            peak = int(_read(peak_file)) if peak_file.exists() else int(_read(d / "memory.current"))
            ooms = _keyed(_read(d / "memory.events")).get("oom_kill", 0)
            return Usage(cpu_usec=cpu, memory_peak_bytes=peak, oom_kills=ooms)
        if self._tree.layout.mode is Mode.HYBRID:
            cpu = int(_read(self.v1["cpuacct"] / "cpuacct.usage")) // 1000
            mem = self.v1["memory"]
            peak = int(_read(mem / "memory.max_usage_in_bytes"))
            ooms = _keyed(_read(mem / "memory.oom_control")).get("oom_kill", 0)
            return Usage(cpu_usec=cpu, memory_peak_bytes=peak, oom_kills=ooms)
        return Usage()

    def remove(self) -> None:
        self._rmdir_all(self.dirs)

    def _rmdir_all(self, dirs: Iterable[Path]) -> None:
        for d in dirs:
            self._tree.rmdir(d)


class ProcessGroup:
    """Stand-in for a job's cgroup when the operator runs jobd without cgroups: the job's
    process group is the unit (a child that calls setsid escapes it; no limits, no usage)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pgid = 0  # set once the job's main process exists
        self.procs_files: list[str] = []

    def create(self, limits: Limits) -> None:
        pass

    def populated(self) -> bool:
        if self.pgid <= 0:  # never signal pgid 0: that is our own process group
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def signal_all(self, sig: int) -> None:
        if self.pgid <= 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    async def wait_empty(self, *, joining: bool = False) -> None:
        await _wait_until_empty(self.populated)

    async def kill(self) -> None:
        self.signal_all(signal.SIGKILL)

    async def finish(self) -> Usage:
        return Usage()

    def usage(self) -> Usage:
        return Usage()

    def remove(self) -> None:
        pass


class CgroupTree:
    """jobd's own sub-tree: `<start cgroup>/<name>/jobs/<job id>` in every hierarchy used.

    On pure v2 the server process moves into `<name>/server` so that the cgroup it was
    started in holds no process and can delegate controllers (the "no internal processes"
    rule); it moves back when the tree is closed.
    """

    def __init__(self, layout: Layout, name: str, *, io_devices: Iterable[str] = ()) -> None:
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"bad cgroup name {name!r}: use a plain directory name")
        self.layout = layout
        self.name = name
        self.io_devices = tuple(io_devices)
        self.unified_root = layout.unified / name if layout.unified else None
        self.unified_jobs = self.unified_root / "jobs" if self.unified_root else None
        v1_roots = {ctrl: path / name for ctrl, path in layout.v1.items()}
        self.v1_jobs = {ctrl: path / "jobs" for ctrl, path in v1_roots.items()}
        self._v1_roots = v1_roots
        self._moved_self = False
        self._lock_fd: int | None = None
        self.reaped: list[str] = []  # leaves a predecessor left, removed by `open()`
        # Ended jobs' leaves, killed, then their usage read and the leaf removed, in worker
        # threads: a batch per call.
        self.kill_leaf: _Batched[JobCgroup, None] = _Batched(_kill_all)
        self.finish_leaf: _Batched[JobCgroup, Usage] = _Batched(_finish_all)

    @property
    def _all_roots(self) -> list[Path]:
        return ([self.unified_root] if self.unified_root else []) + list(self._v1_roots.values())

    def open(self) -> None:
        """Create the tree (reaping a crashed predecessor's leftovers first)."""
        if self.layout.mode is Mode.NONE:
            return
        try:
            self._lock()
            self.reaped = self.reap_stale()
            for root in self._all_roots:
                root.mkdir(exist_ok=True)
                (root / "jobs").mkdir(exist_ok=True)
            if self.layout.mode is Mode.V2:
                self._delegate_v2()
        except PermissionError as exc:
            self._unlock()
            raise CgroupError(
                f"cannot create {exc.filename}: jobd needs root to manage cgroups "
                "(or pass --no-cgroups to run jobs without limits)"
            ) from exc
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        """Hold an exclusive flock on the tree's first root for as long as it is open: a
        second jobd with the same tree would otherwise reap the first one's running jobs as
        if they were a crashed predecessor's. The kernel drops the lock when we die."""
        root = self._all_roots[0]
        root.mkdir(exist_ok=True)
        self._lock_fd = lock_directory(root)
        if self._lock_fd is None:
            raise CgroupError(
                f"another jobd is running with the cgroup tree {root}: stop it, or give this "
                "one another --cgroup-name"
            )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _delegate_v2(self) -> None:
        assert self.layout.unified is not None and self.unified_root is not None
        start = self.layout.unified
        server_leaf = self.unified_root / "server"
        server_leaf.mkdir(exist_ok=True)
        if os.getpid() in _pids(start / "cgroup.procs"):
            _write(server_leaf / "cgroup.procs", str(os.getpid()))
            self._moved_self = True
        wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        # What was delegated to the cgroup we started in is what we can hand down.
        missing = set(V2_CONTROLLERS) - set(_read(start / "cgroup.controllers").split())
        if missing:
            raise CgroupError(
                f"controllers {', '.join(sorted(missing))} are not available in {start}; "
                "delegate them to jobd's cgroup (e.g. systemd Delegate=yes)"
            )
        for d in (start, self.unified_root, self.unified_root / "jobs"):
            try:
                _write(d / "cgroup.subtree_control", wanted)
            except CgroupError as exc:
                others = [p for p in _pids(d / "cgroup.procs") if p != os.getpid()]
                raise CgroupError(
                    f"{exc}; the cgroup jobd was started in must hold no other process "
                    f"(it holds {len(others)}): start jobd in a cgroup of its own, e.g. a "
                    "systemd service with Delegate=yes"
                ) from exc

    def leaf(self, name: str) -> JobCgroup:
        return JobCgroup(self, name)

    def stale_leaves(self) -> Iterator[str]:
        seen: set[str] = set()
        for root in self._all_roots:
            jobs = root / "jobs"
            if jobs.is_dir():
                for entry in sorted(jobs.iterdir()):
                    if entry.is_dir() and entry.name not in seen:
                        seen.add(entry.name)
                        yield entry.name

    def reap_stale(self) -> list[str]:
        """Kill and remove whatever a predecessor (crashed, SIGKILLed) left in the tree: its
        jobs' leaves and its idle shims' spare leaves; returns their names (the caller, which
        knows the jobs, says which were which).

        Synchronous on purpose: it runs once at start-up, before anything is served."""
        reaped = []
        for name in list(self.stale_leaves()):
            leaf = self.leaf(name)
            for _ in range(1000):
                pids = set(leaf.pids())
                for d in leaf.v1.values():
                    pids.update(_pids(d / "cgroup.procs"))
                if not pids and not leaf.populated():
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.sched_yield()
                trio_free_sleep(0.01)
            else:
                raise CgroupError(f"could not empty stale cgroup {name}; remove it by hand")
            leaf.remove()
            reaped.append(name)
        return reaped

    def close(self) -> None:
        """Remove the (by now empty) tree and move the server back where it started."""
        if self.layout.mode is Mode.NONE:
            return
        self._unlock()
        if self._moved_self:
            assert self.layout.unified is not None
            _write(self.layout.unified / "cgroup.procs", str(os.getpid()))
            self._moved_self = False
        for root in self._all_roots:
            for leaf in (root / "jobs", root / "server", root):
                if leaf.is_dir():
                    self.rmdir(leaf)

    def rmdir(self, path: Path) -> None:
        """Remove one cgroup directory; tests of fake trees override this (files in a plain
        directory, unlike cgroupfs control files, keep rmdir from working)."""
        for _ in range(100):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # EBUSY: the kernel may still be tearing down the last exited task.
                if exc.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
                trio_free_sleep(0.001)
        raise CgroupError(f"cannot remove cgroup {path}: still busy")


def _kill_all(leaves: list[JobCgroup]) -> list[None | Exception]:
    results: list[None | Exception] = []
    for leaf in leaves:
        try:
            leaf.signal_all(signal.SIGKILL)
        except Exception as exc:  # (each leaf's own: the others are killed all the same)
            results.append(exc)
        else:
            results.append(None)
    return results


def _finish_all(leaves: list[JobCgroup]) -> list[Usage | Exception]:
    results: list[Usage | Exception] = []
    for leaf in leaves:
        try:
            results.append(leaf._finish())
        except Exception as exc:  # (each leaf's own: the others are finished all the same)
            results.append(exc)
    return results


def trio_free_sleep(seconds: float) -> None:
    """A blocking sleep for the few synchronous start-up and teardown paths."""
    time.sleep(seconds)
