"""Job records: kept in the data dir's SQLite store across restarts, end reasons, timeout,
Wait, Remove, names and labels, List pages and filters, --keep-finished. Real engines on
real cgroups; a "crash" at engine level is a record left RUNNING in the store (the real
SIGKILL of a real server is in tests/reliability/test_restart.py)."""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import sqlite3
import uuid

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from jobd.engine import (
    AlreadyExists,
    EndReason,
    EngineConfig,
    FailedPrecondition,
    InvalidArgument,
    JobdError,
    JobManager,
    NotFound,
    State,
    _records,
    open_job_manager,
)
from jobd.engine._store import SCHEMA_VERSION, Put, Store
from jobd.engine._types import JobInfo

from .conftest import unique_uid_range
from .test_engine import output_of, wait_for_output

pytestmark = pytest.mark.cgroups


async def test_records_survive_a_clean_restart(engine_config: EngineConfig) -> None:
    async with open_job_manager(engine_config) as engine:
        done = await engine.start(
            "alice", ["sh", "-c", "exit 3"], name="three", labels={"team": "a"}, timeout=60
        )
        await engine.wait(done.id)
        running = await engine.start("bob", ["sh", "-c", "echo ready; exec sleep 1000"])
        await wait_for_output(engine, running.id, b"ready")
    async with open_job_manager(engine_config) as engine:
        old = engine.status(done.id)
        assert (old.state, old.reason, old.exit_code) == (State.EXITED, EndReason.EXIT, 3)
        assert (old.name, old.labels, old.timeout, old.owner) == (
            "three", (("team", "a"),), 60.0, "alice"
        )
        assert old.command == ("sh", "-c", "exit 3") and old.working_dir == "/"
        shut = engine.status(running.id)
        assert (shut.state, shut.reason, shut.signal) == (
            State.STOPPED, EndReason.SERVER_SHUTDOWN, signal.SIGTERM
        )
        assert shut.ended_at >= shut.started_at > 0
        assert await engine.stop(shut.id) == shut  # Stop and Wait on an ended job work
        assert await engine.wait(shut.id) == shut
        assert [j.id for j in engine.list()] == [running.id, done.id]  # newest first
        new = await engine.start("alice", ["true"])
        assert new.seq > running.seq > done.seq


async def test_a_job_left_running_by_a_crash_is_recorded_lost(
    engine_config: EngineConfig,
) -> None:
    """A record found RUNNING at start-up: its server died (the cgroup reap killed it)."""
    async with open_job_manager(engine_config) as engine:
        job = await engine.start("alice", ["true"])
        await engine.wait(job.id)
    store = Store(engine_config.data_dir / "jobs.sqlite3")
    store.apply([Put(dataclasses.replace(job, state=State.RUNNING))])
    store.close()
    async with open_job_manager(engine_config) as engine:
        lost = engine.status(job.id)
        assert (lost.state, lost.reason, lost.signal) == (
            State.KILLED, EndReason.SERVER_LOST, signal.SIGKILL
        )
        assert await engine.wait(job.id) == lost
        assert engine.list() == [lost]
    async with open_job_manager(engine_config) as engine:
        assert engine.status(job.id) == lost  # and that is what was committed


