"""The output of one job: spilled losslessly to segment files, a bounded tail kept in memory
while it runs, and readers that replay from any offset (or seek by lines or time) then follow
live. Imports only the standard library and trio (no gRPC, protobuf or anyio): the server
adapts `Chunk`s to the API. The bounds across jobs live in `_retention.OutputSpace`, which
makes every store.

Theory of operation
-------------------
A job's output is a directory `<output>/<job id>/` of segments, Kafka-style. A segment covers
the offsets [base, end) of the combined stream and is two files named after its base:

- `<base>.out` holds the raw bytes; file position == stream offset - base.
- `<base>.idx` holds one fixed-size record per write: (offset, time, length, stream). Record i
  is at i * 32, so the chunk containing an offset is a binary search with `os.pread`; nothing
  per chunk stays in memory. Times never go backwards within a job (a stamp is at least the
  previous one), so `since` is a binary search too.

The writer appends to the newest segment and starts a new one once it holds `segment_bytes`
(data and index). Dropping old output is unlinking the oldest segment, so the index is bounded
along with the data and dropping costs no copy. Offsets keep counting: `start` is the base of
the oldest segment kept. A segment is appended with pwrite at its own offsets, data first and
index record second, so a crash (SIGKILL, power loss) leaves at worst a torn last write, which
`recover` cuts back to the last record that both files hold.

File descriptors: only a running job's newest segment is held open (by the writer). Every
other read opens the one segment it needs, reads and closes it within one step, so an ended job
holds no descriptor and a dropped segment's space is freed at once (no reader keeps a deleted
file alive). A tail of the most recent chunks (at most `memory_tail` bytes, per-entry overhead
counted) lets live followers be served without touching the disk; it is dropped at close().

A reader is only a position: it pulls at its own pace and, once caught up, parks on one
`trio.Event` shared by every follower. So a stalled reader costs nothing, never blocks the
writer nor other readers, and cancelling it leaves nothing behind. The store keeps a weak
reference to each reader that has not finished, for one purpose: the page cache.

Page cache: the kernel keeps whatever jobd writes in its page cache until memory runs short.
A job's output is written once and read back seldom (by a follower that fell behind, or a
later replay), so a segment's pages are handed back (`_PageCache`: written back, then
`POSIX_FADV_DONTNEED`, in a worker thread) once the writer has moved past it and no unfinished
reader of this store is before its end; an ended job's, once its last reader is done. What is
read again later comes from the disk. Measured on the project's VM (docs/BENCHMARKS.md, "Round
8: stream"): a writer's system time per MiB rose about sixfold once a stream had grown
the page cache by 1.5-2.5 GiB, and stayed flat with the pages handed back.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import errno
import logging
import math
import os
import pathlib
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ._errors import InvalidArgument, NotFound
from ._types import Chunk, Stream

if TYPE_CHECKING:
    from ._retention import OutputSpace

# The default largest chunk handed to a reader (`read(max_chunk=...)`): adjacent same-stream
# chunks are merged up to it (a job printing line by line would otherwise cost a message per
# line), larger ones split.
MAX_CHUNK = 64 * 1024

# offset, time, length, stream; padded to 32 bytes so that records are aligned and the length
# has room for any single write.
_RECORD = struct.Struct("<QdQB7x")

# Index records read in one disk step while merging chunks or scanning back for lines: bounds
# the index bytes read (4 KiB) for one step when a job wrote a byte at a time.
_RECORD_BATCH = 128

# Data read in one step while scanning back for line ends (`tail_lines`), and in all: a
# `tail_lines` that finds too few line ends in this much output (index included) starts where
# the scan stopped, so one seek never holds the event loop for long (a 10 GB line).
_SCAN_BLOCK = 64 * 1024
TAIL_SCAN_LIMIT = 16 * 1024 * 1024

# What one tail entry costs besides its data (Chunk object, int, float and bytes headers, a
# list slot). Counted against `memory_tail`, so that a job printing one byte at a time cannot
# grow the tail past its bound by the number of entries.
_ENTRY_OVERHEAD = 200

# Disk space is counted in filesystem blocks: a file of 1 byte takes a block.
BLOCK = 4096

# errnos that mean "the filesystem cannot take more now": the writer waits for room on these;
# any other OSError is a failure of the disk and ends the job.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# A splice into the output that fails with one of these moved nothing: store it by a read and a
# write instead (which waits for room): a full disk, or a filesystem that cannot splice.
# `write_from` splices only while the filesystem has this much free besides the bytes: near a
# full disk a flood goes the way of `write` (each ENOSPC dropped at once, before any other task
# runs), so that it does not keep the disk full for the job store (sqlite) and others.
SPLICE_HEADROOM = 8 * 1024 * 1024
_NO_SPLICE = DISK_FULL | {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}


class _KeptForRecords(OSError):
    """ENOSPC of our own: the write would eat into the space kept free for the job records
    (`OutputSpace.reserve`); handled as the filesystem's own ENOSPC."""


# The clock chunks are stamped with (Unix time); a module global so that tests can replace it.
_now = time.time

log = logging.getLogger("jobd.engine.output")


