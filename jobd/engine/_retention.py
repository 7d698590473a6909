"""Every job's output in the data dir and the bounds on it: `--max-job-output`, `--max-data`,
what goes first when they are reached, and back-pressure when nothing can go or the disk is
full. Imports only the standard library, trio and `_output` (no gRPC, protobuf or anyio).

Policy
------
- A job's output past `max_job_output` loses its oldest segments (offsets keep counting).
- When all output passes `max_data`, or the filesystem says ENOSPC/EDQUOT: ended jobs' output
  goes first, the job that ended first first; then the oldest segment of the running job that
  holds the most, as long as it keeps its newest `KEEP_NEWEST` bytes. So one user's flood
  drops its own oldest output, never another user's newest.
- When nothing can go, the writer waits (the job blocks on its pipe; `OutputStore.blocked`
  says why); every drop, removal or job end wakes it, and `run` retries at `poll_interval`
  while any writer waits, for room that appears outside jobd (an operator freeing the disk).

Made ahead
----------
`keep_staged` (a task of the manager's nursery) keeps `STAGED` new jobs' output dirs, each with
its first segment's empty files, made ahead in a directory beside `directory` (on the same
filesystem, outside it), by a worker thread; `create` renames one into place instead of
making a directory and two files on the event loop. On the ext4 of the machines measured an
inode costs ~1.2 ms of kernel time to allocate, a rename ~0.05 ms: three inodes were ~3.6 ms
of the event loop's ~8 ms per Start. A data dir with fewer than `_JOB_INODES` inodes or no
block free is not given a staged dir: `create` then makes its own, as without staging, and
so makes room (ended jobs' output first) or refuses the Start exactly as before.

Accounting counts whole filesystem blocks of data and index files, so the bound holds for what
the disk really gives up, and a job writing a byte at a time cannot hide in its index.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import os
import pathlib
import shutil
import time
from typing import NoReturn

import trio
from trio_util import AsyncBool

from ._errors import JobdError, ResourceExhausted
from ._output import DISK_FULL, MAX_CHUNK, OutputStore, _Segment, segment_paths

KEEP_NEWEST = 1024 * 1024  # a running job keeps at least this much of its newest output
DEFAULT_SEGMENT_LIMIT = 64 * 1024 * 1024  # largest segment size when the bounds allow it
MIN_SEGMENT = 16 * 1024
MEMORY_TAIL = 256 * 1024

# A Start whose output files cannot be made for one of these gets RESOURCE_EXHAUSTED.
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
_EXHAUSTED = DISK_FULL | _NO_DESCRIPTORS | {errno.ENOMEM}

log = logging.getLogger("jobd.engine.output")
# Kept free on the data dir's filesystem for the job records (jobs.sqlite3 shares it): output
# treats the filesystem as full this much early (at most 1/32 of a small filesystem), so that
# one job's flood filling the disk cannot fail another's Start (its record's commit) or keep
# end states from being written.
RECORDS_RESERVE = 8 * 1024 * 1024
# New jobs' output dirs made ahead by `keep_staged` (each: a directory and two empty files),
# and at most, after bursts of Starts (a wave of 50 concurrent Starts found 4 and made 46).
STAGED = 4
STAGED_MAX = 64
# A staged dir taken is replaced once no Start took one for this long: not beside a Start.
STAGE_DELAY = 0.01
# Staged dirs leave at least 1/STAGE_FREE of the filesystem's inodes and blocks free.
STAGE_FREE = 16
# After staging failed (a full disk, no descriptors): try again this much later.
STAGE_RETRY = 1.0
# Inodes a new job's output takes: its directory and its first segment's two files.
_JOB_INODES = 3


def default_max_data(directory: pathlib.Path) -> int:
    """A quarter of the size of the filesystem holding `directory`."""
    st = os.statvfs(directory)
    return st.f_blocks * st.f_frsize // 4


def _segment_size(max_job_output: int, max_data: int, filesystem: int) -> int:
    """Small enough that dropping a segment is a fine step of any bound (1/16 of it), the
    filesystem's size included: on a disk that fills up, the flood must have old segments."""
    size = DEFAULT_SEGMENT_LIMIT
    for bound in (max_job_output, max_data, filesystem):
        if bound:
            size = min(size, bound // 16)
    return max(MIN_SEGMENT, size)


def _create_job_dir(path: pathlib.Path) -> _Segment:
    path.mkdir(mode=0o700)
    try:
        return _Segment.create(path, 0)
    except BaseException:
        path.rmdir()
        raise


def _stage(staging: pathlib.Path) -> str:
    """Make a new job's output dir with its first segment's empty files in `staging` (in a
    worker thread); its name there."""
    name = os.urandom(8).hex()
    _create_job_dir(staging / name).close_fds()
    return name


def _clear(staging: pathlib.Path) -> None:
    """Remove whatever `staging` holds, creating it if needed."""
    staging.mkdir(mode=0o700, exist_ok=True)
    for entry in staging.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _open_staging(staging: pathlib.Path, directory: pathlib.Path) -> bool:
    """`staging` emptied, or removed if it is not on `directory`'s filesystem (a rename
    cannot move a dir between filesystems: e.g. an operator mounted output/ apart)."""
    _clear(staging)
    if os.stat(staging).st_dev == os.stat(directory).st_dev:
        return True
    staging.rmdir()
    return False


def _is_job_dir_name(name: str) -> bool:
    return bool(name) and pathlib.PurePath(name).name == name and name not in (".", "..")


class OutputSpace:
    """Every job's output in `directory` (<data_dir>/output), and the bounds on it. One per
    manager; call from the trio thread.

    Synopsis::

        space = OutputSpace(data_dir / "output", max_job_output=1 << 30, max_data=1 << 34)
        await nursery.start(space.run)     # wakes blocked writers when room appears
        store = space.create(job_id)       # ResourceExhausted when the files cannot be made
        ...
        for job_id in space.on_disk() - kept:   # at start-up
            space.remove(job_id)
        kept_store = space.open(job_id)    # a kept job's output after a restart
        space.close()                      # at shutdown: every descriptor released, files kept

    `max_job_output` and `max_data` of 0 mean no bound.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        max_job_output: int,
        max_data: int,
        segment_bytes: int | None = None,
        memory_tail: int = MEMORY_TAIL,
        poll_interval: float = 1.0,
    ) -> None:
        if max_job_output < 0 or max_data < 0:
            raise JobdError("--max-job-output and --max-data must be >= 0 (0: no bound)")
        self.directory = directory
        self.max_job_output = max_job_output
        self.max_data = max_data
        st = os.statvfs(directory)
        self.segment_bytes = segment_bytes or _segment_size(
            max_job_output, max_data, st.f_blocks * st.f_frsize
        )
        self.reserve = min(RECORDS_RESERVE, st.f_blocks * st.f_frsize // 32)
        self.memory_tail = memory_tail
        self.poll_interval = poll_interval
        self._stores: dict[str, OutputStore] = {}
        self._running: dict[str, OutputStore] = {}  # the writable ones: scanned for drops
        self._stored = 0  # disk bytes of every store's kept segments
        # Output bytes no longer kept since start-up (dropped by a bound, or removed with
        # their job), for metrics.
        self.dropped_bytes = 0
        # Ended stores by when they ended (ties by arrival): the first to drop from. Stores
        # removed or emptied meanwhile are skipped when they come up.
        self._ended: list[tuple[float, int, OutputStore]] = []
        self._arrivals = itertools.count()
        self._blocked: set[OutputStore] = set()
        self._room: trio.Event | None = None  # set on any drop, removal or job end
        self._someone_blocked = trio.Event()
        # Output dirs made ahead (`keep_staged`): their names in `_staging`, while it runs.
        self._staging: pathlib.Path | None = None
        self._staged: list[str] = []
        self.staging_settled = AsyncBool(False)  # True while keep_staged waits for a take
        self._staged_taken = trio.Event()  # set (and replaced by keep_staged) by create()
        self._staged_quiet_at = -math.inf  # STAGE_DELAY after create() last came
        self._stage_target = STAGED
        self._staged_missed = 0  # creates that found none staged since staging caught up

    # ------------------------------------------------------------------- public

    @property
    def staged_count(self) -> int:
        """New jobs' output dirs made ahead and waiting (`keep_staged`)."""
        return len(self._staged)

    @property
    def stored_bytes(self) -> int:
        """Disk bytes held by every job's kept output (whole blocks)."""
        return self._stored

    @property
    def free_bytes(self) -> int:
        """What the data dir's filesystem has free for jobd (root's view)."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    @property
    def blocked_count(self) -> int:
        return len(self._blocked)

    def create(self, job_id: str) -> OutputStore:
        """A new job's output: its directory and first segment exist once this returns (made
        ahead, or now), so a Start on a data dir that cannot take them fails before the job
        exists."""
        self._check_name(job_id)
        path = self.directory / job_id
        segment = self._take_staged(path)
        while segment is None:
            try:
                segment = _create_job_dir(path)
            except FileExistsError:
                raise
            except OSError as exc:
                # A full disk: make room as a write would (ended jobs' output first).
                if exc.errno in DISK_FULL and self._drop_one(for_disk=True):
                    continue
                self._refuse_start(exc)
        store = OutputStore(
            self, job_id, path, [segment], writable=True, memory_tail=self.memory_tail
        )
        self._stores[job_id] = store
        self._running[job_id] = store
        return store

    def _take_staged(self, path: pathlib.Path) -> _Segment | None:
        """A staged output dir moved to `path`, its first segment open; None (nothing done)
        when there is none, or the data dir is so full that a Start must make its own (so
        that it makes room or is refused as it would be without staging)."""
        if self._staging is None:
            return None
        self._staged_quiet_at = trio.current_time() + STAGE_DELAY
        self._staged_taken.set()
        self.staging_settled.value = False
        if not self._staged:
            # A burst: the next one of its size finds them made.
            self._staged_missed += 1
            self._stage_target = min(
                STAGED_MAX, max(self._stage_target, STAGED + self._staged_missed)
            )
            return None
        st = os.statvfs(self.directory)
        if st.f_ffree < _JOB_INODES or st.f_bfree < 1:
            return None
        if os.path.lexists(path):  # what mkdir would say; rename would replace an empty dir
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        staged = self._staging / self._staged.pop()
        try:
            os.rename(staged, path)
        except OSError as exc:
            log.warning("cannot move a staged output dir into %s (%s); making one", path, exc)
            shutil.rmtree(staged, ignore_errors=True)  # not left to pile up until shutdown
            return None
        try:
            return _Segment.create(path, 0, made=True)
        except OSError as exc:
            for p in segment_paths(path, 0):
                p.unlink(missing_ok=True)
            path.rmdir()
            self._refuse_start(exc)

    async def keep_staged(
        self,
        staging: pathlib.Path,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Upkeep, in the manager's nursery: keep new jobs' output dirs made ahead in
        `staging` (outside `directory`, on its filesystem; see "Made ahead"), one at a time in
        a worker thread. STAGED of them; after a burst of Starts that found none left, as many
        more as that burst missed (up to STAGED_MAX). A dir taken is replaced once no Start
        has taken one for STAGE_DELAY (at once when none is left), and only while the
        filesystem keeps a sixteenth of its inodes and blocks free (jobs' output comes
        first). What an earlier server left in `staging` is removed first, and what is
        staged when this ends. Staging that fails (a full disk, no descriptors) is retried
        STAGE_RETRY later; `create` makes its own meanwhile. A `staging` on another
        filesystem, or one that cannot be emptied, is not used: this returns at once."""
        try:
            usable = await trio.to_thread.run_sync(_open_staging, staging, self.directory)
            why = f"it is not on the filesystem of {self.directory}"
        except OSError as exc:
            usable, why = False, str(exc)
        if not usable:
            log.info("no output dirs are made ahead in %s (%s): new jobs make theirs at Start",
                     staging, why)
            task_status.started()
            return
        self._staging = staging
        task_status.started()
        failing = False
        try:
            while True:
                while len(self._staged) < self._stage_target and self._room_to_stage():
                    # Not beside a Start: once none took one for a while, or none is left.
                    while self._staged and trio.current_time() < self._staged_quiet_at:
                        with trio.move_on_at(self._staged_quiet_at):
                            await self._staged_taken.wait()
                        self._staged_taken = trio.Event()
                    try:
                        name = await trio.to_thread.run_sync(_stage, staging)
                    except OSError as exc:
                        if not failing:
                            log.info("cannot make output dirs ahead in %s (%s); new jobs "
                                     "make their own until it can", staging, exc)
                        failing = True
                        await trio.sleep(STAGE_RETRY)
                        continue
                    failing = False
                    self._staged.append(name)
                self._staged_missed = 0
                self._staged_taken = trio.Event()
                self.staging_settled.value = True
                await self._staged_taken.wait()
                self.staging_settled.value = False
        finally:
            self._staging = None
            self._staged = []
            self.staging_settled.value = False
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(_clear, staging)
                except OSError as exc:
                    log.warning("cannot remove the output dirs made ahead in %s: %s "
                                "(the next start-up removes them)", staging, exc)

    def _room_to_stage(self) -> bool:
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        return (
            st.f_ffree - _JOB_INODES >= st.f_files // STAGE_FREE
            and st.f_bfree - 1 >= st.f_blocks // STAGE_FREE
        )

    def _refuse_start(self, exc: OSError) -> NoReturn:
        what = f"cannot create the output files of a new job in {self.directory}"
        if exc.errno in _EXHAUSTED:
            hint = "free space or inodes there, or lower --max-data"
            if exc.errno in _NO_DESCRIPTORS:
                hint = "raise the server's open file limit (ulimit -n)"
            raise ResourceExhausted(f"{what}: {os.strerror(exc.errno)}; {hint}") from exc
        raise JobdError(f"{what}: {exc}") from exc

    def open(self, job_id: str) -> OutputStore:
        """A kept job's output after a restart, ended (recovers a torn last write). Holds no
        descriptor until read. A job whose output directory is missing gets an empty one."""
        self._check_name(job_id)
        if job_id in self._stores:
            return self._stores[job_id]
        path = self.directory / job_id
        bases = sorted(
            int(p.name[:-4]) for p in path.glob("*.out") if p.name[:-4].isdigit()
        ) if path.is_dir() else []
        segments: list[_Segment] = []
        for base in bases:
            if not segment_paths(path, base)[1].exists():
                log.warning("job %s: output segment %d has no index; it is dropped", job_id, base)
                segment_paths(path, base)[0].unlink()
                continue
            segment = _Segment.recover(path, base)
            if segments and segment.base != segments[-1].end:
                log.warning(
                    "job %s: output segments %d and %d do not join; keeping what follows the gap",
                    job_id, segments[-1].base, segment.base,
                )
                for old in segments:
                    for p in segment_paths(path, old.base):
                        p.unlink(missing_ok=True)
                segments.clear()
            segments.append(segment)
        if not segments:
            # Nothing is created for it: an empty segment is never opened nor dropped.
            log.warning("job %s: no output on disk; it reads as empty", job_id)
            segments.append(_Segment(0, 0, 0, math.inf))
        # Empty segments left by a roll that was cut short go, unless they are all there is.
        while len(segments) > 1 and not segments[-1].records:
            for p in segment_paths(path, segments.pop().base):
                p.unlink(missing_ok=True)
        store = OutputStore(self, job_id, path, segments, writable=False, memory_tail=0)
        self._stores[job_id] = store
        self._stored += store.disk_bytes
        last = segment_paths(path, segments[-1].base)[0]
        ended = last.stat().st_mtime if last.exists() else 0.0
        heapq.heappush(self._ended, (ended, next(self._arrivals), store))
        return store

    def get(self, job_id: str) -> OutputStore | None:
        return self._stores.get(job_id)

    def remove(self, job_id: str) -> None:
        """Forget a job's output: its files go at once, open readers get NotFound."""
        self._check_name(job_id)
        store = self._stores.pop(job_id, None)
        if store is not None:
            self.dropped_bytes += store.size - store.start
            store._remove()
            # Removed stores leave the heap lazily; keep it from holding many of them.
            if len(self._ended) > 2 * len(self._stores) + 64:
                self._ended = [e for e in self._ended if not e[2].removed]
                heapq.heapify(self._ended)
        else:
            path = self.directory / job_id
            if path.is_dir():
                for p in path.iterdir():
                    p.unlink()
                path.rmdir()
        self._wake_blocked()

    def on_disk(self) -> set[str]:
        """Job ids with output in the directory (at start-up: prune those not kept)."""
        return {p.name for p in self.directory.iterdir() if p.is_dir()}

    def close(self) -> None:
        """Shutdown: every store closed, every descriptor released; the files stay."""
        for store in list(self._stores.values()):
            store.stop_waiting()
            store.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Upkeep, in the manager's nursery: while a writer waits for room, retry every
        `poll_interval` (room may appear outside jobd: an operator freeing the disk)."""
        task_status.started()
        while True:
            if not self._blocked:
                await self._someone_blocked.wait()
                self._someone_blocked = trio.Event()
            await trio.sleep(self.poll_interval)
            self._wake_blocked()

    # ------------------------------------------------------------------- for OutputStore

    def _make_room(self, store: OutputStore, need: int) -> str:
        """Drop per the bounds so that `need` more bytes fit; "" when they do, else why not."""
        cap = self.max_job_output
        if cap:
            while store.disk_bytes + need > cap and store._droppable(0):
                self._drop(store)
        if self.max_data:
            while self._stored + need > self.max_data:
                if not self._drop_one(for_disk=False):
                    return (
                        f"the output kept for all jobs reached --max-data ({self.max_data} "
                        f"bytes) and nothing more can be dropped (each running job keeps its "
                        f"newest {KEEP_NEWEST // 1024} KiB); jobd resumes when jobs end or are "
                        "removed"
                    )
        return ""

    def _drop_one(self, *, for_disk: bool) -> bool:
        """Drop one segment per the policy; False when nothing can go."""
        while self._ended:
            _, _, store = self._ended[0]
            if store.removed or not store._droppable(0):
                heapq.heappop(self._ended)
                continue
            self._drop(store)
            return True
        best: OutputStore | None = None
        for store in self._running.values():
            if store.closed or not store._droppable(KEEP_NEWEST):
                continue
            if best is None or store.disk_bytes > best.disk_bytes:
                best = store
        if best is None:
            return False
        self._drop(best)
        return True

    def _drop(self, store: OutputStore) -> None:
        before = store.start
        store._drop_oldest()
        self.dropped_bytes += store.start - before
        log.debug("job %s: output before offset %d dropped", store.job_id, store.start)
        self._wake_blocked()

    def _closed(self, store: OutputStore) -> None:
        """A job ended: its output may now be dropped first, which may be room for others."""
        self._blocked.discard(store)
        self._running.pop(store.job_id, None)
        if not store.removed:
            heapq.heappush(self._ended, (time.time(), next(self._arrivals), store))
        self._wake_blocked()

    async def _wait_for_room(self, store: OutputStore) -> None:
        self._blocked.add(store)
        self._someone_blocked.set()
        if self._room is None:
            self._room = trio.Event()
        try:
            await self._room.wait()
        finally:
            self._blocked.discard(store)

    def _wake_blocked(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    @staticmethod
    def _check_name(job_id: str) -> None:
        if not _is_job_dir_name(job_id):
            raise ValueError(f"output name must be a plain file name, not {job_id!r}")


__all__ = ["KEEP_NEWEST", "MAX_CHUNK", "OutputSpace", "default_max_data"]
