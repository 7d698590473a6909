"""OutputSpace: the bounds on output (per job, for all jobs), what goes first, back-pressure
when nothing can go or the filesystem is full (real small tmpfs mounts), no descriptor after a
job's end, recovery after a crash, and seeking by lines and time without reading everything."""

from __future__ import annotations

import fcntl
import itertools
import math
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd.engine import _output, _retention
from jobd.engine._errors import InvalidArgument, NotFound, ResourceExhausted
from jobd.engine._output import OutputStore, segment_paths
from jobd.engine._retention import KEEP_NEWEST, OutputSpace
from jobd.engine._types import Chunk, Stream

OUT, ERR = Stream.STDOUT, Stream.STDERR
KiB, MiB = 1024, 1024 * 1024
ROOT = pathlib.Path(__file__).resolve().parents[1]


async def collect(reader: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in reader]


async def read_all(store: OutputStore, offset: int = 0, **kw: object) -> tuple[int, bytes]:
    """(offset of the first chunk, the bytes) of a non-following read; checks contiguity."""
    chunks = await collect(store.read(offset, follow=False, **kw))  # type: ignore[arg-type]
    if not chunks:
        return store.size, b""
    pos = chunks[0].offset
    for chunk in chunks:
        assert chunk.offset == pos
        pos += len(chunk.data)
    return chunks[0].offset, b"".join(c.data for c in chunks)


def fds() -> set[str]:
    """This process's open descriptors (not the one listdir used for the listing)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed by now: the listing's own
        found.add(name)
    return found


@contextmanager
def tmpfs(path: pathlib.Path, *options: str) -> Iterator[pathlib.Path]:
    """A real small filesystem for full-disk cases, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("mode=0700", *options)), "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def use_up_inodes(directory: pathlib.Path) -> list[pathlib.Path]:
    """Make empty files in `directory` until its filesystem has no inode left; the files."""
    made: list[pathlib.Path] = []
    while True:
        path = directory / f"f{len(made)}"
        try:
            path.touch()
        except OSError:
            return made
        made.append(path)


def fill(directory: pathlib.Path, *, leave: int = 0) -> pathlib.Path:
    """Fill the filesystem of `directory` with one foreign file (an operator's), leaving
    about `leave` bytes free; returns the file."""
    path = directory / "foreign"
    with open(path, "wb") as f:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize - leave
        try:
            f.write(b"\0" * max(0, free))
        except OSError:
            pass
    return path


def model_bytes(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(rng.randrange(1, 2000)) for _ in range(n)]


# ----------------------------------------------------------------- --max-job-output


async def test_job_cap_drops_its_oldest_output_and_offsets_keep_counting(
    tmp_path: pathlib.Path,
) -> None:
    cap = 256 * KiB
    space = OutputSpace(tmp_path, max_job_output=cap, max_data=0, segment_bytes=16 * KiB)
    store = space.create("job")
    rng = random.Random(1)
    written = bytearray()
    for data in model_bytes(rng, 1000):
        await store.write(rng.choice([OUT, ERR]), data)
        written += data
        assert store.disk_bytes <= cap
        assert space.stored_bytes == store.disk_bytes
    assert store.size == len(written) > 3 * cap
    assert store.start > 0
    # What is kept is the newest output, byte for byte, at its original offsets...
    first, kept = await read_all(store)
    assert first == store.start and kept == bytes(written[store.start :])
    # ...and most of the cap (not all: the index, whole blocks, and the segment being filled).
    assert store.size - store.start > cap // 2
    # A reader asking for dropped bytes starts at `start`; one asking for kept ones is exact.
    assert (await read_all(store, 5))[0] == store.start
    middle = store.start + 1000
    assert await read_all(store, middle) == (middle, bytes(written[middle:]))
    # On disk: only the kept segments, which add up to what is counted.
    names = sorted(p.name for p in (tmp_path / "job").iterdir())
    stats = store.statistics()
    assert len(names) == 2 * stats.segments
    sizes = sum((tmp_path / "job" / n).stat().st_size for n in names)
    assert sizes == (store.size - store.start) + stats.chunks * 32
    assert names[0] == f"{store.start:020d}.idx"
    space.remove("job")
    assert os.listdir(tmp_path) == [] and space.stored_bytes == 0


async def test_no_bound_keeps_everything(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=16 * KiB)
    store = space.create("job")
    written = bytearray()
    for data in model_bytes(random.Random(2), 300):
        await store.write(OUT, data)
        written += data
    assert store.start == 0 and store.statistics().segments > 10
    assert await read_all(store) == (0, bytes(written))


async def test_a_follower_behind_what_is_dropped_resumes_at_start(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=64 * KiB, max_data=0, segment_bytes=16 * KiB,
                        memory_tail=0)
    store = space.create("job")
    written = bytearray()
    for _ in range(10):
        await store.write(OUT, b"a" * 1000)
        written += b"a" * 1000
    follower = store.read(0, follow=True, max_chunk=1000)
    assert (await follower.__anext__()).offset == 0  # then it stalls
    for i in range(300):
        data = bytes([65 + i % 26]) * 1000
        await store.write(OUT, data)
        written += data
    assert store.start > 1000
    chunk = await follower.__anext__()
    assert chunk.offset == store.start  # the gap in offsets shows what it missed
    assert chunk.data == written[store.start : store.start + len(chunk.data)]


