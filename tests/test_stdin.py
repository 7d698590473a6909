"""A job's stdin (StartRequest.stdin, the Input call) in the engine, on real processes: the
pipe, its EOF, one writer per job, and back-pressure on a job that does not read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from jobd.engine import FailedPrecondition, JobManager, State

from .test_engine import output_of

pytestmark = pytest.mark.cgroups


async def chunks(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_stdin_reaches_the_job_and_its_end_is_eof(engine: JobManager) -> None:
    job = await engine.start("alice", ["sh", "-c", "cat; echo end"], stdin=True)
    info = await engine.feed_stdin(job.id, chunks(b"hello ", b"", b"world\n"))
    assert info.id == job.id
    assert await output_of(engine, job.id) == b"hello world\nend\n"
    assert engine.status(job.id).state is State.EXITED


async def test_without_stdin_the_job_reads_dev_null(engine: JobManager) -> None:
    job = await engine.start("alice", ["sh", "-c", "readlink /proc/self/fd/0; cat"])
    assert await output_of(engine, job.id) == b"/dev/null\n"
    running = await engine.start("alice", ["sleep", "1000"])
    with pytest.raises(FailedPrecondition, match="started without stdin"):
        await engine.feed_stdin(running.id, chunks(b"x"))
    await engine.stop(running.id, 0)


async def test_one_feed_per_job(engine: JobManager) -> None:
    job = await engine.start("alice", ["cat"], stdin=True)
    await engine.feed_stdin(job.id, chunks(b"once\n"))
    with pytest.raises(FailedPrecondition, match="earlier Input call"):
        await engine.feed_stdin(job.id, chunks(b"twice\n"))
    assert await output_of(engine, job.id) == b"once\n"


async def test_a_job_that_does_not_read_blocks_the_writer(engine: JobManager) -> None:
    """The pipe is the only buffer: the feed waits while the job does not read, and ends
    quietly (no error) when the job exits without reading the rest."""
    job = await engine.start("alice", ["sh", "-c", "read line; echo got $line"], stdin=True)
    sent = 0
    blocked = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b"first\n"
        while True:
            sent += 65536
            if sent > 16 * 1024 * 1024:
                blocked.set()  # never reached: the pipe cannot take that much
            yield b"x" * 65536

    await engine.feed_stdin(job.id, endless())
    assert not blocked.is_set()
    assert await output_of(engine, job.id) == b"got first\n"


async def test_a_feed_on_an_ended_job_returns_its_state(engine: JobManager) -> None:
    job = await engine.start("alice", ["true"], stdin=True)
    assert (await engine.wait(job.id)).state is State.EXITED
    info = await engine.feed_stdin(job.id, chunks(b"late"))
    assert info.state is State.EXITED
