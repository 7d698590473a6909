"""The zygote (`jobd/engine/_zygote.py`, `_shim.py --zygote`): new shims are forked by one
pre-booted process, as the server's own children; its death or absence falls back to
booting them and loses no job; nothing of it outlives the manager."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from jobd.engine import (
    EngineConfig,
    InvalidArgument,
    JobManager,
    State,
    _shimpool,
    _zygote,
    open_job_manager,
)

from .conftest import shim_children

pytestmark = pytest.mark.cgroups


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name, or None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _ppid(pid: int) -> int:
    stat = _stat(pid)
    assert stat is not None
    return int(stat[1])


def _identity(pid: int) -> tuple[int, str]:
    """(pid, start time): tells a process from a later one that took its pid."""
    stat = _stat(pid)
    assert stat is not None
    return pid, stat[19]


def _alive(who: tuple[int, str]) -> bool:
    stat = _stat(who[0])
    return stat is not None and stat[19] == who[1] and stat[0] != "Z"


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def _full_pool(engine: JobManager) -> _shimpool.ShimPool:
    pool = engine._shims
    assert pool is not None
    await pool.idle_count.wait_value(lambda idle: idle >= pool.target)
    return pool


def _waiting_job(shared: Path) -> list[str]:
    """A job that ends with exit 7 once the test creates `shared/go`."""
    return ["sh", "-c", f"while [ ! -e {shared}/go ]; do sleep 0.01; done; exit 7"]


async def test_shims_are_forked_by_the_zygote_as_the_servers_children(
    engine: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pooled shim, and every shim a Start needs when the pool is empty, is a fork of
    the zygote (none is booted), whose parent is the server itself; a job run through one
    ends exactly as its command did."""
    pool = await _full_pool(engine)
    zygote = pool.zygote.value
    assert zygote is not None and zygote.forks >= _shimpool.POOL_SIZE
    for shim in pool._idle:
        assert isinstance(shim.proc, _zygote.ForkedProcess)
        assert _ppid(shim.proc.pid) == os.getpid()  # CLONE_PARENT: the server's child
        assert _comm(shim.proc.pid) == "jobd-shim"  # a copy of the zygote, not a boot

    async def no_boot(*args: object, **kwargs: object) -> _shimpool.Shim:
        raise AssertionError("a shim was booted while the zygote runs")

    monkeypatch.setattr(_shimpool, "spawn_shim", no_boot)
    jobs = []

    async def start(code: int) -> None:
        jobs.append(await engine.start("alice", ["sh", "-c", f"exit {code}"]))

    async with trio.open_nursery() as nursery:  # more Starts than the pool holds
        for code in range(_shimpool.POOL_SIZE + 3):
            nursery.start_soon(start, code)
    for job in jobs:
        final = await engine.wait(job.id)
        assert (final.state, final.exit_code) == (State.EXITED, int(job.command[2][5:]))
    killed = await engine.start("alice", ["sh", "-c", "kill -9 $$"])
    final = await engine.wait(killed.id)
    assert (final.state, final.signal, final.exit_code) == (State.KILLED, 9, 0)


async def test_a_start_that_cannot_exec_through_a_forked_shim_creates_no_job(
    engine: JobManager,
) -> None:
    await _full_pool(engine)
    with pytest.raises(InvalidArgument, match="not found in PATH"):
        await engine.start("alice", ["no-such-program-jobd"])
    assert engine.list() == []