# ----------------------------------------------------------------- --max-data


async def test_max_data_drops_ended_jobs_first_oldest_first_then_the_biggest_running(
    tmp_path: pathlib.Path,
) -> None:
    seg = 64 * KiB
    space = OutputSpace(tmp_path, max_job_output=0, max_data=4 * MiB, segment_bytes=seg)
    block = b"x" * (16 * KiB)
    first, second = space.create("first"), space.create("second")
    for store in (first, second):
        for _ in range(32):  # 512 KiB each
            await store.write(OUT, block)
    first.close()  # ended first: dropped first
    second.close()
    small, big = space.create("small"), space.create("big")
    for _ in range(8):
        await small.write(OUT, block)
    # The flood: ended output goes first (the first to end first), then the flood's own.
    seen_first_going = seen_second_going = False
    for _ in range(1000):
        await big.write(ERR, block)
        assert space.stored_bytes <= 4 * MiB
        if first.start and not seen_first_going:
            seen_first_going = True
            assert second.start == 0 and big.start == 0
        if second.start and not seen_second_going:
            seen_second_going = True
            assert first.start == first.size  # all of it
            assert big.start == 0
        if big.start:
            assert first.start == first.size and second.start == second.size
    assert seen_first_going and seen_second_going
    assert small.start == 0  # another job's output is untouched by the flood
    assert big.size - big.start >= KEEP_NEWEST
    # Now the small job writes: the big one (holding the most) gives way, not the writer.
    for _ in range(40):
        await small.write(OUT, block)
    assert small.start == 0 and small.size == 48 * len(block)
    assert space.stored_bytes <= 4 * MiB
    assert (await read_all(small)) == (0, block * 48)
    # Ended jobs emptied keep their offsets: size, and start == size, and no data.
    assert (first.size, first.start) == (32 * len(block), 32 * len(block))
    assert await read_all(first) == (first.size, b"")


async def test_each_running_job_keeps_its_newest_mib(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=3 * MiB, segment_bytes=64 * KiB)
    stores = [space.create(f"job{i}") for i in range(2)]
    block = bytes(range(256)) * 64  # 16 KiB
    async with trio.open_nursery() as nursery:
        async def flood(store: OutputStore) -> None:
            for _ in range(400):
                await store.write(OUT, block)

        for store in stores:
            nursery.start_soon(flood, store)
    for store in stores:
        assert store.size == 400 * len(block)
        kept = store.size - store.start
        assert kept >= KEEP_NEWEST
        assert await read_all(store) == (store.start, (block * 400)[store.start :])
    assert space.stored_bytes <= 3 * MiB


async def test_a_flood_in_pipe_sized_writes_drops_its_own_oldest_instead_of_blocking(
    tmp_path: pathlib.Path,
) -> None:
    """The job's pump reads up to a pipe-full (1 MiB) at a time, four times a segment here: a
    write is stored in segment-sized pieces, so no segment grows past its size and the flood
    always has an old one to give up instead of waiting, until the quiet job ends, for room
    only its own oldest output could make."""
    space = OutputSpace(tmp_path, max_job_output=0, max_data=4 * MiB, segment_bytes=256 * KiB)
    quiet, flood = space.create("quiet"), space.create("flood")
    seq = b"".join(b"%d\n" % i for i in range(1, 200_001))  # 1.23 MiB: all of it stays
    await quiet.write(OUT, seq)
    written = bytearray()
    done = trio.Event()

    async def write_flood() -> None:
        # Pipe reads of any size up to 1 MiB. (Stored whole, 255 KiB + 1 MiB made a segment
        # of 1.25 MiB that the next two, 300 + 600 KiB, could not replace: 4.4 MiB needed.)
        sizes = [255 * KiB, MiB, 300 * KiB, 600 * KiB, MiB] * 8
        for i, size in enumerate(sizes):
            data = bytes([65 + i % 26]) * size
            await flood.write(OUT, data)
            written.extend(data)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_flood)
        await trio.testing.wait_all_tasks_blocked()
        assert flood.blocked == "" and done.is_set()
    assert space.stored_bytes <= 4 * MiB
    assert quiet.start == 0 and await read_all(quiet) == (0, seq)
    assert flood.size == len(written) and flood.start > 0
    assert flood.size - flood.start >= KEEP_NEWEST
    assert await read_all(flood) == (flood.start, bytes(written[flood.start :]))
    # No segment's data file is larger than the segment size.
    for path in (tmp_path / "flood").glob("*.out"):
        assert path.stat().st_size <= 256 * KiB


