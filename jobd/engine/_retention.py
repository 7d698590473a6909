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
import time
from typing import NoReturn

import trio

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

    # ------------------------------------------------------------------- public

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
        """A new job's output: its directory and first segment are created now, so a Start
        on a data dir that cannot take them fails before the job exists."""
        self._check_name(job_id)
        path = self.directory / job_id
        while True:
            try:
                segment = _create_job_dir(path)
                break
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