async def test_a_dead_zygote_loses_no_job_and_shims_are_booted_until_it_restarts(
    engine: JobManager,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    shared_dir: Path,
) -> None:
    """SIGKILL the zygote: a job running in a shim it forked, and the idle shims it forked,
    are the server's children and carry on (exact exit status); Starts then boot their
    shims (said once in the log); a new zygote starts ZYGOTE_RESTART later."""
    monkeypatch.setattr(_shimpool, "ZYGOTE_RESTART", 3600.0)  # no restart in this part
    pool = await _full_pool(engine)
    running = await engine.start("alice", _waiting_job(shared_dir))
    zygote = pool.zygote.value
    assert zygote is not None
    os.kill(zygote.proc.pid, signal.SIGKILL)
    await pool.zygote.wait_value(None)
    booted: list[object] = []
    real_spawn = _shimpool.spawn_shim

    async def spawn_shim(*args: object, **kwargs: object) -> _shimpool.Shim:
        shim = await real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        booted.append(shim)
        return shim

    monkeypatch.setattr(_shimpool, "spawn_shim", spawn_shim)
    jobs = [await engine.start("alice", ["sh", "-c", "exit 5"])
            for _ in range(_shimpool.POOL_SIZE + 2)]
    for job in jobs:
        final = await engine.wait(job.id)
        assert (final.state, final.exit_code) == (State.EXITED, 5)
    assert booted  # the pool ran dry and was refilled by boots
    assert all(isinstance(shim.proc, trio.Process) for shim in booted)  # type: ignore[attr-defined]
    (shared_dir / "go").touch()
    final = await engine.wait(running.id)
    assert (final.state, final.exit_code) == (State.EXITED, 7)
    # Said once, by whichever noticed first: its wait ("the zygote died") or a refill's fork
    # in flight when it was killed ("the zygote's socket failed").
    died = [r for r in caplog.records if "shims boot an interpreter each until it is restarted"
            in r.getMessage()]
    assert len(died) == 1 and died[0].levelno == logging.WARNING, [r.getMessage() for r in died]
    assert "the zygote died" in died[0].getMessage() or "socket failed" in died[0].getMessage()


async def test_a_dead_zygote_is_restarted(
    engine: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_shimpool, "ZYGOTE_RESTART", 0.0)
    pool = await _full_pool(engine)
    old = pool.zygote.value
    assert old is not None
    os.kill(old.proc.pid, signal.SIGKILL)
    await pool.zygote.wait_value(lambda z: z is not None and z is not old)
    await old.proc.wait()  # reaped
    job = await engine.start("alice", ["true"])
    assert (await engine.wait(job.id)).state is State.EXITED
    for _ in range(_shimpool.POOL_SIZE):  # through the pool into the new zygote's forks
        await engine.wait((await engine.start("alice", ["true"])).id)
    new = pool.zygote.value
    assert new is not None and new is not old and new.forks >= 1