@pytest.mark.parametrize("freed_by", ["job end", "remove"])
async def test_quota_with_nothing_to_drop_blocks_the_writer_until_room_appears(
    tmp_path: pathlib.Path, freed_by: str
) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=2 * MiB + 64 * KiB,
                        segment_bytes=64 * KiB)
    holder, writer = space.create("holder"), space.create("writer")
    block = b"h" * (16 * KiB)
    for _ in range(70):  # ~1.1 MiB: all of it must stay (its newest MiB, plus a segment)
        await holder.write(OUT, block)
    written = bytearray()
    done = trio.Event()

    async def write_more() -> None:
        for i in range(200):
            data = bytes([i % 256]) * (16 * KiB)
            await writer.write(ERR, data)
            written.extend(data)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_more)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert "--max-data" in writer.blocked and "nothing more can be dropped" in writer.blocked
        assert space.blocked_count == 1
        before = writer.size
        await trio.testing.wait_all_tasks_blocked()
        assert writer.size == before  # waiting, not spinning nor dropping new bytes
        if freed_by == "job end":
            holder.close()  # an ended job's output may go first
        else:
            space.remove("holder")
    assert done.is_set() and writer.blocked == "" and space.blocked_count == 0
    assert writer.size == len(written)  # not one byte skipped
    assert await read_all(writer) == (writer.start, bytes(written[writer.start :]))
    assert writer.size - writer.start >= KEEP_NEWEST