def on_disk(size: int) -> int:
    """Bytes a file of `size` bytes takes on disk (whole blocks)."""
    return -(-size // BLOCK) * BLOCK


def segment_paths(directory: pathlib.Path, base: int) -> tuple[pathlib.Path, pathlib.Path]:
    return directory / f"{base:020d}.out", directory / f"{base:020d}.idx"


class _Segment:
    """The offsets [base, end) of one job's output: a data file and an index file."""

    __slots__ = ("base", "data_fd", "end", "first_time", "index_fd", "records")

    def __init__(self, base: int, end: int, records: int, first_time: float) -> None:
        self.base = base
        self.end = end
        self.records = records
        self.first_time = first_time  # time of its first record; inf while it has none
        self.data_fd = -1  # open only for the writer's newest segment
        self.index_fd = -1

    @property
    def data_bytes(self) -> int:
        return self.end - self.base

    @property
    def disk(self) -> int:
        return on_disk(self.end - self.base) + on_disk(self.records * _RECORD.size)

    def close_fds(self) -> None:
        for fd in (self.data_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        # -1 rather than the stale numbers: the kernel may hand them to another file.
        self.data_fd = self.index_fd = -1

    @classmethod
    def create(cls, directory: pathlib.Path, base: int, *, made: bool = False) -> _Segment:
        """New empty files for offsets from `base`, held open for writing; with `made`, the
        empty files made earlier (a staged dir: `_retention.py`, "Made ahead")."""
        data_path, index_path = segment_paths(directory, base)
        # O_EXCL: two writers on one file would silently interleave two outputs.
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if made else os.O_CREAT | os.O_EXCL)
        segment = cls(base, base, 0, math.inf)
        segment.data_fd = os.open(data_path, flags, 0o600)
        try:
            segment.index_fd = os.open(index_path, flags, 0o600)
        except BaseException:
            segment.close_fds()
            if not made:
                data_path.unlink(missing_ok=True)
            raise
        return segment

    @classmethod
    def recover(cls, directory: pathlib.Path, base: int) -> _Segment:
        """Load a segment left on disk, cutting a torn last write (the two files disagree) back
        to the last record both hold. Holds no descriptor afterwards."""
        data_path, index_path = segment_paths(directory, base)
        with _opened(data_path, os.O_RDWR) as data_fd, _opened(index_path, os.O_RDWR) as idx_fd:
            data_size = os.fstat(data_fd).st_size
            records = os.fstat(idx_fd).st_size // _RECORD.size
            end = base
            while records:
                offset, _, length, _ = _RECORD.unpack(
                    _pread_exact(idx_fd, _RECORD.size, (records - 1) * _RECORD.size)
                )
                if offset - base + length <= data_size:
                    end = offset + length
                    break
                records -= 1  # its data never fully reached the file
            first_time = math.inf
            if records:
                first_time = _RECORD.unpack(_pread_exact(idx_fd, _RECORD.size, 0))[1]
            if os.fstat(idx_fd).st_size != records * _RECORD.size:
                os.ftruncate(idx_fd, records * _RECORD.size)
            if data_size != end - base:
                os.ftruncate(data_fd, end - base)
        return cls(base, end, records, first_time)


@contextmanager
def _opened(path: pathlib.Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class OutputStatistics:
    """A snapshot of one store, for tests and metrics."""

    size: int  # bytes written, kept or not
    start: int  # first offset still kept
    chunks: int  # writes recorded (index records) in the kept segments
    segments: int  # segments kept
    disk_bytes: int  # what the kept segments take on disk (whole blocks)
    memory_bytes: int  # held by the in-memory tail, overhead included; <= memory_tail
    readers_waiting: int  # followers parked until more output arrives or the store closes
    open_fds: int  # file descriptors the store holds (the writer's segment; 0 once closed)


# A closed store's tail: holds nothing, and anything appended to it is discarded.
_NO_TAIL: collections.deque[Chunk] = collections.deque(maxlen=0)


class OutputStore:
    """The lossless, multicast output of one job. Made by `OutputSpace.create` (a new job) or
    `OutputSpace.open` (a kept job's output after a restart).

    Synopsis::

        store = space.create(job_id)
        await store.write(Stream.STDOUT, b"hello\\n")  # from the job's pipe pump
        store.close()                                  # end of output: followers finish
        async for chunk in store.read(offset, follow=True):
            ...
        space.remove(job_id)                           # when the job is forgotten

    Files are created with mode 0o600 (a job must not read other jobs' output). Call every
    method from the trio thread.
    """

    # An ended job's store is one of many kept for days: slots keep it to a few hundred bytes.
    __slots__ = (
        "__weakref__", "_blocked", "_blocked_since", "_changed", "_closed", "_complete",
        "_dir", "_disk", "_last_time", "_lost", "_memory_tail", "_prefix", "_reading",
        "_readers", "_released", "_removed", "_segments", "_size", "_space", "_stop_waiting",
        "_tail", "_tail_bytes", "job_id",
    )

    def __init__(
        self,
        space: OutputSpace,
        job_id: str,
        directory: pathlib.Path,
        segments: list[_Segment],
        *,
        writable: bool,
        memory_tail: int,
    ) -> None:
        if memory_tail < 0:
            raise ValueError("memory_tail must be >= 0")
        self.job_id = job_id
        self._space = space
        self._dir = directory
        self._prefix = str(directory) + "/"  # paths as strings: pathlib costs per read step
        # While the job runs, the older segment followers last read from stays open for them
        # (a follower that fell behind reads one step at a time): closed when that segment is
        # dropped or another is read, and at close(). An ended job keeps nothing open.
        self._reading: _Segment | None = None
        self._segments = segments  # oldest first, contiguous; never empty
        self._size = segments[-1].end
        self._memory_tail = memory_tail
        self._closed = not writable
        self._complete = not writable  # closed by its writer, not cut short by remove()
        self._removed = False
        self._disk = sum(s.disk for s in segments)
        self._last_time = 0.0
        self._blocked = ""
        self._blocked_since = 0.0
        self._stop_waiting = False  # the job is gone: store what fits, wait for nothing
        self._lost = 0
        # The tail: contiguous chunks ending at `_size`, oldest first. A deque, so eviction
        # frees at once; bisecting it is cheap since the overhead charge bounds its length
        # (memory_tail / _ENTRY_OVERHEAD entries).
        self._tail: collections.deque[Chunk] = collections.deque() if writable else _NO_TAIL
        self._tail_bytes = 0
        # Created by the first follower that parks, set and dropped by the next write or close:
        # a write costs nothing when nobody waits, and one set() wakes every follower.
        self._changed: trio.Event | None = None
        # Readers that have not finished (weakly: dropping one forgets it), made on the first
        # read; and the offset up to which the segments' pages were handed back (see "Page
        # cache" above).
        self._readers: weakref.WeakSet[OutputReader] | None = None
        self._released = segments[0].base

    @property
    def size(self) -> int:
        """Total bytes written, kept or not (the offset the next byte will have)."""
        return self._size

    @property
    def start(self) -> int:
        """The first offset still kept (> 0 once older output was dropped)."""
        return self._segments[0].base

    @property
    def blocked(self) -> str:
        """Why output is not being stored right now ("" when it is): the job waits."""
        return self._blocked

    @property
    def disk_bytes(self) -> int:
        return self._disk

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def removed(self) -> bool:
        return self._removed

    def statistics(self) -> OutputStatistics:
        waiting = 0 if self._changed is None else self._changed.statistics().tasks_waiting
        fds = sum((s.data_fd >= 0) + (s.index_fd >= 0) for s in self._segments)
        return OutputStatistics(
            size=self._size,
            start=self.start,
            chunks=sum(s.records for s in self._segments),
            segments=len(self._segments),
            disk_bytes=self._disk,
            memory_bytes=self._tail_bytes,
            readers_waiting=waiting,
            open_fds=fds,
        )

    # ------------------------------------------------------------------- writing

    async def write(self, stream: Stream, data: bytes) -> None:
        """Append `data` as one chunk of `stream`, dropping this job's or other jobs' oldest
        output as the space's bounds say.

        When it cannot be stored (the bounds leave nothing to drop, the filesystem is full or
        out of inodes) it waits until there is room: the caller (the job's pipe pump) stops
        reading, so the job blocks on its pipe. It never drops new bytes, except after
        `stop_waiting()`. Returns without a checkpoint when the bytes were stored at once.
        Any other OSError (an I/O error) propagates; nothing of this chunk is recorded.
        """
        if self._closed:
            raise RuntimeError("output store is closed; nothing more can be written")
        if not data:
            return
        if self._lost:
            self._lost += len(data)  # after a loss, nothing more: the output stays a prefix
            return
        data = bytes(data)  # the tail keeps it: it must not change under us
        view, done = memoryview(data), 0
        while done < len(data):
            length = self._piece_length(len(data) - done)
            piece = data if length == len(data) else bytes(view[done : done + length])
            if not await self._write_piece(stream, piece):
                self._lost += len(data) - done - length  # the rest too: the output stays a prefix
                return
            done += length

    async def write_from(self, stream: Stream, fd: int, length: int) -> int:
        """Move at most `length` bytes from the pipe `fd` into the output as `write` does; returns
        how many (0 at end of file). `fd` must be nonblocking and hold at least `length` bytes
        right now (its FIONREAD said so, and nobody else reads it), so that nothing waits.

        The bytes go from the pipe to the data file by splice(2): one copy in the kernel instead
        of a read into a new bytes object and a pwrite of it (what a large pipe read cost). They
        are not kept in the memory tail (it is emptied: followers read them from the file, as
        they did when a write was larger than the tail). Near a full disk (SPLICE_HEADROOM),
        without room yet, or on a filesystem without splice, it reads and goes the way of
        `write`, which drops or waits for room; a splice that stops short leaves the rest in
        the pipe.
        """
        if self._closed:
            raise RuntimeError("output store is closed; nothing more can be written")
        length = self._piece_length(length)
        if self._lost or self._blocked or self._space._make_room(self, self._room_needed(length)):
            return await self._read_and_write(stream, fd, length)
        segment = self._segments[-1]
        try:
            if self._rolls(segment):
                segment = self._roll()
        except OSError:
            return await self._read_and_write(stream, fd, length)
        st = os.fstatvfs(segment.data_fd)
        if st.f_bavail * st.f_frsize < length + SPLICE_HEADROOM:
            return await self._read_and_write(stream, fd, length)
        offset = self._size
        now = max(_now(), self._last_time)
        data_at, index_at = offset - segment.base, segment.records * _RECORD.size
        before = segment.disk
        try:
            moved = os.splice(fd, segment.data_fd, length, offset_dst=data_at)
        except OSError as exc:
            if exc.errno not in _NO_SPLICE:
                raise
            return await self._read_and_write(stream, fd, length)  # nothing left the pipe
        if not moved:
            return 0
        if moved < length:
            # Stopped short: the disk is full. Drop now, as `write` does on ENOSPC, before
            # anything else needs a block: a disk left full while other tasks run would fail
            # their writes (the job store's) for nothing. The rest is still in the pipe.
            self._space._drop_one(for_disk=True)
        try:
            _pwrite_all(segment.index_fd, _RECORD.pack(offset, now, moved, stream), index_at)
        except OSError as exc:
            # Out of the pipe but not indexed: take the bytes back and store them as `write`.
            data = _pread_exact(segment.data_fd, moved, data_at)
            _truncate_quietly(segment.index_fd, index_at)
            _truncate_quietly(segment.data_fd, data_at)
            if exc.errno not in DISK_FULL:
                raise
            await self.write(stream, data)
            return moved
        if not segment.records:
            segment.first_time = now
        segment.records += 1
        segment.end += moved
        self._size += moved
        self._last_time = now
        self._grow(segment.disk - before)
        if self._blocked:
            self._set_blocked("")
        self._tail.clear()  # it must end at `size`: these bytes are only in the file
        self._tail_bytes = 0
        self._wake()
        await trio.lowlevel.checkpoint()
        return moved

    async def _read_and_write(self, stream: Stream, fd: int, length: int) -> int:
        data = os.read(fd, length)
        await self.write(stream, data)
        return len(data)

    async def _write_piece(self, stream: Stream, data: bytes) -> bool:
        """`write` of at most what the last segment has room for; False when it was lost."""
        space = self._space
        while True:
            problem = space._make_room(self, self._room_needed(len(data)))
            if not problem:
                try:
                    chunk = self._append(stream, data)
                    break
                except OSError as exc:
                    if exc.errno not in DISK_FULL:
                        raise
                    if space._drop_one(for_disk=True):
                        continue  # freed something: try again at once
                    problem = (
                        f"the data dir {space.directory.parent} is full "
                        f"({os.strerror(exc.errno)})"
                    )
                    if isinstance(exc, _KeptForRecords):
                        kept = space.reserve // 1024
                        problem += f"; its last {kept} KiB are kept for the job records"
            if self._stop_waiting:
                self._lose(len(data), problem)
                return False
            self._set_blocked(problem)
            await space._wait_for_room(self)
            if self._closed:
                raise RuntimeError("output store was closed while a write waited for room")
        if self._blocked:
            self._set_blocked("")
        self._remember(chunk)
        self._wake()
        return True

    def _piece_length(self, length: int) -> int:
        """How much of a write of `length` bytes goes into the last segment (or the one it
        rolls to): never past the segment size, so that a job whose pipe reads are larger than
        a segment still has old segments to drop and never holds much more than it keeps."""
        segment = self._segments[-1]
        room = self._space.segment_bytes
        if not self._rolls(segment):
            room -= segment.data_bytes + segment.records * _RECORD.size
        return min(length, max(room, 1))

    def stop_waiting(self) -> None:
        """The job is stopped and its processes are gone (or going): from now on output that
        cannot be stored is lost instead of waited for, and so is everything after it (the
        output stays a prefix, nothing is skipped); counted and logged once. A writer waiting
        now gives up. So a stopped job blocked on a full disk still ends, its pipes drain."""
        self._stop_waiting = True
        self._space._wake_blocked()

    def close(self) -> None:
        """Mark the end of output: followers end once they have delivered everything. Releases
        the writer's descriptors and the memory tail; later reads open files per step."""
        if self._closed:
            return
        self._closed = True
        self._complete = not self._removed
        self._stop_waiting = True
        self._tail = _NO_TAIL
        self._tail_bytes = 0
        self._stop_reading()
        for segment in self._segments:
            segment.close_fds()
        if self._lost:
            log.warning(
                "job %s: %d byte(s) of output lost: they could not be stored before the job "
                "ended (%s)", self.job_id, self._lost, self._blocked or "no room",
            )
        self._blocked = ""
        self._space._closed(self)
        self._release_passed()
        self._wake()

    def _room_needed(self, length: int) -> int:
        """Disk bytes that appending `length` bytes adds (whole blocks, index included)."""
        segment = self._segments[-1]
        if self._rolls(segment):
            return on_disk(length) + on_disk(_RECORD.size)
        data, index = segment.data_bytes, segment.records * _RECORD.size
        return (on_disk(data + length) - on_disk(data)) + (
            on_disk(index + _RECORD.size) - on_disk(index)
        )

    def _rolls(self, segment: _Segment) -> bool:
        size = segment.data_bytes + segment.records * _RECORD.size
        return segment.records > 0 and size >= self._space.segment_bytes

    def _append(self, stream: Stream, data: bytes) -> Chunk:
        segment = self._segments[-1]
        if self._rolls(segment):
            segment = self._roll()
        if self._space.reserve:
            st = os.fstatvfs(segment.data_fd)
            # Whole blocks: the data's last one and the index's next one may be new.
            if st.f_bfree * st.f_frsize < len(data) + 2 * BLOCK + self._space.reserve:
                raise _KeptForRecords(errno.ENOSPC, os.strerror(errno.ENOSPC))
        offset = self._size
        now = max(_now(), self._last_time)  # never backwards: `since` bisects on it
        before = segment.disk
        data_at = offset - segment.base
        index_at = segment.records * _RECORD.size
        # pwrite at our own offsets rather than O_APPEND, so a failed write cannot shift every
        # later byte off its offset; on failure cut back what reached the files, so a full disk
        # gets its blocks back and the files stay consistent.
        try:
            _pwrite_all(segment.data_fd, data, data_at)
            _pwrite_all(segment.index_fd, _RECORD.pack(offset, now, len(data), stream), index_at)
        except OSError:
            _truncate_quietly(segment.index_fd, index_at)
            _truncate_quietly(segment.data_fd, data_at)
            raise
        if not segment.records:
            segment.first_time = now
        segment.records += 1
        segment.end += len(data)
        self._size += len(data)
        self._last_time = now
        self._grow(segment.disk - before)
        return Chunk(stream, offset, now, data)

    def _roll(self) -> _Segment:
        """Start a new segment at the current end (the files may not be creatable: OSError)."""
        new = _Segment.create(self._dir, self._size)
        self._segments[-1].close_fds()
        self._segments.append(new)
        self._release_passed()
        return new

    def _grow(self, delta: int) -> None:
        self._disk += delta
        self._space._stored += delta

    def _lose(self, length: int, why: str) -> None:
        if not self._lost:
            log.warning(
                "job %s: its processes are gone and its remaining output cannot be stored "
                "(%s): it is not kept", self.job_id, why,
            )
        self._lost += length

    def _set_blocked(self, why: str) -> None:
        if why and not self._blocked:
            self._blocked_since = trio.current_time()
            log.warning(
                "job %s: output blocked: %s; the job waits on its pipe until there is room",
                self.job_id, why,
            )
        elif not why and self._blocked:
            log.info(
                "job %s: output resumed after %.1f s blocked",
                self.job_id, trio.current_time() - self._blocked_since,
            )
        self._blocked = why

    # ------------------------------------------------------------------- dropping

    def _droppable(self, keep: int) -> bool:
        """Whether the oldest segment can go, leaving at least `keep` bytes of the newest
        output. The writer's segment never goes; an ended job's last one may."""
        segments = self._segments
        if len(segments) > 1:
            return self._size - segments[1].base >= keep
        return self._closed and segments[0].disk > 0 and keep == 0

    def _drop_oldest(self) -> int:
        """Drop the oldest segment; returns the disk bytes freed. An ended job's last segment
        becomes an empty one at its end, so `start` and `size` survive a restart."""
        oldest = self._segments[0]
        freed = oldest.disk
        if oldest is self._reading:
            self._stop_reading()  # no descriptor may keep a dropped file's space
        paths = segment_paths(self._dir, oldest.base)
        if len(self._segments) > 1:
            for path in paths:
                path.unlink(missing_ok=True)
            self._segments.pop(0)
        else:
            # Truncate and rename rather than unlink and create: needs no free inode.
            new_paths = segment_paths(self._dir, oldest.end)
            for path, new in zip(paths, new_paths, strict=True):
                os.truncate(path, 0)
                os.rename(path, new)
            oldest.base, oldest.records, oldest.first_time = oldest.end, 0, math.inf
        self._grow(-freed)
        start = self.start
        while self._tail and self._tail[0].offset + len(self._tail[0].data) <= start:
            old = self._tail.popleft()
            self._tail_bytes -= len(old.data) + _ENTRY_OVERHEAD
        if self._tail and self._tail[0].offset < start:
            old = self._tail[0]
            cut = start - old.offset
            self._tail[0] = Chunk(old.stream, start, old.time, old.data[cut:])
            self._tail_bytes -= cut
        return freed

    def _remove(self) -> None:
        """Close and delete every file; open readers get NotFound on their next step."""
        if self._removed:
            return
        self._removed = True
        self.close()
        for segment in self._segments:
            for path in segment_paths(self._dir, segment.base):
                path.unlink(missing_ok=True)
        self._grow(-self._disk)
        try:
            self._dir.rmdir()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------- reading

    def read(
        self,
        offset: int = 0,
        *,
        follow: bool,
        tail_lines: int = 0,
        since: float | None = None,
        stream: Stream | None = None,
        max_chunk: int | Callable[[], int] = MAX_CHUNK,
        on_wait: Callable[[bool], None] | None = None,
    ) -> OutputReader:
        """Chunks from `offset` on, as an async iterator (`async for chunk in store.read(...)`).

        The first chunk may be cut so that it starts exactly at its offset; every chunk keeps
        the stream and time of the chunk written at its first byte. Adjacent chunks of one
        stream are merged up to `max_chunk` bytes; stdout and stderr never are. A callable
        `max_chunk` is asked before each chunk (a transport whose room changes per message).

        Where it starts is the latest of: `offset`; `start` (bytes dropped before it are
        gone); with `since` (Unix time), the first chunk written at or after it; with
        `tail_lines` N, the start of the last N lines kept (of `stream` when given; a final
        newline ends the last line rather than starting an empty one). Seeking reads only
        the index, and the data of those last lines: never the whole output.
        `stream`: only that stream's chunks (offsets stay those of the combined stream).
        `on_wait`, if given, is called with True before the reader waits for new output (the
        only wait of a step besides its yield to other tasks) and with False after it.

        follow=False: ends at the size the store has now (an offset beyond it yields nothing).
        follow=True: then waits for more (an offset beyond the end waits for it) and ends when
        the store is closed and everything was delivered. A follower that falls behind what
        is dropped jumps to `start`: the gap in offsets shows what it missed.
        """
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, not {offset}")
        if tail_lines < 0:
            raise InvalidArgument(f"tail_lines must be >= 0, not {tail_lines}")
        if since is not None and not math.isfinite(since):
            raise InvalidArgument(f"since must be a finite time, not {since}")
        if not callable(max_chunk) and max_chunk < 1:
            raise ValueError("max_chunk must be >= 1")
        position = offset
        if not self._removed:
            position = max(position, self.start)
            if since is not None:
                position = max(position, self._offset_at_time(since))
            if tail_lines:
                position = max(position, self._lines_start(tail_lines, stream))
        end = None if follow else self._size
        return OutputReader(self, position, end, stream, max_chunk, on_wait)

    def _remember(self, chunk: Chunk) -> None:
        # Keeps the tail contiguous up to `_size` (readers trust that): a chunk bigger than the
        # whole tail replaces it by its own suffix.
        room = self._memory_tail - _ENTRY_OVERHEAD
        if room <= 0:
            return  # too small for any entry: the tail stays empty, readers use the files
        if len(chunk.data) > room:
            cut = len(chunk.data) - room
            chunk = Chunk(chunk.stream, chunk.offset + cut, chunk.time, chunk.data[cut:])
            self._tail.clear()
            self._tail_bytes = 0
        cost = len(chunk.data) + _ENTRY_OVERHEAD
        while self._tail_bytes + cost > self._memory_tail:
            old = self._tail.popleft()
            self._tail_bytes -= len(old.data) + _ENTRY_OVERHEAD
        self._tail.append(chunk)
        self._tail_bytes += cost

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def _check_present(self) -> None:
        if self._removed:
            raise NotFound(f"the output of job {self.job_id} was removed")

    @contextmanager
    def _files(self, segment: _Segment) -> Iterator[tuple[int, int]]:
        """(data fd, index fd) of a segment for one step: the writer's own, the one kept for
        followers of a running job, or opened now and closed at the end of the step."""
        if segment.data_fd < 0 and not self._closed:
            if self._reading is not segment:
                self._stop_reading()
                segment.data_fd, segment.index_fd = self._open_segment(segment)
                self._reading = segment
        if segment.data_fd >= 0:
            yield segment.data_fd, segment.index_fd
            return
        data_fd, index_fd = self._open_segment(segment)
        try:
            yield data_fd, index_fd
        finally:
            os.close(data_fd)
            os.close(index_fd)

    def _open_segment(self, segment: _Segment) -> tuple[int, int]:
        name = f"{self._prefix}{segment.base:020d}"
        data_fd = os.open(name + ".out", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return data_fd, os.open(name + ".idx", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(data_fd)
            raise

    def _stop_reading(self) -> None:
        if self._reading is not None:
            self._reading.close_fds()
            self._reading = None

    def _add_reader(self, reader: OutputReader) -> None:
        if self._readers is None:
            self._readers = weakref.WeakSet()
        self._readers.add(reader)

    def _reader_done(self, reader: OutputReader) -> None:
        if self._readers is not None:
            self._readers.discard(reader)
            if not self._readers:
                self._readers = None
            self._release_passed()

    def _release_passed(self) -> None:
        """Hand back the pages of the segments that no one may read soon: behind the writer's
        newest (every segment once closed) and behind every unfinished reader."""
        if self._removed:
            return
        upto = self._size if self._closed else self._segments[-1].base
        if self._readers:
            upto = min(upto, min(r.offset for r in self._readers))
        self._released = max(self._released, self.start)  # (dropped output is unlinked)
        if upto <= self._released:
            return
        paths: list[str] = []
        for segment in self._segments[self._segment_at(self._released) :]:
            if segment.end > upto or segment.end == segment.base:
                break
            if segment.end > self._released:
                name = f"{self._prefix}{segment.base:020d}"
                paths += (name + ".out", name + ".idx")
                self._released = segment.end
        if paths:
            _page_cache.release(paths)

    def _segment_at(self, pos: int) -> int:
        return bisect.bisect_right(self._segments, pos, key=_base_of) - 1

    def _chunk_at(
        self, pos: int, limit: int, max_chunk: int, hint: tuple[int, int], want: Stream | None
    ) -> tuple[Chunk | None, int, tuple[int, int]]:
        """The chunk starting at `pos` (start <= pos < limit <= size), merged up to `limit` and
        `max_chunk`; None (not read) when it is of another stream than `want`.

        Returns it, where it ends, and (segment base, index record) of the first byte after
        it: the reader passes that back as `hint`, which spares a sequential replay a binary
        search per chunk.
        """
        limit = min(limit, pos + max_chunk)
        if self._tail and pos >= self._tail[0].offset:
            chunk = self._chunk_from_tail(pos, limit)
            end = pos + len(chunk.data)
            return (chunk if want in (None, chunk.stream) else None), end, hint
        segment = self._segments[self._segment_at(pos)]
        limit = min(limit, segment.end)
        with self._files(segment) as (data_fd, index_fd):
            i = hint[1] if hint[0] == segment.base else -1
            if not self._record_holds(segment, index_fd, i, pos):
                i = self._find_record(segment, index_fd, pos)
            count = min(_RECORD_BATCH, segment.records - i)
            raw = _pread_exact(index_fd, count * _RECORD.size, i * _RECORD.size)
            records = list(_RECORD.iter_unpack(raw))
            _, first_time, _, first_stream = records[0]
            end = pos
            next_record = i
            for offset, _, length, stream in records:
                if stream != first_stream or end >= limit:
                    break
                end = min(offset + length, limit)
                if end < offset + length:
                    break  # cut inside this record: the next chunk starts in it
                next_record += 1
            if want is not None and first_stream != want:
                return None, end, (segment.base, next_record)
            data = _pread_exact(data_fd, end - pos, pos - segment.base)
        return Chunk(Stream(first_stream), pos, first_time, data), end, (segment.base, next_record)

    def _chunk_from_tail(self, pos: int, limit: int) -> Chunk:
        tail = self._tail
        i = bisect.bisect_right(tail, pos, key=_offset_of) - 1
        first = tail[i]
        pieces: list[bytes] = []
        end = pos
        while i < len(tail) and end < limit:
            entry = tail[i]
            if entry.stream is not first.stream:
                break
            stop = min(entry.offset + len(entry.data), limit)
            pieces.append(entry.data[end - entry.offset : stop - entry.offset])
            end = stop
            i += 1
        return Chunk(first.stream, pos, first.time, b"".join(pieces))

    @staticmethod
    def _record_holds(segment: _Segment, index_fd: int, i: int, pos: int) -> bool:
        if not 0 <= i < segment.records:
            return False
        offset, _, length, _ = _read_record(index_fd, i)
        return bool(offset <= pos < offset + length)

    @staticmethod
    def _find_record(segment: _Segment, index_fd: int, pos: int) -> int:
        # The last record starting at or before `pos`; records are in offset order, none empty.
        lo, hi = 0, segment.records - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _read_record(index_fd, mid)[0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _offset_at_time(self, since: float) -> int:
        """The offset of the first chunk kept that was written at or after `since` (`size`
        when none was): a binary search over segments, then over one segment's index."""
        segments = self._segments
        # The first segment whose first record is at/after `since` (empty ones count as inf).
        j = bisect.bisect_left(segments, since, key=_first_time_of)
        if j == 0:
            return self.start
        segment = segments[j - 1]
        if not segment.records:
            return segment.end
        with self._files(segment) as (_, index_fd):
            lo, hi = 0, segment.records  # first record with time >= since, in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if _read_record(index_fd, mid)[1] < since:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == segment.records:
                return segment.end
            return int(_read_record(index_fd, lo)[0])

    def _lines_start(self, lines: int, want: Stream | None) -> int:
        """Where the last `lines` lines kept begin (of `want` only, when given): scans back
        from the end, reading index batches and only the data of records it counts in, at
        most TAIL_SCAN_LIMIT bytes in all (then it starts where the scan stopped)."""
        final = True  # the very last byte: a newline there ends the last line
        budget = TAIL_SCAN_LIMIT
        for segment in reversed(self._segments):
            if not segment.records:
                continue
            with self._files(segment) as (data_fd, index_fd):
                upto = segment.records
                while upto > 0:
                    first = max(0, upto - _RECORD_BATCH)
                    raw = _pread_exact(
                        index_fd, (upto - first) * _RECORD.size, first * _RECORD.size
                    )
                    budget -= len(raw)
                    for offset, _, length, stream in reversed(list(_RECORD.iter_unpack(raw))):
                        if budget <= 0:
                            return int(offset + length)
                        if want is not None and stream != want:
                            continue
                        end = offset + length
                        while end > offset:
                            if budget <= 0:
                                return int(end)
                            begin = max(offset, end - _SCAN_BLOCK)
                            budget -= end - begin
                            block = _pread_exact(data_fd, end - begin, begin - segment.base)
                            at = len(block)
                            if final:
                                final = False
                                if block.endswith(b"\n"):
                                    at -= 1
                            while (at := block.rfind(b"\n", 0, at)) >= 0:
                                lines -= 1
                                if not lines:
                                    return int(begin + at + 1)
                            end = begin
                    upto = first
        return self.start


def _read_record(index_fd: int, i: int) -> tuple[int, float, int, int]:
    raw = _pread_exact(index_fd, _RECORD.size, i * _RECORD.size)
    offset, when, length, stream = _RECORD.unpack(raw)
    return offset, when, length, stream


class OutputReader:
    """One reader's position in an OutputStore; made by `OutputStore.read()`.

    Holds no data and no file; the store refers to it only weakly, until it finishes (see
    "Page cache" in the module's doc): dropping it, cancelling it or calling `aclose()`
    leaves nothing behind. Each step is a checkpoint; a step that is cancelled loses nothing
    (the position moves only when a chunk is returned).
    """

    def __init__(
        self,
        store: OutputStore,
        offset: int,
        end: int | None,
        stream: Stream | None,
        max_chunk: int | Callable[[], int],
        on_wait: Callable[[bool], None] | None = None,
    ) -> None:
        self._store = store
        self._on_wait = on_wait
        self._pos = offset
        self._end = end  # None: follow
        self._stream = stream
        self._max_chunk = max_chunk
        self._hint = (-1, 0)
        self._done = False
        store._add_reader(self)

    @property
    def offset(self) -> int:
        """The offset of the next byte this reader will deliver (or skip)."""
        return self._pos

    def __aiter__(self) -> OutputReader:
        return self

    def _chunk_limit(self) -> int:
        limit = self._max_chunk
        return max(1, limit() if callable(limit) else limit)

    async def __anext__(self) -> Chunk:
        store = self._store
        while not self._done:
            limit = store.size if self._end is None else min(self._end, store.size)
            if store._complete and self._pos >= limit:
                # Everything was delivered: end cleanly, even if the files are gone by now.
                self._done = True
                break
            store._check_present()
            if self._pos < limit:
                # Replay never waits on anything, so let other tasks (and cancellation) in
                # before each chunk. After it, recheck: the output may have been removed or its
                # oldest part dropped meanwhile (then the reader resumes at what is kept).
                await trio.lowlevel.checkpoint()
                store._check_present()
                self._pos = max(self._pos, store.start)
                if self._pos >= limit:
                    continue
                chunk, self._pos, self._hint = store._chunk_at(
                    self._pos, limit, self._chunk_limit(), self._hint, self._stream
                )
                if chunk is not None:
                    return chunk
                continue  # a chunk of the other stream: skipped
            if self._end is not None or store.closed:
                self._done = True
                break
            if self._on_wait is None:
                await store._wait_for_change()
                continue
            self._on_wait(True)
            try:
                await store._wait_for_change()
            finally:
                self._on_wait(False)
        store._reader_done(self)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading; the iterator ends. (It holds nothing, so this only marks it done.)"""
        self._done = True
        self._store._reader_done(self)
        await trio.lowlevel.checkpoint()


class _PageCache:
    """Hands files' pages back to the kernel: each file written back (so that its pages are
    clean) and then advised `POSIX_FADV_DONTNEED`, one file after another in one worker
    thread at a time (trio's thread cache), so the event loop only queues paths. A file gone
    meanwhile (removed output) is skipped; an error only costs the pages staying cached.

    Written back with sync_file_range(2), which starts and waits for the data's writeback
    without a journal commit (fdatasync's, which every SQLite commit of the job records would
    then queue behind); without it (not glibc), fdatasync."""

    _WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[str] = collections.deque()
        self._running = False
        self.idle = threading.Event()  # set while nothing is queued or being handed back
        self.idle.set()
        try:
            sync = ctypes.CDLL(None, use_errno=True).sync_file_range
        except (AttributeError, OSError):
            self._sync: Callable[[int], None] = os.fdatasync
        else:
            sync.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

            def sync_range(fd: int) -> None:
                if sync(fd, 0, 0, self._WAIT_BEFORE | self._WRITE | self._WAIT_AFTER) != 0:
                    raise OSError(ctypes.get_errno(), "sync_file_range")

            self._sync = sync_range

    def release(self, paths: list[str]) -> None:
        with self._lock:
            self._queue.extend(paths)
            self.idle.clear()
            if self._running:
                return
            self._running = True
        trio.lowlevel.start_thread_soon(self._drain, _log_failure)

    def _drain(self) -> None:
        finished = False
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._running = False
                        self.idle.set()
                        finished = True
                        return
                    path = self._queue.popleft()
                self._hand_back(path)
        finally:
            if not finished:  # an unexpected error: the rest waits for the next release
                with self._lock:
                    self._running = False

    def _hand_back(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # removed meanwhile
        try:
            self._sync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.debug("%s: its pages stay cached (%s)", path, exc)
        finally:
            os.close(fd)


def _log_failure(result: Any) -> None:  # an outcome.Outcome, from trio's thread cache
    try:
        result.unwrap()
    except BaseException:
        log.exception("handing output pages back to the kernel failed")


_page_cache = _PageCache()


def _base_of(segment: _Segment) -> int:
    return segment.base


def _first_time_of(segment: _Segment) -> float:
    return segment.first_time


def _offset_of(chunk: Chunk) -> int:
    return chunk.offset


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # the next write at this offset overwrites it anyway; recovery cuts it


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    # A regular file may take fewer bytes than offered (e.g. interrupted near a quota).
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise OSError(f"output file ends at {offset + got}, expected {offset + size} bytes")
        parts.append(more)
        got += len(more)
    return b"".join(parts)
