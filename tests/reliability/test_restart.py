"""Restarts of a real server under load: SIGTERM and SIGKILL at a random point while jobs
print heavily. Every kept job's record and output must be there afterwards, byte for byte
(sha256 per stream, offsets unchanged), with the right end state and reason; Stop, Status,
Wait and Output work on them; the new server's own SIGTERM leaves nothing but kept jobs."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobd.v1 import jobd_pb2 as pb

from ..e2e import Pki
from .harness import (
    ServerProcess,
    assert_nothing_left,
    channel,
    follow,
    new_cgroup_name,
    scale,
    wait_until,
)

pytestmark = pytest.mark.cgroups
TIMEOUT = 60


def _lines_are_whole(data: bytes, *, torn_end: bool) -> int:
    """The "line N" sequence a printer job writes, from 0 with no gap or repeat; the count."""
    lines = data.split(b"\n")
    last = lines.pop()  # after the final newline: b"" or a line cut by the kill
    assert torn_end or last == b""
    for i, line in enumerate(lines):
        assert line == b"line %d" % i, (i, line)
    return len(lines)


def _sums(stub: Any, job_id: str) -> tuple[dict[int, str], int]:
    """sha256 per stream of the job's whole output, and its size."""
    sums, size = follow(stub, job_id)
    return {stream: h.hexdigest() for stream, h in sums.items()}, size


def _output(stub: Any, job_id: str) -> bytes:
    data = bytearray()
    at = 0
    for chunk in stub.Output(pb.OutputRequest(id=job_id, follow=True), timeout=TIMEOUT):
        assert chunk.offset == at
        data += chunk.data
        at += len(chunk.data)
    return bytes(data)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_restart_under_load_keeps_every_record_and_output(
    hostile_pki: Pki, tmp_path: Path, how: str
) -> None:
    finished_n, printers_n = scale(8, 50), scale(4, 20)
    name = new_cgroup_name()
    server = ServerProcess(hostile_pki, tmp_path / "data", name).start()
    try:
        with channel(server) as (_, alice):
            finished = []
            for i in range(finished_n):
                size = random.randrange(1, 2_000_000)
                script = f"head -c {size} /dev/urandom; echo err{i} >&2; exit {i % 3}"
                finished.append(
                    alice.Start(
                        pb.StartRequest(command=["sh", "-c", script], name=f"done-{i}",
                                        labels={"kind": "done"}),
                        timeout=TIMEOUT,
                    ).id
                )
            printers = [
                alice.Start(
                    pb.StartRequest(
                        command=["sh", "-c", "i=0; while :; do echo line $i; i=$((i+1)); done"],
                        labels={"kind": "printer"},
                    ),
                    timeout=TIMEOUT,
                ).id
                for _ in range(printers_n)
            ]
            before = {}
            for job_id in finished:
                before[job_id] = _sums(alice, job_id)
                ended = alice.Wait(pb.JobRequest(id=job_id), timeout=TIMEOUT)
                assert ended.reason == pb.END_REASON_EXIT
            records = {j.id: j for j in alice.List(pb.ListRequest(), timeout=TIMEOUT).jobs}
            for job_id in printers:  # heavy output is flowing in every printer
                for chunk in alice.Output(pb.OutputRequest(id=job_id, follow=True),
                                          timeout=TIMEOUT):
                    if chunk.offset > 100_000:
                        break
        time.sleep(random.uniform(0, 0.3))  # a random point in the flood, not a wait
        if how == "SIGTERM":
            assert server.terminate() == 0, server.text
        else:
            server.crash()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.crash()

    second = ServerProcess(hostile_pki, tmp_path / "data", name, uids=server.uids).start()
    try:
        with channel(second) as (_, alice):
            for job_id in finished:
                assert _sums(alice, job_id) == before[job_id]  # byte for byte
                job = alice.Status(pb.JobRequest(id=job_id), timeout=TIMEOUT)
                old = records[job_id]
                assert (job.state, job.reason, job.exit_code, job.name, dict(job.labels)) == (
                    old.state, old.reason, old.exit_code, old.name, dict(old.labels)
                )
                assert job.output_bytes == before[job_id][1] and job.uid == old.uid
            for job_id in printers:
                job = alice.Wait(pb.JobRequest(id=job_id), timeout=TIMEOUT)
                if how == "SIGTERM":
                    assert (job.state, job.reason) == (pb.STOPPED, pb.END_REASON_SERVER_SHUTDOWN)
                else:
                    assert (job.state, job.reason, job.signal) == (
                        pb.KILLED, pb.END_REASON_SERVER_LOST, 9
                    )
                data = _output(alice, job_id)
                assert len(data) == job.output_bytes > 100_000
                _lines_are_whole(data, torn_end=True)
                assert alice.Stop(pb.StopRequest(id=job_id), timeout=TIMEOUT) == job
                assert alice.Status(pb.JobRequest(id=job_id), timeout=TIMEOUT) == job
            listed = alice.List(pb.ListRequest(labels={"kind": "printer"}), timeout=TIMEOUT)
            assert sorted(j.id for j in listed.jobs) == sorted(printers)
            new = alice.Start(pb.StartRequest(command=["echo", "after"]), timeout=TIMEOUT)
            assert follow(alice, new.id)[1] == 6
            with pytest.raises(grpc.RpcError) as taken:
                alice.Start(pb.StartRequest(command=["true"], name="done-0"), timeout=TIMEOUT)
            assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
        second.check_healthy()
    finally:
        rc = second.terminate()
    assert rc == 0, second.text
    assert_nothing_left(second)