async def test_stop_waiting_gives_up_pending_output(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose processes are gone while its output waits for room still ends: what
    cannot be stored is lost, counted and logged once."""
    space = OutputSpace(tmp_path, max_job_output=0, max_data=1 * MiB + 32 * KiB,
                        segment_bytes=64 * KiB)
    store = space.create("job")
    block = b"k" * (16 * KiB)

    async def flood() -> None:
        for _ in range(200):
            await store.write(OUT, block)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        assert store.blocked
        size = store.size
        store.stop_waiting()  # the rest of the flood is lost, without waiting
    assert store.size == size and size % len(block) == 0
    quota, space.max_data = space.max_data, 0  # room now: still nothing more (no gap)
    await store.write(OUT, b"after the loss")
    assert store.size == size
    store.close()
    lost = (200 - size // len(block)) * len(block) + len(b"after the loss")
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == [
        f"job job: {lost} byte(s) of output lost: they could not be stored before the job "
        f"ended (the output kept for all jobs reached --max-data ({quota} bytes) and "
        f"nothing more can be dropped (each running job keeps its newest 1024 KiB); jobd "
        "resumes when jobs end or are removed)"
    ]
    blocked_lines = [r for r in caplog.records if "output blocked" in r.getMessage()]
    assert len(blocked_lines) == 1  # once per episode, not per write


# ----------------------------------------------------------------- full filesystem (tmpfs)


@pytest.mark.cgroups  # needs root (mount); must run on our machines
async def test_full_filesystem_blocks_then_resumes_losslessly(tmp_path: pathlib.Path) -> None:
    """ENOSPC, with nothing of jobd's to drop: the writer waits; an operator freeing space
    (outside jobd: found by the upkeep's poll) lets it resume, and nothing is lost."""
    with tmpfs(tmp_path / "fs", "size=4m") as fs:
        (fs / "output").mkdir()
        space = OutputSpace(fs / "output", max_job_output=0, max_data=0,
                            segment_bytes=64 * KiB, poll_interval=0.01)
        store = space.create("job")
        foreign = fill(fs, leave=200 * KiB)
        written = bytearray()
        async with trio.open_nursery() as nursery:
            await nursery.start(space.run)
            for i in range(60):  # 960 KiB: far more than is free
                data = bytes([i]) * (16 * KiB)
                async with trio.open_nursery() as inner:
                    inner.start_soon(store.write, OUT, data)
                    await trio.testing.wait_all_tasks_blocked()
                    if store.blocked:
                        assert "is full (No space left on device)" in store.blocked
                        assert "last 128 KiB are kept for the job records" in store.blocked
                        assert str(fs) in store.blocked
                        assert store.size == len(written)  # nothing half-stored
                        foreign.unlink()  # the operator frees the disk
                written += data
            nursery.cancel_scope.cancel()
        assert not store.blocked
        assert store.size == len(written) and store.start == 0
        assert await read_all(store) == (0, bytes(written))
        store.close()
        # And after the end (no fd held), the files read back the same from a new space.
        again = OutputSpace(fs / "output", max_job_output=0, max_data=0).open("job")
        assert await read_all(again) == (0, bytes(written))


@pytest.mark.parametrize("headroom", [0, None], ids=["splice", "near-full"])
async def test_a_pipe_spliced_into_a_full_disk_waits_and_loses_nothing(
    tmp_path: pathlib.Path, headroom: int | None
) -> None:
    """`write_from` (the pump's large pipe reads, spliced into the output) meets ENOSPC: the
    splice stops short or its index record fails, the rest is stored as `write` does once
    there is room, and nothing is lost. With the default SPLICE_HEADROOM a nearly full disk
    is never spliced into at all (it goes the way of `write`)."""
    spliced: list[int] = []
    real = os.splice

    def spy(*args: Any, **kw: Any) -> int:
        spliced.append(moved := real(*args, **kw))
        return moved

    with (
        tmpfs(tmp_path / "fs", "size=4m") as fs,
        mock.patch.object(_output.os, "splice", spy),
        mock.patch.object(
            _output, "SPLICE_HEADROOM", _output.SPLICE_HEADROOM if headroom is None else headroom
        ),
    ):
        (fs / "output").mkdir()
        space = OutputSpace(fs / "output", max_job_output=0, max_data=0,
                            segment_bytes=256 * KiB, poll_interval=0.01)
        store = space.create("job")
        foreign = fill(fs, leave=300 * KiB)
        data = random.Random(3).randbytes(900 * KiB)
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ, as the shim's pipes
        os.set_blocking(r, False)
        assert os.write(w, data) == len(data)
        os.close(w)
        blocked = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(space.run)
                while store.size < len(data):
                    async with trio.open_nursery() as inner:
                        inner.start_soon(store.write_from, OUT, r, len(data) - store.size)
                        await trio.testing.wait_all_tasks_blocked()
                        if store.blocked:
                            blocked = True
                            assert "is full (No space left on device)" in store.blocked
                            foreign.unlink()  # the operator frees the disk
                nursery.cancel_scope.cancel()
        finally:
            os.close(r)
        assert blocked
        assert bool(spliced) == (headroom == 0)
        assert await read_all(store) == (0, data)
        assert store.statistics().disk_bytes == space.stored_bytes
        store.close()


@pytest.mark.cgroups  # needs root (mount)
async def test_full_filesystem_drops_the_flood_not_the_quiet_job(tmp_path: pathlib.Path) -> None:
    """ENOSPC with no --max-data: the flooding job (holding the most) loses its oldest output;
    the quiet one's output is complete; nothing blocks; space is reused at once."""
    with tmpfs(tmp_path / "fs", "size=8m") as fs:
        space = OutputSpace(fs, max_job_output=0, max_data=0, segment_bytes=128 * KiB)
        flood, quiet = space.create("flood"), space.create("quiet")
        # A reader holds a position in the flood's oldest segment the whole time.
        follower = flood.read(0, follow=True, max_chunk=100)
        expected = bytearray()
        for i in range(2000):  # 2000 x 16 KiB = 31 MiB through an 8 MiB filesystem
            await flood.write(OUT, bytes([i % 251]) * (16 * KiB))
            if i == 0:
                assert (await follower.__anext__()).offset == 0
            if i % 10 == 0:
                line = b"quiet line %d\n" % i
                await quiet.write(OUT, line)
                expected += line
            assert not flood.blocked and not quiet.blocked
        assert flood.start > 0 and quiet.start == 0
        assert await read_all(quiet) == (0, bytes(expected))
        # The follower let go of the dropped segment; it resumes at what is kept.
        assert (await follower.__anext__()).offset == flood.start
        kept = flood.size - flood.start
        assert kept >= KEEP_NEWEST
        data = (await read_all(flood))[1]
        assert len(data) == kept


@pytest.mark.cgroups  # needs root (mount)
async def test_a_flood_leaves_the_job_records_their_reserve(tmp_path: pathlib.Path) -> None:
    """Output treats the filesystem as full `reserve` early: a flood through a filesystem
    with no --max-data never takes the space the job records (jobs.sqlite3, on the same
    filesystem) need for the next Start's commit. The reserve is at most 1/32 of the disk."""
    with tmpfs(tmp_path / "fs", "size=8m") as fs:
        space = OutputSpace(fs, max_job_output=0, max_data=0, segment_bytes=128 * KiB)
        assert space.reserve == 8 * MiB // 32
        flood = space.create("flood")
        least = math.inf
        for i in range(1000):  # 16 MiB through an 8 MiB filesystem
            await flood.write(OUT, bytes([i % 251]) * (16 * KiB))
            st = os.statvfs(fs)
            least = min(least, st.f_bfree * st.f_frsize)
            assert not flood.blocked
        assert flood.start > 0  # the disk filled: its oldest output went
        assert least >= space.reserve
        records = fs / "records"  # what the job store would write in the reserve: it fits
        records.write_bytes(b"r" * (space.reserve - 16 * KiB))


@pytest.mark.cgroups  # needs root (mount)
async def test_a_start_on_a_full_disk_drops_ended_output_to_make_its_files(
    tmp_path: pathlib.Path,
) -> None:
    with tmpfs(tmp_path / "fs", "size=4m", "nr_inodes=32") as fs:
        space = OutputSpace(fs, max_job_output=0, max_data=0, segment_bytes=16 * KiB)
        old = space.create("old")
        for _ in range(8):
            await old.write(OUT, b"o" * (16 * KiB))  # 8 segments: 16 inodes
        old.close()
        use_up_inodes(fs)
        new = space.create("new")  # the ended job's oldest segments gave up their inodes
        assert old.start > 0 and new.size == 0
        await new.write(OUT, b"fine")
        assert await read_all(new) == (0, b"fine")


@pytest.mark.cgroups  # needs root (mount)
async def test_no_inodes_is_resource_exhausted_on_create_and_blocks_a_roll(
    tmp_path: pathlib.Path,
) -> None:
    with tmpfs(tmp_path / "fs", "size=8m", "nr_inodes=16") as fs:
        space = OutputSpace(fs, max_job_output=0, max_data=0, segment_bytes=16 * KiB,
                            poll_interval=0.01)
        store = space.create("job")
        made = use_up_inodes(fs)
        with pytest.raises(ResourceExhausted, match=f"in {fs}: No space left on device"):
            space.create("other")
        assert space.on_disk() == {"job"}  # nothing half-created
        # The running job's next segment cannot be created either: it waits, then resumes.
        written = bytearray()
        async with trio.open_nursery() as nursery:
            async def write() -> None:
                for _ in range(3):  # 30 KiB: one more 16 KiB segment, two inodes
                    await store.write(OUT, b"z" * (10 * KiB))
                    written.extend(b"z" * (10 * KiB))

            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert "is full" in store.blocked
            made.pop().unlink()
            made.pop().unlink()
            space.remove("nothing-here")  # any removal wakes the writers
        assert await read_all(store) == (0, bytes(written))


# ----------------------------------------------------------------- made ahead (staging)


@asynccontextmanager
async def staging_space(
    directory: pathlib.Path, staging: pathlib.Path
) -> AsyncIterator[OutputSpace]:
    """An OutputSpace keeping output dirs made ahead in `staging`, as the manager runs it."""
    space = OutputSpace(directory, max_job_output=0, max_data=0, segment_bytes=16 * KiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(space.keep_staged, staging)
        yield space
        nursery.cancel_scope.cancel()


def inodes(directory: pathlib.Path) -> set[int]:
    return {p.stat().st_ino for p in directory.iterdir()}


async def test_a_new_jobs_output_is_a_dir_made_ahead_and_what_is_left_goes_at_the_end(
    tmp_path: pathlib.Path,
) -> None:
    output, staging = tmp_path / "output", tmp_path / "staged"
    output.mkdir()
    staging.mkdir()
    (staging / "left-by-an-earlier-server").mkdir()
    (staging / "left-by-an-earlier-server" / "00000000000000000000.out").touch()
    (staging / "stray").touch()
    (staging / "an-operators" / "nested").mkdir(parents=True)
    async with staging_space(output, staging) as space:
        await space.staging_settled.wait_value(True)
        assert space.staged_count == _retention.STAGED
        made = inodes(staging)
        assert len(made) == _retention.STAGED  # the leftovers went first
        store = space.create("job")
        assert (output / "job").stat().st_ino in made  # moved, not made now
        assert sorted(p.name for p in (output / "job").iterdir()) == [
            "00000000000000000000.idx", "00000000000000000000.out",
        ]
        await store.write(OUT, b"hello")
        store.close()
        assert await read_all(store) == (0, b"hello")
        await space.staging_settled.wait_value(True)  # the one taken is replaced
        assert len(inodes(staging)) == _retention.STAGED
    assert list(staging.iterdir()) == []
    assert space.on_disk() == {"job"}


async def test_a_burst_that_finds_none_made_ahead_has_as_many_made_for_the_next(
    tmp_path: pathlib.Path,
) -> None:
    output, staging = tmp_path / "output", tmp_path / "staged"
    output.mkdir()
    async with staging_space(output, staging) as space:
        await space.staging_settled.wait_value(True)
        burst = _retention.STAGED + 3
        made = inodes(staging)
        for i in range(burst):  # no checkpoint between them: nothing is made meanwhile
            space.create(f"job{i}")
        moved = {(output / f"job{i}").stat().st_ino for i in range(burst)}
        assert len(moved & made) == _retention.STAGED  # 3 made their own
        await space.staging_settled.wait_value(True)
        assert space.staged_count == burst
    assert space.on_disk() == {f"job{i}" for i in range(burst)}


@pytest.mark.cgroups  # needs root (mount)
async def test_no_inodes_refuses_a_start_though_dirs_were_made_ahead_and_they_take_no_last_inodes(
    tmp_path: pathlib.Path,
) -> None:
    with tmpfs(tmp_path / "fs", "size=8m", "nr_inodes=64") as fs:
        output, staging = fs / "output", fs / "staged"
        output.mkdir()
        async with staging_space(output, staging) as space:
            await space.staging_settled.wait_value(True)
            made = use_up_inodes(fs)
            with pytest.raises(ResourceExhausted, match=f"in {output}: No space left on device"):
                space.create("job")  # as without staging
            assert space.on_disk() == set()
            assert space.staged_count == _retention.STAGED  # none was used
            for path in made[:2]:
                path.unlink()
            with pytest.raises(ResourceExhausted):  # 2 free: not enough for a new job's 3
                space.create("job")
            made.pop().unlink()
            store = space.create("job")  # 3 free: a staged one is taken
            await space.staging_settled.wait_value(True)
            # Its replacement would take the last 3 inodes: not made.
            assert space.staged_count == _retention.STAGED - 1
            assert os.statvfs(fs).f_ffree == 3
            for path in made[2:7]:
                path.unlink()
            other = space.create("other")  # 8 free: one replacement leaves 5, a second 2
            await space.staging_settled.wait_value(True)
            assert space.staged_count == _retention.STAGED - 1  # 2 + 1
            assert os.statvfs(fs).f_ffree == 5 >= 64 // _retention.STAGE_FREE
            await store.write(OUT, b"fine")
            assert await read_all(store) == (0, b"fine")
            store.close()
            other.close()
        assert list(staging.iterdir()) == []


@pytest.mark.cgroups  # needs root (mount)
async def test_nothing_is_made_ahead_when_the_output_dir_is_another_filesystem(
    tmp_path: pathlib.Path,
) -> None:
    staging = tmp_path / "staged"
    with tmpfs(tmp_path / "output", "size=1m") as output:
        async with staging_space(output, staging) as space:
            assert not staging.exists() and space.staged_count == 0
            store = space.create("job")  # made at once, as without staging
            await store.write(OUT, b"fine")
            store.close()
            assert await read_all(store) == (0, b"fine")


async def test_a_staging_path_that_cannot_be_used_makes_nothing_ahead_and_starts_work(
    tmp_path: pathlib.Path,
) -> None:
    output, staging = tmp_path / "output", tmp_path / "staged"
    output.mkdir()
    staging.write_bytes(b"an operator's file")  # not a directory: it cannot be emptied
    async with staging_space(output, staging) as space:
        assert space.staged_count == 0
        store = space.create("job")  # made at once, as without staging
        store.close()
    assert staging.read_bytes() == b"an operator's file"
    assert space.on_disk() == {"job"}


# ----------------------------------------------------------------- descriptors


async def test_an_ended_job_holds_no_descriptor(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=16 * KiB)
    before = fds()
    stores = []
    for i in range(300):
        store = space.create(f"job{i}")
        for _ in range(3):
            await store.write(OUT, b"%d\n" % i * 3000)
        assert store.statistics().open_fds == 2  # the writer's newest segment only
        store.close()
        assert store.statistics().open_fds == 0 and store.statistics().memory_bytes == 0
        stores.append(store)
    # (The pages of closed output go back to the kernel in a worker thread, which holds one
    # descriptor while it hands back a file: wait for it.)
    await trio.to_thread.run_sync(_output._page_cache.idle.wait)
    assert fds() == before
    # Readers open what they need and close it after each step, also mid-iteration.
    reader = stores[7].read(0, follow=True, max_chunk=4096)
    assert (await reader.__anext__()).data.startswith(b"7\n")
    assert fds() == before
    assert b"".join([c.data async for c in reader]).endswith(b"7\n")
    assert (await read_all(stores[299], tail_lines=1))[1] == b"299\n"
    await trio.to_thread.run_sync(_output._page_cache.idle.wait)
    assert fds() == before


# ----------------------------------------------------------------- restart and recovery


async def write_then_reopen(tmp_path: pathlib.Path) -> tuple[bytes, pathlib.Path]:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=16 * KiB)
    store = space.create("job")
    written = bytearray()
    for data in model_bytes(random.Random(3), 60):
        await store.write(random.choice([OUT, ERR]), data)
        written += data
    store.close()
    return bytes(written), tmp_path / "job"


async def test_reopened_output_is_byte_for_byte_with_offsets_streams_and_times(
    tmp_path: pathlib.Path,
) -> None:
    ticks = itertools.count(1000)
    with mock.patch.object(_output, "_now", lambda: float(next(ticks))):
        space = OutputSpace(tmp_path, max_job_output=64 * KiB, max_data=0,
                            segment_bytes=16 * KiB, memory_tail=0)
        store = space.create("job")
        for data in model_bytes(random.Random(4), 200):
            await store.write(random.Random(len(data)).choice([OUT, ERR]), data)
    original = await collect(store.read(0, follow=False))
    size, start = store.size, store.start
    assert start > 0
    space.close()
    again = OutputSpace(tmp_path, max_job_output=64 * KiB, max_data=0).open("job")
    assert (again.size, again.start, again.closed) == (size, start, True)
    assert await collect(again.read(0, follow=False)) == original
    assert await collect(again.read(0, follow=True)) == original  # ends: the job has ended
    assert again.statistics().open_fds == 0


@pytest.mark.parametrize(
    "tear",
    ["data beyond the index", "half an index record", "index beyond the data", "empty last roll"],
)
async def test_a_torn_last_write_is_cut_back_to_the_last_consistent_record(
    tmp_path: pathlib.Path, tear: str
) -> None:
    written, job_dir = await write_then_reopen(tmp_path)
    *_, last = sorted(int(p.stem) for p in job_dir.glob("*.out"))
    data_path, index_path = segment_paths(job_dir, last)
    lost = 0
    if tear == "data beyond the index":
        data_path.write_bytes(data_path.read_bytes() + b"torn data")
    elif tear == "half an index record":
        half = struct.pack("<QdQB7x", len(written), 0.0, 9, 1)[:20]
        index_path.write_bytes(index_path.read_bytes() + half)
    elif tear == "index beyond the data":
        # The last write's record is there but its data only partly.
        records = index_path.read_bytes()
        offset, _, length, _ = struct.unpack("<QdQB7x", records[-32:])
        os.truncate(data_path, offset - last + length - 1)
        lost = length
    else:
        for p in segment_paths(job_dir, len(written)):
            p.write_bytes(b"")
    store = OutputSpace(tmp_path, max_job_output=0, max_data=0).open("job")
    assert store.size == len(written) - lost
    assert await read_all(store) == (0, written[: store.size])
    # The files were repaired: a second open agrees, and nothing is left torn.
    assert data_path.stat().st_size == store.size - last
    assert index_path.stat().st_size % 32 == 0
    other = OutputSpace(tmp_path, max_job_output=0, max_data=0).open("job")
    assert await read_all(other) == (0, written[: store.size])


_CRASHING_WRITER = """
import sys, trio, pathlib
sys.path.insert(0, sys.argv[2])
from jobd.engine._retention import OutputSpace
from jobd.engine._types import Stream
async def main():
    space = OutputSpace(pathlib.Path(sys.argv[1]), max_job_output=0, max_data=0,
                        segment_bytes=64 * 1024)
    store = space.create("job")
    i = 0
    while True:
        data = (b"%08d " % i) * (1 + i % 50)
        await store.write(Stream(1 + i % 2), data)
        i += 1
        if i == 2000:
            print("going", flush=True)
trio.run(main)
"""


def expected_stream(size: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += (b"%08d " % i) * (1 + i % 50)
        i += 1
    return bytes(out[:size])


async def test_sigkill_mid_write_recovers_byte_for_byte(tmp_path: pathlib.Path) -> None:
    """A real SIGKILL of a process writing as fast as it can."""
    root = str(ROOT)
    for attempt in range(3):
        directory = tmp_path / f"run{attempt}"
        directory.mkdir()
        with subprocess.Popen(  # noqa: ASYNC220  # killed mid-write: no trio process API needed
            [sys.executable, "-c", _CRASHING_WRITER, str(directory), root],
            stdout=subprocess.PIPE,
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"going\n"
            proc.send_signal(signal.SIGKILL)
        store = OutputSpace(directory, max_job_output=0, max_data=0).open("job")
        assert store.size > 0
        assert await read_all(store) == (0, expected_stream(store.size))
        # Chunks keep their streams: write i went to stream 1 + i % 2.
        chunks = await collect(store.read(0, follow=False))
        assert {c.stream for c in chunks} == {OUT, ERR}
        # And the recovered output can be dropped, read by lines, and removed.
        assert (await read_all(store, tail_lines=1))[1].count(b"\n") == 0
        OutputSpace(directory, max_job_output=0, max_data=0).remove("job")
        assert list(directory.iterdir()) == []


async def test_open_of_a_job_without_files_reads_empty(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0)
    store = space.open("gone")
    assert (store.size, store.start) == (0, 0)
    assert await read_all(store) == (0, b"")
    space.remove("gone")


async def test_on_disk_lists_job_dirs_and_remove_deletes_unopened_ones(
    tmp_path: pathlib.Path,
) -> None:
    _, _ = await write_then_reopen(tmp_path)
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0)
    assert space.on_disk() == {"job"}
    space.remove("job")
    assert space.on_disk() == set() and os.listdir(tmp_path) == []


async def test_a_removed_store_fails_its_readers(tmp_path: pathlib.Path) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0)
    store = space.create("job")
    await store.write(OUT, b"x")
    store.close()
    reader = store.read(0, follow=True)
    space.remove("job")
    with pytest.raises(NotFound, match="removed"):
        await reader.__anext__()


# ----------------------------------------------------------------- seeking


def last_lines(data: bytes, n: int) -> bytes:
    """What `tail -n N` prints: the last N lines, a final newline ending the last one."""
    if not data:
        return b""
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(n):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


@settings(max_examples=80, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.sampled_from([OUT, ERR]),
                  st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"\n"))),
        max_size=60,
    ),
    lines=st.integers(min_value=1, max_value=30),
    only=st.sampled_from([None, OUT, ERR]),
)
async def test_tail_lines_matches_tail(
    writes: list[tuple[Stream, bytes]], lines: int, only: Stream | None
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        space = OutputSpace(pathlib.Path(directory), max_job_output=0, max_data=0,
                            segment_bytes=128, memory_tail=0)  # many small segments
        store = space.create("job")
        per_stream = {OUT: bytearray(), ERR: bytearray(), None: bytearray()}
        for stream, data in writes:
            await store.write(stream, data)
            per_stream[stream] += data
            per_stream[None] += data
        chunks = await collect(
            store.read(0, follow=False, tail_lines=lines, stream=only, max_chunk=7)
        )
        assert all(only in (None, c.stream) for c in chunks)
        assert b"".join(c.data for c in chunks) == last_lines(bytes(per_stream[only]), lines)


async def test_tail_lines_and_stream_offsets_stay_those_of_the_combined_stream(
    tmp_path: pathlib.Path,
) -> None:
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0)
    store = space.create("job")
    await store.write(OUT, b"o1\no2\n")
    await store.write(ERR, b"e1\n")
    await store.write(OUT, b"o3")  # no final newline: a line all the same
    got = await collect(store.read(0, follow=False, tail_lines=2))
    assert [(c.stream, c.offset, c.data) for c in got] == [(ERR, 6, b"e1\n"), (OUT, 9, b"o3")]
    got = await collect(store.read(0, follow=False, tail_lines=2, stream=OUT))
    assert [(c.offset, c.data) for c in got] == [(3, b"o2\n"), (9, b"o3")]
    got = await collect(store.read(0, follow=False, stream=ERR))
    assert [(c.offset, c.data) for c in got] == [(6, b"e1\n")]
    assert await collect(store.read(0, follow=False, tail_lines=100)) != []
    with pytest.raises(InvalidArgument, match="tail_lines must be >= 0"):
        store.read(0, follow=False, tail_lines=-1)
    # tail then follow: the last line, then what comes next.
    reader = store.read(0, follow=True, tail_lines=1)
    assert (await reader.__anext__()).data == b"o3"
    await store.write(OUT, b" more\n")
    assert (await reader.__anext__()).data == b" more\n"


