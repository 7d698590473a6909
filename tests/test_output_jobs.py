"""Output bounds with real jobs: the engine and the real server on small real tmpfs data dirs
(two users, one flooding; a job blocked on a full disk and resumed; no inodes on Start), no
descriptor kept by ended jobs, and the Output RPC's seeking fields over real gRPC."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import trio

from jobd.engine import (
    EngineConfig,
    JobManager,
    ResourceExhausted,
    State,
    open_job_manager,
)
from jobd.engine._cgroup import block_device_of
from jobd.engine._output import OutputStore
from jobd.v1 import jobd_pb2 as pb

from .conftest import unique_uid_range
from .e2e import Pki, Server, running_server
from .test_e2e import _code, _grpc_stub
from .test_retention import fds, fill, tmpfs, use_up_inodes

pytestmark = pytest.mark.cgroups

SEQ = b"".join(b"%d\n" % i for i in range(1, 200_001))  # what `seq 200000` prints


@asynccontextmanager
async def engine_on_tmpfs(
    tmp_path: Path, cgroup_name: str, *options: str, **config: object
) -> AsyncIterator[tuple[JobManager, Path]]:
    with tmpfs(tmp_path / "data", *options) as data:
        engine_config = EngineConfig(
            data_dir=data, cgroup_name=cgroup_name, io_devices=(block_device_of(tmp_path),),
            job_uids=unique_uid_range(), uid_registry=tmp_path / "uid-ranges",
            **config,  # type: ignore[arg-type]
        )
        async with open_job_manager(engine_config) as engine:
            yield engine, data


def out(engine: JobManager, job_id: str) -> OutputStore:
    store = engine._output.get(job_id)
    assert store is not None
    return store


async def output_of(engine: JobManager, job_id: str) -> bytes:
    return b"".join([c.data async for c in engine.read_output(job_id, follow=True)])


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for a condition the engine reaches on its own (a pump blocking on a full disk),
    which signals no event; no timing matters, the test only waits for it."""
    with trio.fail_after(120):  # a bound on a hang, not a timing assertion
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


@pytest.mark.parametrize("max_data", [None, 0], ids=["quota", "filesystem"])
async def test_one_users_flood_never_costs_another_users_output(
    tmp_path: Path, cgroup_name: str, max_data: int | None
) -> None:
    """A 16 MiB data dir; bob floods 32 MiB and goes on; alice's output is complete and
    neither job is killed. quota: --max-data's default (4 MiB here); filesystem: no quota,
    so the disk itself fills (ENOSPC)."""
    async with engine_on_tmpfs(tmp_path, cgroup_name, "size=16m", max_data=max_data) as (
        engine, _,
    ):
        flood = await engine.start("bob", ["yes"])
        bobs = out(engine, flood.id)
        # It filled the data dir (twice over), and lost its own oldest output.
        await wait_until(lambda: bobs.size > 32 << 20)
        assert bobs.start > 0
        # While it runs (an ended job's output would be the first to go, by design).
        alice = await engine.start("alice", ["sh", "-c", "seq 200000; exec sleep 1000"])
        got = bytearray()
        async for chunk in engine.read_output(alice.id, follow=True):
            got += chunk.data
            if got.endswith(b"\n200000\n"):
                break
        assert got == SEQ
        assert out(engine, alice.id).start == 0
        assert engine.status(alice.id).state is State.RUNNING
        assert not bobs.blocked and engine.status(flood.id).state is State.RUNNING
        stopped = await engine.stop(flood.id, grace=0)
        assert stopped.state is State.STOPPED  # stopped by us, never killed for the disk
        assert bobs.size - bobs.start >= 1 << 20


async def test_a_capped_output_survives_a_restart_with_its_offsets(
    tmp_path: Path, cgroup_name: str
) -> None:
    """--max-job-output dropped the oldest part; after a restart Status and Output say the
    same: output_bytes counts everything, output_start where kept output begins, and the
    kept bytes are byte for byte at their offsets."""
    seq = b"".join(b"%d\n" % i for i in range(1, 1_000_001))
    config = EngineConfig(data_dir=tmp_path / "data", cgroup_name=cgroup_name,
                          job_uids=unique_uid_range(), uid_registry=tmp_path / "uid-ranges",
                          max_job_output=128 * 1024)
    async with open_job_manager(config) as engine:
        job = await engine.start("alice", ["seq", "1000000"])  # 6.9 MB, written in pieces
        await engine.wait(job.id)
        before = engine.status(job.id)
        first = [c async for c in engine.read_output(job.id)]
    assert before.output_bytes == len(seq) and 0 < before.output_start < len(seq)
    assert first[0].offset == before.output_start
    async with open_job_manager(config) as engine:
        after = engine.status(job.id)
        assert (after.output_bytes, after.output_start) == (len(seq), before.output_start)
        again = [c async for c in engine.read_output(job.id, 0)]
        assert again == first
        assert b"".join(c.data for c in again) == seq[after.output_start :]
        tail = b"".join([c.data async for c in engine.read_output(job.id, tail_lines=2)])
        assert tail == b"999999\n1000000\n"