async def test_a_database_locked_by_another_process_delays_a_start_not_the_server(
    engine: JobManager, engine_config: EngineConfig
) -> None:
    """A Start's record commits on the event loop's thread when it can; with the database
    locked by another process (an operator's sqlite3 shell, a backup) it commits in a worker
    thread once the lock is released: meanwhile the server runs on (seen failing with the
    commit waiting for the lock on the loop's thread: every task stood still until the
    Start failed RESOURCE_EXHAUSTED, 5 s later)."""
    other = sqlite3.connect(engine_config.data_dir / "jobs.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        started: list[str] = []

        async def start() -> None:
            started.append((await engine.start("alice", ["true"])).id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await trio.testing.wait_all_tasks_blocked()  # the loop is not held up
            assert started == []  # the Start waits for its record
            assert engine.list() == []
            other.execute("COMMIT")
        assert (await engine.wait(started[0])).state is State.EXITED
    finally:
        other.close()


async def test_the_write_ahead_log_is_checkpointed_and_stays_bounded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits on the event loop's thread never checkpoint (a checkpoint syncs); the
    checkpoint runs in a worker thread every CHECKPOINT_OPS ops, so the WAL stays bounded
    and every record is kept (seen failing without it: the WAL grew with every commit, to
    4.6 MB for 500 ops here)."""
    monkeypatch.setattr(_records, "CHECKPOINT_OPS", 50)
    path = tmp_path / "jobs.sqlite3"
    records = await _records.Records.open(path, uid_range=None)
    jobs = [
        JobInfo(
            id=str(uuid.uuid4()), owner="alice", command=("true",), state=State.EXITED, seq=i + 1
        )
        for i in range(500)
    ]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(records.run)
            for job in jobs:
                records.add(job)
                await records.write_durably(Put(job))
            wal = (tmp_path / "jobs.sqlite3-wal").stat().st_size
            nursery.cancel_scope.cancel()
    finally:
        await records.aclose()
    assert wal < 1_000_000  # ~50 ops' worth of pages, not 500
    store = Store(path)
    try:
        assert [job.id for job in store.load()[0]] == [job.id for job in jobs]
    finally:
        store.close()


async def test_a_newer_schema_is_refused(engine_config: EngineConfig) -> None:
    async with open_job_manager(engine_config):
        pass
    db = sqlite3.connect(engine_config.data_dir / "jobs.sqlite3")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(JobdError, match="newer than this jobd's"):
        async with open_job_manager(engine_config):
            pass


async def test_timeout_stops_the_job(engine: JobManager) -> None:
    job = await engine.start("alice", ["sleep", "1000"], timeout=0.2)
    final = await engine.wait(job.id)
    assert (final.state, final.reason, final.signal) == (
        State.STOPPED, EndReason.TIMEOUT, signal.SIGTERM
    )


async def test_end_reasons_of_exit_and_signal(engine: JobManager) -> None:
    exited = await engine.wait((await engine.start("alice", ["true"])).id)
    assert (exited.state, exited.reason) == (State.EXITED, EndReason.EXIT)
    killed = await engine.wait((await engine.start("alice", ["sh", "-c", "kill -9 $$"])).id)
    assert (killed.state, killed.reason, killed.signal) == (
        State.KILLED, EndReason.SIGNAL, signal.SIGKILL
    )


async def test_remove(engine: JobManager, engine_config: EngineConfig) -> None:
    job = await engine.start("alice", ["sh", "-c", "echo hi; exec sleep 1000"], name="rm-me")
    await wait_for_output(engine, job.id, b"hi")
    with pytest.raises(FailedPrecondition, match="still running"):
        await engine.remove(job.id)
    assert engine.status(job.id).state is State.RUNNING
    final = await engine.remove(job.id, force=True)
    assert (final.state, final.reason) == (State.STOPPED, EndReason.STOP)
    with pytest.raises(NotFound):
        engine.status(job.id)
    with pytest.raises(NotFound):
        engine.read_output(job.id)
    assert not list((engine_config.data_dir / "output").glob(f"{job.id}*"))
    again = await engine.start("alice", ["true"], name="rm-me")  # the name is free again
    await engine.wait(again.id)
    await engine.remove(again.id)
    assert engine.list() == []


async def test_removed_jobs_stay_removed_after_a_restart(engine_config: EngineConfig) -> None:
    async with open_job_manager(engine_config) as engine:
        gone = await engine.start("alice", ["true"])
        kept = await engine.start("alice", ["echo", "kept"])
        await engine.wait(gone.id)
        await engine.remove(gone.id)
        await engine.wait(kept.id)
    async with open_job_manager(engine_config) as engine:
        assert [j.id for j in engine.list()] == [kept.id]


async def test_names_are_unique_per_owner_and_checked(engine: JobManager) -> None:
    first = await engine.start("alice", ["sleep", "1000"], name="build")
    with pytest.raises(AlreadyExists, match="already has a job named 'build'"):
        await engine.start("alice", ["true"], name="build")
    bobs = await engine.start("bob", ["true"], name="build")  # another owner's namespace
    for bad in ("-x", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidArgument, match="bad job name"):
            await engine.start("alice", ["true"], name=bad)
    with pytest.raises(InvalidArgument, match="at most 32"):
        await engine.start("alice", ["true"], labels={f"k{i}": "v" for i in range(33)})
    with pytest.raises(InvalidArgument, match="bad label key"):
        await engine.start("alice", ["true"], labels={"": "v"})
    with pytest.raises(InvalidArgument, match="bad value of label"):
        await engine.start("alice", ["true"], labels={"k": "\n"})
    with pytest.raises(InvalidArgument, match="command line is too long"):
        await engine.start("alice", ["echo", *(["x" * 100_000] * 3)])
    with pytest.raises(InvalidArgument, match="timeout must be"):
        await engine.start("alice", ["true"], timeout=-1)
    assert {j.id for j in engine.list()} == {first.id, bobs.id}
    await engine.stop(first.id, 0)


async def test_list_filters(engine: JobManager) -> None:
    a = await engine.start("alice", ["true"], name="a", labels={"env": "prod", "team": "x"})
    b = await engine.start("alice", ["sleep", "1000"], labels={"env": "prod"})
    c = await engine.start("bob", ["true"], labels={"env": "dev"})
    await engine.wait(a.id)
    await engine.wait(c.id)

    def ids(**kw: object) -> list[str]:
        return [j.id for j in engine.list_page(**kw).jobs]  # type: ignore[arg-type]

    assert ids() == [c.id, b.id, a.id]
    assert ids(owner="alice") == [b.id, a.id]
    assert ids(states=frozenset({State.RUNNING})) == [b.id]
    assert ids(labels={"env": "prod"}) == [b.id, a.id]
    assert ids(labels={"env": "prod", "team": "x"}) == [a.id]
    assert ids(name="a") == [a.id]
    assert ids(id_prefix=c.id[:6].upper()) == [c.id]
    for bad in ("abc", "xyzw", "a-b-"):
        with pytest.raises(InvalidArgument, match="id_prefix"):
            ids(id_prefix=bad)
    page = engine.list_page(limit=2)
    assert [j.id for j in page.jobs] == [c.id, b.id] and page.more
    rest = engine.list_page(limit=2, before=page.jobs[-1].seq)
    assert [j.id for j in rest.jobs] == [a.id] and not rest.more
    await engine.stop(b.id, 0)


async def test_keep_finished_forgets_ended_jobs(engine_config: EngineConfig) -> None:
    """A short real --keep-finished (real I/O races it, so no fake clock), waited on by
    the records' removal count."""
    config = dataclasses.replace(engine_config, keep_finished=0.5)
    async with open_job_manager(config) as engine:
        running = await engine.start("alice", ["sleep", "1000"])
        job = await engine.start("alice", ["echo", "bye"])
        assert await output_of(engine, job.id) == b"bye\n"
        await engine._records.removed_count.wait_value(1)
        with pytest.raises(NotFound):
            engine.status(job.id)
        assert not list((config.data_dir / "output").glob(f"{job.id}*"))
        assert engine.status(running.id).state is State.RUNNING  # only ended jobs expire
        await engine.stop(running.id, 0)
        await engine._records.removed_count.wait_value(2)
    async with open_job_manager(config) as engine:
        assert engine.list() == []


# One step between two List pages: start a job that ends at once, start one that keeps
# running, stop a running one, or remove an ended one.
_STEPS = st.lists(st.sampled_from(["start-true", "start-sleep", "stop", "remove"]), max_size=4)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.integers(min_value=0, max_value=12),
    page_size=st.integers(min_value=1, max_value=5),
    between=st.lists(_STEPS, max_size=8),
)
async def test_pages_never_miss_or_repeat_a_job(
    engine_config: EngineConfig, tmp_path_factory: pytest.TempPathFactory,
    before: int, page_size: int, between: list[list[str]],
) -> None:  # fmt: skip
    """Every job kept from the first page to the last is listed exactly once, newest first,
    however many jobs start, end or are removed between the pages."""
    config = dataclasses.replace(
        engine_config,
        data_dir=tmp_path_factory.mktemp("data"),
        job_uids=unique_uid_range(),
    )
    async with open_job_manager(config) as engine:
        initial = [await engine.start("alice", ["true"]) for _ in range(before)]
        for job in initial:
            await engine.wait(job.id)
        removed: set[str] = set()
        seen: list[str] = []
        seqs: list[int] = []
        cursor: int | None = None
        steps = iter(between)
        while True:
            page = engine.list_page(before=cursor, limit=page_size)
            seen += [j.id for j in page.jobs]
            seqs += [j.seq for j in page.jobs]
            if not page.more:
                break
            cursor = page.jobs[-1].seq
            for step in next(steps, []):
                running = [j for j in engine.list() if j.state is State.RUNNING]
                ended = [j for j in engine.list() if j.state is not State.RUNNING]
                if step == "start-true":
                    await engine.start("alice", ["true"])
                elif step == "start-sleep":
                    await engine.start("alice", ["sleep", "1000"])
                elif step == "stop" and running:
                    await engine.stop(running[0].id, 0)
                elif step == "remove" and ended:
                    removed.add((await engine.remove(ended[-1].id)).id)
        assert len(seen) == len(set(seen)), "a job was listed twice"
        assert seqs == sorted(seqs, reverse=True)
        missed = {j.id for j in initial} - removed - set(seen)
        assert not missed
        with trio.fail_after(60):
            for job in engine.list(owner="alice"):
                await engine.stop(job.id, 0)