def test_start_is_recorded_before_it_is_answered(hostile_pki: Pki, tmp_path: Path) -> None:
    """SIGKILL right after Start answers: the job is in the next server's records."""
    name = new_cgroup_name()
    server = ServerProcess(hostile_pki, tmp_path / "data", name).start()
    try:
        with channel(server) as (_, alice):
            ids = [
                alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT).id
                for _ in range(5)
            ]
    finally:
        server.crash()
    second = ServerProcess(hostile_pki, tmp_path / "data", name, uids=server.uids).start()
    try:
        with channel(second) as (_, alice):
            for job_id in ids:
                job = alice.Status(pb.JobRequest(id=job_id), timeout=TIMEOUT)
                assert (job.state, job.reason) == (pb.KILLED, pb.END_REASON_SERVER_LOST)
    finally:
        assert second.terminate() == 0, second.text
    assert_nothing_left(second)


def _children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, start time, name) of each live child of `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            out.append((int(entry.name), stat[19], cmd))
    return out


def _alive(pid: int, started: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[19] == started and stat[0] != "Z"


def test_a_crashed_servers_zygote_and_idle_shims_exit(hostile_pki: Pki, tmp_path: Path) -> None:
    """SIGKILL the server: its zygote (EOF on its socket) and the idle shims it forked (EOF
    on their control pipes) exit by themselves; the next server reaps their spare leaves."""
    name = new_cgroup_name()
    server = ServerProcess(hostile_pki, tmp_path / "data", name).start()
    children: list[tuple[int, str, str]] = []

    def zygote_and_shims() -> bool:
        children[:] = _children(server.pid)
        names = [c[2] for c in children]
        return names.count("jobd-zygote") == 1 and "jobd-shim" in names

    try:
        try:
            with channel(server) as (_, alice):  # a Start: the pool is full and forked by now
                job = alice.Start(pb.StartRequest(command=["true"]), timeout=TIMEOUT)
                alice.Wait(pb.JobRequest(id=job.id), timeout=TIMEOUT)
            # On a stalled host the zygote's boot or a fork can pass its bound (the pool then
            # boots shims and starts a new zygote a moment later): wait for it, not one look.
            wait_until(zygote_and_shims, "the server's zygote and idle shims")
        finally:
            server.crash()
        wait_until(lambda: not any(_alive(pid, started) for pid, started, _ in children),
                   "the zygote and the idle shims of a dead server to exit")
    finally:  # whatever failed above, the next server reaps the dead one's tree
        second = ServerProcess(hostile_pki, tmp_path / "data", name, uids=server.uids).start()
        code = second.terminate()
    assert code == 0, second.text
    assert_nothing_left(second)