async def test_since_starts_at_the_first_chunk_written_at_or_after_it(
    tmp_path: pathlib.Path,
) -> None:
    times = iter([10.0, 20.0, 20.0, 30.0, 25.0, 40.0] + [50.0 + i for i in range(500)])
    with mock.patch.object(_output, "_now", lambda: next(times)):
        space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=256,
                            memory_tail=0)
        store = space.create("job")
        offsets = []
        for i in range(506):
            offsets.append(store.size)
            await store.write(OUT if i % 3 else ERR, b"%04d\n" % i)
    # A clock that steps back (25 after 30) is stamped 30: stamps never go backwards.
    expect = {0.0: 0, 10.0: 0, 10.5: offsets[1], 20.0: offsets[1], 25.0: offsets[3],
              30.0: offsets[3], 31.0: offsets[5], 50.0: offsets[6], 300.5: offsets[257],
              549.0: offsets[505], 549.5: store.size}
    for since, offset in expect.items():
        got = await collect(store.read(0, follow=False, since=since))
        assert (got[0].offset if got else store.size) == offset, since
    # Combined with a stream and an offset: the latest of them.
    got = await collect(store.read(offsets[300], follow=False, since=100.0, stream=ERR))
    assert got[0].offset == offsets[300] and all(c.stream is ERR for c in got)
    with pytest.raises(InvalidArgument, match="since"):
        store.read(0, follow=False, since=float("nan"))