@pytest.mark.parametrize("then", ["free space", "stop it"])
async def test_a_job_blocked_on_a_full_disk_waits_and_resumes_losslessly(
    tmp_path: Path, cgroup_name: str, then: str
) -> None:
    async with engine_on_tmpfs(tmp_path, cgroup_name, "size=8m", max_data=0) as (engine, data):
        foreign = fill(data, leave=64 * 1024)  # an operator's file fills the disk
        job = await engine.start("alice", ["seq", "200000"])
        output = out(engine, job.id)
        await wait_until(lambda: bool(output.blocked))
        assert "is full (No space left on device)" in output.blocked
        assert str(data) in output.blocked
        assert engine.status(job.id).output_blocked == output.blocked  # Status says why
        # The job waits on its pipe: not killed, not ended, and the engine goes on serving.
        # (A Start here would need room in the job store, which this full disk has not.)
        assert engine.status(job.id).state is State.RUNNING
        # Another Start runs if the job store can still commit its record (SQLite may reuse
        # its WAL), else it is refused with RESOURCE_EXHAUSTED naming the data dir: never a
        # job that a restart would not know.
        try:
            other = await engine.start("bob", ["true"])
        except ResourceExhausted as exc:
            assert "disk is full" in str(exc) and str(data) in str(exc)
        else:
            await engine.wait(other.id)
        if then == "free space":
            foreign.unlink()  # found by the space's poll, within a second
            assert await output_of(engine, job.id) == SEQ
            final = engine.status(job.id)
            assert final.state is State.EXITED and final.exit_code == 0
            assert output.blocked == ""
        else:
            stopped = await engine.stop(job.id, grace=0)  # returns: the job ends
            assert stopped.state is State.STOPPED
            kept = await output_of(engine, job.id)
            assert SEQ.startswith(kept) and len(kept) < len(SEQ)
            assert output.blocked == ""
    # (leaving the engine stopped everything cleanly: the fixtures check nothing is left)


async def test_no_inodes_on_start_is_resource_exhausted_and_creates_nothing(
    tmp_path: Path, cgroup_name: str
) -> None:
    async with engine_on_tmpfs(tmp_path, cgroup_name, "size=8m", "nr_inodes=64") as (
        engine, data,
    ):
        made = use_up_inodes(data)
        with pytest.raises(ResourceExhausted, match=f"in {data}/output: No space left"):
            await engine.start("alice", ["echo", "hi"])
        assert engine.list() == []
        assert list((data / "output").iterdir()) == []
        for path in made[:8]:
            path.unlink()
        job = await engine.start("alice", ["echo", "hi"])
        assert await output_of(engine, job.id) == b"hi\n"


async def test_ended_jobs_hold_no_descriptors(tmp_path: Path, cgroup_name: str) -> None:
    """Found: each ended job kept its two output files open (500 jobs: 35 -> 1,036 fds)."""
    config = EngineConfig(
        data_dir=tmp_path / "data", cgroup_name=cgroup_name,
        job_uids=unique_uid_range(), uid_registry=tmp_path / "uid-ranges",
    )
    async with open_job_manager(config) as engine:
        warm = await engine.start("alice", ["echo", "warm"])
        await output_of(engine, warm.id)
        before = fds()
        for batch in range(10):
            jobs = [await engine.start("alice", ["echo", f"{batch}-{i}"]) for i in range(20)]
            for i, job in enumerate(jobs):
                assert await output_of(engine, job.id) == f"{batch}-{i}\n".encode()
                await engine.wait(job.id)
        # The shim pool keeps a few pre-started shims (their pipes) in flux: allow for them,
        # not for 200 jobs' files (400 descriptors before the fix).
        assert len(fds() - before) <= 12
        assert all(out(engine, j.id).statistics().open_fds == 0 for j in jobs)


