"""OutputStore: lossless replay from any offset, live multicast, bounded memory.
(The bounds across jobs, full disks and restarts: tests/test_retention.py.)"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import itertools
import mmap
import os
import pathlib
import random
import tempfile
import tracemalloc
import weakref
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd.engine import _output
from jobd.engine._errors import InvalidArgument, NotFound
from jobd.engine._output import MAX_CHUNK, OutputReader, OutputStore
from jobd.engine._retention import OutputSpace
from jobd.engine._types import Chunk, Stream

OUT, ERR = Stream.STDOUT, Stream.STDERR


@pytest.fixture
def clock() -> Iterator[itertools.count[int]]:
    """Stamps chunk i with time i, so tests can tell which write a chunk's time came from."""
    ticks = itertools.count()
    with mock.patch.object(_output, "_now", lambda: float(next(ticks))):
        yield ticks


class Model:
    """What was written, byte by byte: the expected stream and time of every offset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.streams: list[Stream] = []
        self.times: list[float] = []

    async def write(self, store: OutputStore, stream: Stream, data: bytes) -> None:
        await store.write(stream, data)
        # Under the `clock` fixture (or the like), write number n is stamped with time n.
        time = float(store.statistics().chunks - 1)
        self.data += data
        self.streams += [stream] * len(data)
        self.times += [time] * len(data)

    def check(self, chunks: list[Chunk], start: int, *, times: bool = True) -> None:
        """Chunks are contiguous from `start`, byte-exact, labelled with the right stream,
        stamped with the time of the write holding their first byte, and never oversized."""
        assert b"".join(c.data for c in chunks) == self.data[start:]
        offset = start
        for c in chunks:
            assert c.offset == offset
            assert 0 < len(c.data) <= MAX_CHUNK
            assert set(self.streams[c.offset : c.offset + len(c.data)]) == {c.stream}
            if times:
                assert c.time == self.times[c.offset]
            offset += len(c.data)


async def collect(reader: OutputReader) -> list[Chunk]:
    return [chunk async for chunk in reader]


def files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def make_store(tmp_path: pathlib.Path, memory_tail: int = 256 * 1024) -> OutputStore:
    """A store in a space without bounds (they are tested in test_retention.py)."""
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, memory_tail=memory_tail)
    return space.create("job")


def remove(store: OutputStore) -> None:
    store._space.remove(store.job_id)


def segment_file(tmp_path: pathlib.Path, base: int = 0, suffix: str = "out") -> pathlib.Path:
    return tmp_path / "job" / f"{base:020d}.{suffix}"


async def test_replay_is_byte_exact_with_offsets_streams_and_times(
    tmp_path: pathlib.Path, clock: itertools.count[int]
) -> None:
    store = make_store(tmp_path, memory_tail=0)  # everything from the files
    await store.write(OUT, b"hello ")
    await store.write(OUT, b"world\n")
    await store.write(ERR, b"oops\n")
    await store.write(OUT, b"")  # ignored: no chunk, no time stamp
    await store.write(OUT, b"bye\n")
    assert store.size == 21
    assert store.statistics().chunks == 4

    chunks = await collect(store.read(0, follow=False))
    # Same-stream neighbours merge (keeping the first one's time); streams never do.
    assert chunks == [
        Chunk(OUT, 0, 0.0, b"hello world\n"),
        Chunk(ERR, 12, 2.0, b"oops\n"),
        Chunk(OUT, 17, 3.0, b"bye\n"),
    ]
    # Mid-chunk: cut to start at the offset, with the time of the write holding that byte.
    assert await collect(store.read(8, follow=False)) == [
        Chunk(OUT, 8, 1.0, b"rld\n"),
        Chunk(ERR, 12, 2.0, b"oops\n"),
        Chunk(OUT, 17, 3.0, b"bye\n"),
    ]
    assert segment_file(tmp_path).read_bytes() == b"hello world\noops\nbye\n"
    remove(store)


@pytest.mark.parametrize("memory_tail", [0, 1000, 256 * 1024])
async def test_resume_from_arbitrary_offsets(tmp_path: pathlib.Path, memory_tail: int) -> None:
    rng = random.Random(memory_tail)
    store = make_store(tmp_path, memory_tail)
    model = Model()
    boundaries = []
    for _ in range(300):
        boundaries.append(store.size)
        await model.write(store, rng.choice([OUT, ERR]), rng.randbytes(rng.choice([1, 3, 17, 500])))
    # Every chunk boundary and its neighbours (mid-chunk), the end, and random offsets.
    starts = {b + d for b in boundaries for d in (-1, 0, 1) if b + d >= 0}
    starts |= {store.size, *(rng.randrange(store.size) for _ in range(100))}
    for start in sorted(starts):
        model.check(await collect(store.read(start, follow=False)), start, times=False)
    remove(store)


async def test_large_writes_are_split_and_small_ones_merged(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path, memory_tail=0)
    model = Model()
    await model.write(store, OUT, bytes(3 * MAX_CHUNK + 5))  # larger than one chunk
    for _ in range(1000):  # many tiny writes: more than one index batch
        await model.write(store, ERR, b"x")
    chunks = await collect(store.read(0, follow=False))
    model.check(chunks, 0, times=False)
    assert [len(c.data) for c in chunks][:4] == [MAX_CHUNK] * 3 + [5]
    assert len(chunks) < 4 + 1000 // 100
    remove(store)


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(st.tuples(st.sampled_from([OUT, ERR]), st.binary(max_size=300)), max_size=60),
    memory_tail=st.sampled_from([0, 250, 600, 4096]),
    start=st.integers(min_value=0, max_value=20000),
)
async def test_replay_matches_model(
    writes: list[tuple[Stream, bytes]], memory_tail: int, start: int
) -> None:
    ticks = itertools.count()
    with (
        tempfile.TemporaryDirectory() as directory,
        mock.patch.object(_output, "_now", lambda: float(next(ticks))),
    ):
        store = make_store(pathlib.Path(directory), memory_tail)
        model = Model()
        for stream, data in writes:
            await model.write(store, stream, data)
        start = min(start, store.size)
        model.check(await collect(store.read(start, follow=False)), start)
        assert store.statistics().memory_bytes <= memory_tail
        remove(store)


async def test_followers_get_everything_while_one_stalls(tmp_path: pathlib.Path) -> None:
    memory_tail = 16 * 1024
    store = make_store(tmp_path, memory_tail)
    model = Model()
    rng = random.Random(1)
    received: dict[str, list[Chunk]] = {}
    stalled = trio.Event()
    resume = trio.Event()

    async def follow(name: str, offset: int = 0) -> None:
        received[name] = []
        async for chunk in store.read(offset, follow=True):
            received[name].append(chunk)
            if name == "slow" and not resume.is_set():
                stalled.set()
                await resume.wait()  # stops pulling: a reader that has gone quiet

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, "early")  # before any data
        await trio.testing.wait_all_tasks_blocked()
        assert store.statistics().readers_waiting == 1
        await model.write(store, OUT, b"first\n")
        nursery.start_soon(follow, "slow")
        nursery.start_soon(follow, "fast")
        nursery.start_soon(follow, "late", 3)
        await stalled.wait()
        # Write 40x the tail while "slow" sleeps; with room on disk write() never waits (not
        # even a checkpoint), so it cannot block on anyone. Let the others run now and then,
        # so they read both live and from disk.
        for i in range(2000):
            await model.write(store, rng.choice([OUT, ERR]), rng.randbytes(rng.randrange(1, 700)))
            if i % 300 == 0:
                await trio.testing.wait_all_tasks_blocked()
        assert store.size > 40 * memory_tail
        await trio.testing.wait_all_tasks_blocked()
        for name in ("early", "fast"):
            model.check(received[name], 0, times=False)
        model.check(received["late"], 3, times=False)
        assert b"".join(c.data for c in received["slow"]) == b"first\n"
        assert store.statistics().memory_bytes <= memory_tail
        resume.set()  # the stalled reader catches up from the files
        await trio.testing.wait_all_tasks_blocked()
        model.check(received["slow"], 0, times=False)
        store.close()  # every follower ends once it has delivered everything
    remove(store)


async def test_follow_waits_beyond_the_end_and_close_ends_it(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    await store.write(OUT, b"abc")
    got: list[Chunk] = []

    async def follow() -> None:
        got.extend(await collect(store.read(5, follow=True)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        await store.write(ERR, b"de")  # up to offset 5: still nothing for this reader
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await store.write(ERR, b"fgh")
        store.close()
    assert [(c.offset, c.data) for c in got] == [(5, b"fgh")]
    remove(store)


async def test_a_follower_says_when_it_waits_for_new_output_and_only_then(
    tmp_path: pathlib.Path,
) -> None:
    """`on_wait` (the transport's: a message being made counts against its connection's room,
    one waited for does not) is called with True before each wait for new output and False
    after it, also when the wait is cancelled; never around a replay's steps."""
    store = make_store(tmp_path, memory_tail=0)
    await store.write(OUT, b"x" * 10_000)
    said: list[bool] = []
    reader = store.read(0, follow=True, max_chunk=1000, on_wait=said.append)
    assert len((await reader.__anext__()).data) == 1000
    got = 1000
    while got < 10_000:
        got += len((await reader.__anext__()).data)
    assert said == []  # replayed without waiting
    async with trio.open_nursery() as nursery:

        async def next_chunk() -> None:
            assert (await reader.__anext__()).data == b"more"

        nursery.start_soon(next_chunk)
        await trio.testing.wait_all_tasks_blocked()
        assert said == [True]
        await store.write(OUT, b"more")
    assert said == [True, False]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.__anext__)
        await trio.testing.wait_all_tasks_blocked()
        assert said == [True, False, True]
        nursery.cancel_scope.cancel()  # the wait is cancelled
    assert said == [True, False, True, False]
    store.close()
    assert [c async for c in reader] == [] and said == [True, False, True, False]
    remove(store)