async def test_without_a_zygote_shims_are_booted(
    engine_config: EngineConfig,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A zygote that cannot start (here: refused) leaves the engine working, its shims
    booted, and says so once."""
    monkeypatch.setattr(_shimpool, "ZYGOTE_RESTART", 3600.0)

    async def refused() -> _zygote.Zygote:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(_zygote, "start_zygote", refused)
    async with open_job_manager(engine_config) as engine:
        pool = await _full_pool(engine)
        assert pool.zygote.value is None
        assert all(isinstance(shim.proc, trio.Process) for shim in pool._idle)
        job = await engine.start("alice", ["sh", "-c", "exit 3"])
        assert (await engine.wait(job.id)).exit_code == 3
    said = [r for r in caplog.records if "cannot start the zygote" in r.getMessage()]
    assert len(said) == 1


async def test_a_job_with_stdin_boots_its_shim(engine: JobManager) -> None:
    """The zygote's shims have stdin /dev/null: a job with stdin boots one with a pipe."""
    await _full_pool(engine)
    job = await engine.start("alice", ["cat"], stdin=True)
    assert isinstance(engine._jobs[job.id].proc, trio.Process)

    async def chunks():  # type: ignore[no-untyped-def]
        yield b"hello"

    await engine.feed_stdin(job.id, chunks())
    assert (await engine.wait(job.id)).exit_code == 0
    out = b"".join([c.data async for c in engine.read_output(job.id)])
    assert out == b"hello"


async def test_nothing_of_the_zygote_outlives_the_manager(
    engine_config: EngineConfig, shared_dir: Path
) -> None:
    """Leaving the manager ends the zygote, every idle shim it forked, and the jobs."""
    async with open_job_manager(replace(engine_config, stop_grace=0.0)) as engine:
        pool = await _full_pool(engine)
        assert pool.zygote.value is not None
        assert _comm(pool.zygote.value.proc.pid) == "jobd-zygote"
        zygote = _identity(pool.zygote.value.proc.pid)
        shims = [_identity(shim.proc.pid) for shim in pool._idle]
        job = await engine.start("alice", _waiting_job(shared_dir))
        shims.append(_identity(engine._jobs[job.id].proc.pid))  # type: ignore[union-attr]
    assert not _alive(zygote)
    assert [s for s in shims if _alive(s)] == []
    assert shim_children() == []  # none left unreaped either


async def test_the_zygote_exits_when_its_server_goes() -> None:
    """EOF on its socket (the server shut down or died): the zygote exits by itself."""
    zygote = await _zygote.start_zygote()
    zygote._sock.close()
    assert await zygote.proc.wait() == 0


async def test_a_zygote_that_never_boots_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zygote that never says it has booted (here: a program that only sleeps) is killed
    after FORK_TIMEOUT and reported as gone, so the pool boots its shims instead of the
    server waiting for it forever at start-up."""
    silent = tmp_path / "_shim.py"  # so that shim_children() would see it left behind
    silent.write_text("import time\ntime.sleep(3600)\n")
    monkeypatch.setattr(_zygote._shim, "__file__", str(silent))
    monkeypatch.setattr(_zygote, "FORK_TIMEOUT", 0.5)
    with pytest.raises(_zygote.ZygoteGone, match="did not boot within"):
        await _zygote.start_zygote()
    assert shim_children() == []  # killed and reaped


async def test_forks_asked_for_together_go_in_one_exchange_and_share_no_pipe() -> None:
    """Forks asked for while an exchange is under way go in the next one (a burst of Starts
    waits for a couple of exchanges, not one each), and no shim of a request holds another's
    pipes: the last shim's job reports and reaches EOF while the first one still idles."""
    zygote = await _zygote.start_zygote()
    shims: list[_shimpool.Shim] = []
    try:

        async def fork() -> None:
            shims.append(await _shimpool.fork_shim(zygote))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(fork)
        assert zygote.forks == 6 and zygote.exchanges <= 2
        assert len({shim.proc.pid for shim in shims}) == 6
        assert all(_ppid(shim.proc.pid) == os.getpid() for shim in shims)
        # The zygote forks a request's shims in order: the first was forked while the later
        # ones' descriptors were still open in the zygote. A job in the last one must end as
        # usual (status EOF, output EOF) while the first idles with whatever it kept.
        last = max(shims, key=lambda shim: shim.proc.pid)
        await last.hand({"procs": [], "uid": None, "gid": None, "cwd": "/",
                         "argv": ["sh", "-c", "echo out"], "env": {"PATH": os.defpath},
                         "sandbox": None, "nofile": 0})
        with trio.fail_after(60):  # a hang guard: a shim holding its pipes never lets go
            assert await last.verdict() == b""
            assert last.proc.stdout is not None
            out = b""
            while chunk := await last.proc.stdout.receive_some(4096):
                out += chunk
            assert out == b"out\n"
            assert await last.proc.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            for shim in shims:
                await shim.discard()
            await zygote.aclose()
    assert shim_children() == []


async def test_a_fork_cancelled_before_its_exchange_forks_nothing() -> None:
    """A caller cancelled while it waits for an earlier exchange is taken out of the queue:
    nothing is forked for it, and the forks around it are unharmed."""
    zygote = await _zygote.start_zygote()
    shims: list[_shimpool.Shim] = []
    try:
        async with trio.open_nursery() as nursery:

            async def fork() -> None:
                shims.append(await _shimpool.fork_shim(zygote))

            nursery.start_soon(fork)
            await trio.testing.wait_all_tasks_blocked()  # its exchange is under way
            with trio.CancelScope() as cancelled:
                cancelled.cancel()
                await _shimpool.fork_shim(zygote)
            assert cancelled.cancelled_caught
            assert zygote._pending == []
            nursery.start_soon(fork)
        assert zygote.forks == 2 and len(shims) == 2
    finally:
        with trio.CancelScope(shield=True):
            for shim in shims:
                await shim.discard()
            await zygote.aclose()
    assert shim_children() == []