async def test_tail_lines_scans_back_a_bounded_amount(tmp_path: pathlib.Path) -> None:
    """Output with no line end at all (a 10 GB line, at test size): tail_lines reads at most
    TAIL_SCAN_LIMIT back and starts there, rather than holding the event loop for it all."""
    space = OutputSpace(tmp_path, max_job_output=0, max_data=0, segment_bytes=256 * KiB)
    store = space.create("job")
    for _ in range(64):
        await store.write(OUT, b"x" * (64 * KiB))  # 4 MiB, no newline
    with mock.patch.object(_output, "TAIL_SCAN_LIMIT", 1 * MiB):
        first, data = await read_all(store, tail_lines=2)
    assert store.size - 1 * MiB - 64 * KiB <= first < store.size
    assert data == b"x" * (store.size - first)
    await store.write(OUT, b"\nlast\n")  # with line ends near the end, it is exact
    with mock.patch.object(_output, "TAIL_SCAN_LIMIT", 1 * MiB):
        assert (await read_all(store, tail_lines=1))[1] == b"last\n"


async def test_seeking_never_reads_the_whole_output(tmp_path: pathlib.Path) -> None:
    """A 64 MiB output: tail, since and the end are found by reading a few KiB."""
    ticks = itertools.count()
    with mock.patch.object(_output, "_now", lambda: float(next(ticks))):
        # 64 whole writes and their index records per segment: one record per write.
        space = OutputSpace(tmp_path, max_job_output=0, max_data=0,
                            segment_bytes=4 * MiB + 64 * 32, memory_tail=0)
        store = space.create("job")
        line = b"y" * 1023 + b"\n"
        for _ in range(1024):
            await store.write(OUT, line * 64)  # 64 KiB per write, 64 MiB in all
    store.close()
    real_pread = os.pread
    read = 0

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        nonlocal read
        data = real_pread(fd, size, offset)
        read += len(data)
        return data

    with mock.patch.object(_output.os, "pread", counting_pread):
        reader = store.read(0, follow=False, tail_lines=3)
        assert read < 128 * KiB
        assert b"".join([c.data async for c in reader]) == line * 3
        read = 0
        reader = store.read(0, follow=False, since=1000.0)
        assert read < 16 * KiB
        assert (await reader.__anext__()).offset == 1000 * 64 * KiB
        read = 0
        assert await collect(store.read(store.size, follow=False)) == []
        assert read == 0
