"""The output of one job: spilled losslessly to two files, a bounded tail kept in memory, and
readers that replay from any offset then follow live. Imports only the standard library and
trio (no gRPC, protobuf or anyio): the server adapts `Chunk`s to the API.

Theory of operation
-------------------
The writer (the task pumping a job's pipes) calls `write()`, which is synchronous and never
waits for readers: it appends to two files and wakes any parked followers.

- `<name>.out` holds the raw bytes of the combined stream; file position == stream offset.
- `<name>.idx` holds one fixed-size record per write: (offset, time, length, stream). Record i
  is at i * 32, so the chunk containing an offset is a binary search with `os.pread`; nothing
  per chunk stays in memory.
- A tail of the most recent chunks (at most `memory_tail` bytes, per-entry overhead counted)
  lets live followers be served without touching the disk.

A reader is only a position: it pulls at its own pace from the tail or the files and, when it
has caught up, parks on one `trio.Event` shared by every follower. So a stalled reader costs
nothing, never blocks the writer nor other readers, and cancelling it leaves nothing behind.
Memory per job is therefore ~`memory_tail` plus a constant, whatever the job prints.
"""

from __future__ import annotations

import bisect
import collections
import os
import pathlib
import struct
import time
from dataclasses import dataclass

import trio

from ._errors import InvalidArgument, NotFound
from ._types import Chunk, Stream

# A chunk handed to a reader is at most this big: adjacent same-stream chunks are merged up to
# it (a job printing line by line would otherwise cost a message per line), larger ones split.
MAX_CHUNK = 1024 * 1024  # perf (issue 12): 1 MiB messages, until readers take it as a parameter

# offset, time, length, stream; padded to 32 bytes so that records are aligned and the length
# has room for any single write.
_RECORD = struct.Struct("<QdQB7x")

# Index records read in one disk step while merging chunks: bounds the index bytes read (4 KiB)
# for one output chunk when a job wrote a byte at a time.
_RECORD_BATCH = 128

# What one tail entry costs besides its data (Chunk object, int, float and bytes headers, a
# list slot). Counted against `memory_tail`, so that a job printing one byte at a time cannot
# grow the tail past its bound by the number of entries.
_ENTRY_OVERHEAD = 200

# The clock chunks are stamped with (Unix time); a module global so that tests can replace it.
_now = time.time


@dataclass(frozen=True, slots=True)
class OutputStatistics:
    """A snapshot of one store, for tests and metrics."""

    size: int  # bytes written
    chunks: int  # writes recorded (index records)
    memory_bytes: int  # held by the in-memory tail, overhead included; <= memory_tail
    readers_waiting: int  # followers parked until more output arrives or the store closes


