"""Fault containment at test size: a real server under `prlimit --nofile=...` running jobs
until it has no descriptor left. Found on the first milestone: EMFILE raised in the shim
pool's refill task ended the job manager's nursery and the whole server exited, killing every
user's jobs. Now a Start that cannot get its descriptors answers RESOURCE_EXHAUSTED naming
the cause, the running jobs and the server carry on, and Starts work again once jobs end."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from jobd.v1 import jobd_pb2 as pb

from ..e2e import Pki
from .harness import ServerProcess, assert_nothing_left, channel, follow, new_cgroup_name

pytestmark = pytest.mark.cgroups
TIMEOUT = 60


def test_out_of_file_descriptors_is_resource_exhausted(hostile_pki: Pki, tmp_path: Path) -> None:
    server = ServerProcess(
        hostile_pki, tmp_path / "data", new_cgroup_name(), prefix=("prlimit", "--nofile=160")
    ).start()
    try:
        with channel(server) as (_, alice):
            running: list[str] = []
            refused: grpc.RpcError | None = None
            for _ in range(200):  # each running job holds a few descriptors: 160 run out
                try:
                    job = alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT)
                except grpc.RpcError as exc:
                    refused = exc
                    break
                running.append(job.id)
            assert refused is not None, "160 descriptors did not run out"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            assert "open file" in refused.details() or "ulimit" in refused.details()
            assert running  # some ran before it ran out
            for job_id in running:  # every one still running, the server still serving
                job = alice.Status(pb.JobRequest(id=job_id), timeout=TIMEOUT)
                assert job.state == pb.RUNNING
            for job_id in running[: len(running) // 2 + 1]:
                alice.Stop(pb.StopRequest(id=job_id), timeout=TIMEOUT)
            job = alice.Start(pb.StartRequest(command=["echo", "again"]), timeout=TIMEOUT)
            assert follow(alice, job.id)[1] == 6
            for job_id in running:
                alice.Stop(pb.StopRequest(id=job_id), timeout=TIMEOUT)
        assert "Traceback" not in server.text, server.text[-5000:]
    finally:
        rc = server.terminate()
    assert rc == 0, server.text
    assert_nothing_left(server)