async def test_follow_false_ends_at_the_current_end(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    await store.write(OUT, b"one\n")
    reader = store.read(0, follow=False)
    await store.write(ERR, b"two\n")  # after read(): not part of this reading
    assert [c.data for c in await collect(reader)] == [b"one\n"]
    assert [c.data for c in await collect(store.read(0, follow=False))] == [b"one\n", b"two\n"]
    assert await collect(store.read(8, follow=False)) == []  # at the end
    assert await collect(store.read(100, follow=False)) == []  # beyond it
    remove(store)


async def test_followers_of_a_closed_store_end(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    await store.write(OUT, b"done")
    store.close()
    store.close()  # idempotent
    assert store.closed
    assert [c.data for c in await collect(store.read(0, follow=True))] == [b"done"]
    assert await collect(store.read(10, follow=True)) == []
    with pytest.raises(RuntimeError, match="closed"):
        await store.write(OUT, b"more")
    remove(store)


async def test_memory_stays_bounded(tmp_path: pathlib.Path) -> None:
    memory_tail = 64 * 1024
    store = make_store(tmp_path, memory_tail)
    rng = random.Random(2)
    pool = rng.randbytes(1 << 20)
    # Mostly tiny writes (the per-entry overhead is what could escape the bound), some
    # larger than the whole tail.
    sizes = rng.choices([1, 2, 10, 100, 1000, 70_000, 300_000], [30, 20, 20, 20, 9, 1, 1], k=60_000)
    sizes += [rng.randrange(2, 10) for _ in range(20_000)]  # end with a tail of tiny entries
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for size in sizes:
            start = rng.randrange(len(pool) - size)
            await store.write(rng.choice([OUT, ERR]), pool[start : start + size])
            assert store.statistics().memory_bytes <= memory_tail
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The tail's estimate of per-entry overhead is honest: what the store really holds after
    # many MiB is its bound plus a small constant (the list of entries, the last chunk).
    assert grown < memory_tail + 16 * 1024
    remove(store)


async def test_cancelled_and_closed_readers_leave_nothing(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    await store.write(OUT, b"x" * 10)
    reader = store.read(0, follow=True)
    refs = [weakref.ref(reader)]

    with trio.CancelScope() as scope:
        async for _ in reader:
            scope.cancel()  # the next step (a wait for more output) is cancelled
    assert scope.cancelled_caught
    assert reader.offset == 10  # nothing lost: it resumes after what it delivered
    assert store.statistics().readers_waiting == 0

    other = store.read(0, follow=True)
    refs.append(weakref.ref(other))
    assert (await other.__anext__()).data == b"x" * 10
    await other.aclose()
    assert await collect(other) == []

    async with trio.open_nursery() as nursery:  # cancelled while parked
        nursery.start_soon(collect, store.read(10, follow=True))
        await trio.testing.wait_all_tasks_blocked()
        assert store.statistics().readers_waiting == 1
        nursery.cancel_scope.cancel()
    assert store.statistics().readers_waiting == 0

    del reader, other
    gc.collect()
    assert all(ref() is None for ref in refs)
    await store.write(OUT, b"y")  # and the writer is unaffected
    remove(store)


async def test_negative_offset_is_rejected(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    for follow in (False, True):
        with pytest.raises(InvalidArgument, match="offset must be >= 0"):
            store.read(-1, follow=follow)
    remove(store)


async def test_remove_deletes_files_and_fails_open_readers(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    await store.write(OUT, b"data")
    assert files(tmp_path / "job") == [f"{0:020d}.idx", f"{0:020d}.out"]
    reader = store.read(0, follow=True)
    remove(store)
    remove(store)  # idempotent
    assert files(tmp_path) == []
    assert store.closed
    with pytest.raises(NotFound, match="removed"):
        await reader.__anext__()


async def test_remove_wakes_a_parked_follower(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    with pytest.RaisesGroup(pytest.RaisesExc(NotFound, match="removed")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, store.read(0, follow=True))
            await trio.testing.wait_all_tasks_blocked()
            remove(store)


def test_files_are_private_and_never_shared(tmp_path: pathlib.Path) -> None:
    store = make_store(tmp_path)
    assert segment_file(tmp_path).stat().st_mode & 0o777 == 0o600
    assert segment_file(tmp_path, suffix="idx").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "job").stat().st_mode & 0o777 == 0o700
    with pytest.raises(FileExistsError):
        make_store(tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        store._space.create("../job")
    remove(store)


# ----------------------------------------------------------------- write_from (a pipe read)


def pipe_with(data: bytes) -> tuple[int, int]:
    """A nonblocking pipe (as the pump's) already holding `data`: (read end, write end)."""
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ, as the shim's pipes
    os.set_blocking(r, False)
    assert os.write(w, data) == len(data)
    return r, w


async def test_write_from_splices_a_pipe_into_the_output_in_order(
    tmp_path: pathlib.Path, clock: itertools.count[int]
) -> None:
    """`write_from` moves a pipe's bytes into the data file by splice(2); they are byte-exact
    with offsets, streams and times among `write`s (which the memory tail keeps, so the tail
    stays contiguous), and a follower parked at the end gets them."""
    store = make_store(tmp_path)
    spliced: list[int] = []
    real = os.splice

    def spy(*args: Any, **kw: Any) -> int:
        spliced.append(moved := real(*args, **kw))
        return moved

    model = Model()
    rng = random.Random(5)
    follower = store.read(0, follow=True, max_chunk=1 << 20)
    with mock.patch.object(_output.os, "splice", spy):
        for i in range(6):
            data = rng.randbytes(300_000 + i)
            r, w = pipe_with(data)
            try:
                assert await store.write_from(OUT, r, len(data)) == len(data)
            finally:
                os.close(r)
                os.close(w)
            model.data += data
            model.streams += [OUT] * len(data)
            model.times += [float(store.statistics().chunks - 1)] * len(data)
            assert (await follower.__anext__()).data == data  # from the file
            await model.write(store, ERR, b"err %d\n" % i)
            assert (await follower.__anext__()).data == b"err %d\n" % i  # from the tail
    assert spliced == [300_000 + i for i in range(6)]
    model.check(await collect(store.read(0, follow=False)), 0)
    assert store.statistics().disk_bytes == store._space.stored_bytes
    remove(store)


async def test_the_pump_splices_a_full_pipe_and_reads_small_ones(
    tmp_path: pathlib.Path,
) -> None:
    """The job's pipe pump: a pipe holding SPLICE_READ or more goes through `write_from`
    (splice); a small read is read (and kept in the memory tail); the output is whole and
    counted."""
    from jobd.engine import _manager

    store = make_store(tmp_path)
    data = random.Random(6).randbytes(900 * 1024)
    r, w = pipe_with(data)
    pipe = trio.lowlevel.FdStream(r)
    spliced: list[int] = []
    real = os.splice

    def spy(*args: Any, **kw: Any) -> int:
        spliced.append(moved := real(*args, **kw))
        return moved

    manager = mock.Mock(_counters=mock.Mock(output_written=0))
    job = mock.Mock(output=store)
    with mock.patch.object(_output.os, "splice", spy):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_manager.JobManager._pump, manager, job, pipe, OUT)
            await wait_for_size(store, len(data))
            assert spliced == [len(data)]
            os.write(w, b"small")
            await wait_for_size(store, len(data) + 5)
            assert spliced == [len(data)]  # read, not spliced
            assert store.statistics().memory_bytes > 0
            os.close(w)
    await pipe.aclose()
    assert b"".join(c.data for c in await collect(store.read(0, follow=False))) == data + b"small"
    assert manager._counters.output_written == len(data) + 5
    remove(store)


async def wait_for_size(store: OutputStore, size: int) -> None:
    async for _ in store.read(0, follow=True):
        if store.size >= size:
            return


# ------------------------------------------------------------------ the page cache
# Whether any page of a file is in the kernel's page cache: mincore(2) of a mapping that is
# never touched (a read, even one with RWF_NOWAIT, would start a readahead). On a filesystem
# whose pages cannot be dropped (tmpfs) these tests would fail: the suite's tmp_path is on the
# machine's disk.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def cached(path: pathlib.Path) -> bool:
    size = path.stat().st_size
    assert size > 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert _libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
        return any(page & 1 for page in pages)
    finally:
        _libc.munmap(addr, size)


async def handed_back() -> None:
    """Wait until the worker has handed back every file queued so far."""
    await trio.to_thread.run_sync(_output._page_cache.idle.wait)


def paged_store(tmp_path: pathlib.Path) -> OutputStore:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=64 * 1024)
    return space.create("job")


async def write_pieces(store: OutputStore, n: int) -> bytes:
    """n pieces of 16 KiB (4 fill a segment), then the hand-back of what they passed."""
    written = b""
    for i in range(n):
        piece = bytes([65 + i]) * (16 * 1024)
        await store.write(OUT, piece)
        written += piece
    await handed_back()
    return written


async def test_segments_behind_the_writer_leave_the_page_cache_and_replay_from_disk(
    tmp_path: pathlib.Path,
) -> None:
    store = paged_store(tmp_path)
    written = await write_pieces(store, 12)  # about 3 segments' worth
    bases = [s.base for s in store._segments]
    assert len(bases) >= 3
    # Those the writer moved past, data and index, are handed back; its newest is not.
    for base in bases[:-1]:
        assert not cached(segment_file(tmp_path, base))
        assert not cached(segment_file(tmp_path, base, "idx"))
    assert cached(segment_file(tmp_path, bases[-1]))
    # Nothing is lost: a replay reads them back from the disk.
    chunks = await collect(store.read(0, follow=False))
    assert b"".join(c.data for c in chunks) == written
    store.close()  # and an ended job's last segment, once no reader is left
    await handed_back()
    assert not cached(segment_file(tmp_path, bases[-1]))
    remove(store)


async def test_a_reader_behind_keeps_its_segments_cached_until_it_is_done(
    tmp_path: pathlib.Path,
) -> None:
    store = paged_store(tmp_path)
    behind = store.read(0, follow=True)
    await write_pieces(store, 12)
    bases = [s.base for s in store._segments]
    assert all(cached(segment_file(tmp_path, base)) for base in bases)
    # It reads the first segment: that one goes at the next roll, the second stays for it.
    got = b""
    while behind.offset < bases[1]:
        got += (await behind.__anext__()).data
    assert bases[1] <= behind.offset < bases[2]
    await write_pieces(store, 4)
    assert not cached(segment_file(tmp_path, bases[0]))
    assert cached(segment_file(tmp_path, bases[1]))
    store.close()  # ended: the rest waits for the reader
    await handed_back()
    assert cached(segment_file(tmp_path, bases[1]))
    async for chunk in behind:
        got += chunk.data
    assert len(got) == store.size
    await handed_back()  # done: nothing is kept for it any more
    assert not any(cached(segment_file(tmp_path, s.base)) for s in store._segments)
    remove(store)


async def test_a_reader_that_is_dropped_or_closed_keeps_nothing_cached(
    tmp_path: pathlib.Path,
) -> None:
    store = paged_store(tmp_path)
    dropped = store.read(0, follow=True)
    closed = store.read(0, follow=True)
    await write_pieces(store, 8)
    first = store._segments[0].base
    assert cached(segment_file(tmp_path, first))
    await closed.aclose()
    await handed_back()
    assert cached(segment_file(tmp_path, first))  # `dropped` is still before it
    del dropped
    gc.collect()
    segments = len(store._segments)
    while len(store._segments) == segments:  # the next roll finds no reader behind
        await store.write(OUT, b"z" * (16 * 1024))
    await handed_back()
    assert not cached(segment_file(tmp_path, first))
    remove(store)