class OutputStore:
    """The lossless, multicast output of one job.

    Synopsis::

        store = OutputStore(data_dir, job_id)
        store.write(Stream.STDOUT, b"hello\\n")    # from the job's pipe pump; never blocks
        store.close()                              # end of output: followers finish
        async for chunk in store.read(offset, follow=True):
            ...
        store.remove()                             # when the job is forgotten, or at shutdown

    Files are created with mode 0o600 (a job must not read other jobs' output) and must not
    exist yet. Call every method from the trio thread. The store keeps two file descriptors
    open until `remove()`.
    """

    def __init__(
        self, directory: pathlib.Path, name: str, *, memory_tail: int = 256 * 1024
    ) -> None:
        if not name or pathlib.PurePath(name).name != name or name in (".", ".."):
            raise ValueError(f"output name must be a plain file name, not {name!r}")
        if memory_tail < 0:
            raise ValueError("memory_tail must be >= 0")
        self._paths = (directory / f"{name}.out", directory / f"{name}.idx")
        # O_EXCL: two stores on one file would silently interleave two jobs' output.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._data_fd = os.open(self._paths[0], flags, 0o600)
        try:
            self._index_fd = os.open(self._paths[1], flags, 0o600)
        except BaseException:
            os.close(self._data_fd)
            self._paths[0].unlink(missing_ok=True)
            raise
        self._memory_tail = memory_tail
        self._size = 0
        self._records = 0
        self._closed = False
        self._complete = False  # closed by its writer, not cut short by remove()
        self._removed = False
        # The tail: contiguous chunks ending at `_size`, oldest first. A deque, so eviction
        # frees at once; bisecting it is cheap since the overhead charge bounds its length
        # (memory_tail / _ENTRY_OVERHEAD entries).
        self._tail: collections.deque[Chunk] = collections.deque()
        self._tail_bytes = 0
        # Created by the first follower that parks, set and dropped by the next write or close:
        # a write costs nothing when nobody waits, and one set() wakes every follower.
        self._changed: trio.Event | None = None

    @property
    def size(self) -> int:
        """Total bytes written (the offset the next byte will have)."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> OutputStatistics:
        waiting = 0 if self._changed is None else self._changed.statistics().tasks_waiting
        return OutputStatistics(self._size, self._records, self._tail_bytes, waiting)

    def write(self, stream: Stream, data: bytes) -> None:
        """Append `data` as one chunk of `stream`. Never waits for readers.

        An OSError (disk full) propagates and leaves the store as it was: nothing of this
        chunk is recorded, and the next write overwrites whatever part of it reached the file.
        """
        if self._closed:
            raise RuntimeError("output store is closed; nothing more can be written")
        if not data:
            return
        data = bytes(data)  # the tail keeps it: it must not change under us
        offset = self._size
        now = _now()
        # pwrite at our own offsets rather than O_APPEND, so a failed write cannot shift every
        # later byte off its offset.
        _pwrite_all(self._data_fd, data, offset)
        record = _RECORD.pack(offset, now, len(data), int(stream))
        _pwrite_all(self._index_fd, record, self._records * _RECORD.size)
        self._size += len(data)
        self._records += 1
        self._remember(Chunk(stream, offset, now, data))
        self._wake()

    def close(self) -> None:
        """Mark the end of output. Followers end once they have delivered everything."""
        if not self._closed:
            self._closed = True
            self._complete = not self._removed
            self._wake()

    def remove(self) -> None:
        """Close the store and delete its files. Idempotent.

        Meant for when no one reads any more (the job is forgotten) or at shutdown; a reader
        still open afterwards raises NotFound on its next step rather than end as if the
        output were complete.
        """
        if self._removed:
            return
        self._removed = True
        self.close()
        self._tail.clear()
        self._tail_bytes = 0
        os.close(self._data_fd)
        os.close(self._index_fd)
        # -1 rather than the stale numbers: the kernel may hand them to another file.
        self._data_fd = self._index_fd = -1
        for path in self._paths:
            path.unlink(missing_ok=True)

    def read(self, offset: int = 0, *, follow: bool) -> OutputReader:
        """Chunks from `offset` on, as an async iterator (`async for chunk in store.read(...)`).

        The first chunk may be cut so that it starts exactly at `offset`; every chunk keeps
        the stream and time of the chunk written at its first byte. Adjacent chunks of one
        stream are merged up to MAX_CHUNK bytes; stdout and stderr never are.

        follow=False: ends at the size the store has now (an offset beyond it yields nothing).
        follow=True: then waits for more (an offset beyond the end waits for it) and ends when
        the store is closed and everything was delivered.
        """
        if offset < 0:
            raise InvalidArgument("offset must be >= 0")
        return OutputReader(self, offset, None if follow else self._size)

    # -- internals used by OutputReader ----------------------------------------------------

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
            raise NotFound("this job's output was removed")

    def _chunk_at(self, pos: int, limit: int, hint: int) -> tuple[Chunk, int]:
        """The chunk starting at `pos` (< limit <= size), merged up to `limit` and MAX_CHUNK.

        Also returns the index record that holds the first byte after it: the reader passes
        it back as `hint`, which spares a sequential replay a binary search per chunk.
        """
        limit = min(limit, pos + MAX_CHUNK)
        if self._tail and pos >= self._tail[0].offset:
            return self._chunk_from_tail(pos, limit), hint
        return self._chunk_from_files(pos, limit, hint)

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

    def _chunk_from_files(self, pos: int, limit: int, hint: int) -> tuple[Chunk, int]:
        i = hint if self._record_holds(hint, pos) else self._find_record(pos)
        count = min(_RECORD_BATCH, self._records - i)
        raw = _pread_exact(self._index_fd, count * _RECORD.size, i * _RECORD.size)
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
        data = _pread_exact(self._data_fd, end - pos, pos)
        return Chunk(Stream(first_stream), pos, first_time, data), next_record

    def _record_holds(self, i: int, pos: int) -> bool:
        if not 0 <= i < self._records:
            return False
        offset, _, length, _ = self._read_record(i)
        return bool(offset <= pos < offset + length)

    def _find_record(self, pos: int) -> int:
        # The last record starting at or before `pos`; records are in offset order, none empty.
        lo, hi = 0, self._records - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._read_record(mid)[0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _read_record(self, i: int) -> tuple[int, float, int, int]:
        raw = _pread_exact(self._index_fd, _RECORD.size, i * _RECORD.size)
        offset, when, length, stream = _RECORD.unpack(raw)
        return offset, when, length, stream


class OutputReader:
    """One reader's position in an OutputStore; made by `OutputStore.read()`.

    Holds no data and no registration in the store: dropping it, cancelling it or calling
    `aclose()` leaves nothing behind. Each step is a checkpoint; a step that is cancelled
    loses nothing (the position moves only when a chunk is returned).
    """

    def __init__(self, store: OutputStore, offset: int, end: int | None) -> None:
        self._store = store
        self._pos = offset
        self._end = end  # None: follow
        self._hint = 0
        self._done = False

    @property
    def offset(self) -> int:
        """The offset of the next byte this reader will deliver."""
        return self._pos

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> Chunk:
        store = self._store
        while not self._done:
            limit = store.size if self._end is None else min(self._end, store.size)
            if store._complete and self._pos >= limit:
                # Everything was delivered: end cleanly, even if the files are gone by now
                # (a manager shutting down removes them right after closing).
                self._done = True
                break
            store._check_present()
            if self._pos < limit:
                # Replay never waits on anything, so let other tasks (and cancellation) in
                # before each chunk. After it, recheck: remove() may have run meanwhile.
                await trio.lowlevel.checkpoint()
                store._check_present()
                chunk, self._hint = store._chunk_at(self._pos, limit, self._hint)
                self._pos += len(chunk.data)
                return chunk
            if self._end is not None or store.closed:
                self._done = True
                break
            await store._wait_for_change()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading; the iterator ends. (It holds nothing, so this only marks it done.)"""
        self._done = True
        await trio.lowlevel.checkpoint()


def _offset_of(chunk: Chunk) -> int:
    return chunk.offset


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
