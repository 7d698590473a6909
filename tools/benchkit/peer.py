"""Baseline B: what a Python user would otherwise build. A minimal `grpc.aio` (grpcio) server of
the same JobService over the same mTLS certificates, no cgroups, no output store: Start
remembers the command, Output runs it and streams its stdout in 64 KiB reads, Status and List
build the same `Job` messages from a dict. Run as `bench.py --peer CERTS_DIR`; prints its port.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc as pb_grpc


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class PeerService(pb_grpc.JobServiceServicer):
    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, list[str], float]] = {}

    def _job(self, job_id: str) -> pb.Job:
        owner, command, started = self.jobs[job_id]
        return pb.Job(
            id=job_id,
            owner=owner,
            command=command,
            state=pb.RUNNING,
            started_at=_timestamp(started),
            limits=pb.Limits(cpus=1.0, memory_bytes=512 << 20, pids=1024),
            usage=pb.Usage(cpu_usec=0, memory_peak_bytes=0, oom_kills=0),
        )

    async def Start(self, request: pb.StartRequest, context: Any) -> pb.Job:
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = ("alice", list(request.command), time.time())
        return self._job(job_id)

    async def Status(self, request: pb.JobRequest, context: Any) -> pb.Job:
        if request.id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.id}")
        return self._job(request.id)

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(jobs=[self._job(i) for i in self.jobs])

    async def Output(
        self, request: pb.OutputRequest, context: Any
    ) -> AsyncIterator[pb.OutputChunk]:
        _, command, _ = self.jobs[request.id]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None
        offset = 0
        try:
            while data := await proc.stdout.read(65536):
                yield pb.OutputChunk(
                    data=data, stream=pb.STDOUT, offset=offset, time=_timestamp(time.time())
                )
                offset += len(data)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def serve(certs: str) -> None:
    def read(name: str) -> bytes:
        with open(os.path.join(certs, name), "rb") as f:
            return f.read()

    credentials = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))],
        root_certificates=read("ca.pem"),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    pb_grpc.add_JobServiceServicer_to_server(PeerService(), server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    # Ends when the benchmark closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(1)


def run_peer(certs: str) -> int:
    asyncio.run(serve(certs))
    return 0