# ----------------------------------------------------------------- the real server


async def test_server_start_on_a_data_dir_without_inodes_is_resource_exhausted(
    tmp_path: Path, cgroup_name: str
) -> None:
    pki_ = Pki.make(tmp_path / "certs")
    with tmpfs(tmp_path / "data", "size=8m", "nr_inodes=64") as data:
        device = block_device_of(tmp_path)
        async with running_server(tmp_path, pki_, cgroup_name, "--io-device", device) as server:
            made = use_up_inodes(data)
            result = await server.client("start", "--", "echo", "hi")
            assert result.rc == 1
            assert "RESOURCE_EXHAUSTED" in result.err and "No space left" in result.err, result
            assert "Traceback" not in result.err and "UNKNOWN" not in result.err
            for path in made:
                path.unlink()
            job = await server.start_job("echo", "hi")
            logs = await server.client("logs", "-f", job, check=True)
            assert logs.stdout == b"hi\n"


async def test_sigterm_stops_a_server_whose_jobs_wait_on_a_full_disk(
    tmp_path: Path, cgroup_name: str
) -> None:
    """The job blocks on its pipe, the operator log says so once, the server keeps serving,
    and SIGTERM still stops everything and exits 0 (running_server checks both)."""
    pki_ = Pki.make(tmp_path / "certs")
    with tmpfs(tmp_path / "data", "size=8m") as data:
        device = block_device_of(tmp_path)
        async with running_server(
            tmp_path, pki_, cgroup_name, "--io-device", device, "--max-data", "0"
        ) as server:
            fill(data, leave=64 * 1024)
            job = await server.start_job("sh", "-c", "while :; do seq 100000; done")
            await wait_until(lambda: b"output blocked" in server.log)
            status = await server.client("status", job, check=True)
            assert status.stdout == b"running\n"
        assert server.log.count(b"output blocked") == 1
        assert b"is full (No space left on device)" in server.log


def _seeking(server: Server, job_id: str) -> dict[str, object]:
    channel, stub = _grpc_stub(server, "alice")
    out: dict[str, object] = {}

    def read(**fields: object) -> list[tuple[int, int, bytes]]:
        request = pb.OutputRequest(id=job_id, **fields)  # type: ignore[arg-type]
        return [(c.stream, c.offset, c.data) for c in stub.Output(request, timeout=10)]

    with channel:
        everything = read()
        out["all"] = everything
        out["tail"] = read(tail_lines=2)
        out["stderr"] = read(stream=pb.STDERR)
        out["stdout_tail"] = read(stream=pb.STDOUT, tail_lines=1)
        times = [c.time for c in stub.Output(pb.OutputRequest(id=job_id), timeout=10)]
        out["since_last"] = read(since=times[-1])
        out["since_future"] = read(since={"seconds": 4_000_000_000})
        out["bad_stream"] = _code(lambda: read(stream=7))
        out["bad_tail"] = _code(lambda: read(tail_lines=-1))
    return out


async def test_output_rpc_seeks_by_lines_time_and_stream(tmp_path: Path, cgroup_name: str) -> None:
    pki_ = Pki.make(tmp_path / "certs")
    async with running_server(tmp_path, pki_, cgroup_name) as server:
        job = await server.start_job(
            "sh", "-c", "printf 'o1\\no2\\n'; sleep 0.1; printf 'e1\\n' >&2; sleep 0.1; "
            "printf 'o3\\n'"
        )
        await server.client("logs", "-f", job, check=True)
        out = await trio.to_thread.run_sync(_seeking, server, job)
    assert b"".join(d for _, _, d in out["all"]) == b"o1\no2\ne1\no3\n"  # type: ignore[attr-defined]
    assert out["tail"] == [(pb.STDERR, 6, b"e1\n"), (pb.STDOUT, 9, b"o3\n")]
    assert out["stderr"] == [(pb.STDERR, 6, b"e1\n")]
    assert out["stdout_tail"] == [(pb.STDOUT, 9, b"o3\n")]
    assert out["since_last"] == [(pb.STDOUT, 9, b"o3\n")]
    assert out["since_future"] == []
    assert out["bad_stream"] == grpc.StatusCode.INVALID_ARGUMENT
    assert out["bad_tail"] == grpc.StatusCode.INVALID_ARGUMENT


def test_fds_helper_counts_this_process() -> None:
    before = fds()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert fds() - before == {str(fd)}
    finally:
        os.close(fd)
