"""Baseline S: the server a Python user would write for "run a command remotely, stream its
output" (issue 12). Synchronous grpcio (C core) with a thread pool, the same JobService over the
same mTLS certificates:

- Start makes the job's cgroup leaves (v2 for membership, v1 memory and pids with the bench's
  default limits on the hybrid layout; one v2 leaf otherwise) and launches the command with
  `subprocess.Popen` of `sh -c 'echo $$ > LEAF/cgroup.procs; ...; exec setpriv --reuid ...
  --regid ... --clear-groups -- "$@"'`; returns once Popen has (fork + exec of sh).
- A thread per job reads its stdout+stderr pipe into memory (a bytearray, the whole output).
- Output sends what has been read, in pieces of up to `--chunk` bytes (1 MiB by default) as
  they are read; a follower waits on a Condition.
- Status/List build the same `Job` message from a dict; Stop kills the process group, waits.

Run as `bench.py --sync-peer CERTS_DIR CHUNK TREE` (TREE: the name of the cgroups it makes);
prints its port, stops when stdin closes, and removes its cgroups.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc as pb_grpc

CGROUP = Path("/sys/fs/cgroup")
UID = 65534  # nobody: every job drops to it
MEMORY = 1 << 30  # the bench's --default-memory 1G
PIDS = 4096  # and --default-pids 4096
WORKERS = 64  # enough threads for 50 concurrent Starts plus followers


def _timestamp(t: float) -> Timestamp | None:
    if not t:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _hierarchies(name: str) -> list[tuple[Path, dict[str, str]]]:
    """(tree dir, limit files) per hierarchy a job joins: v1 first, the v2 leaf last."""
    if (CGROUP / "cgroup.controllers").exists():  # pure v2
        return [(CGROUP / name, {"memory.max": str(MEMORY), "pids.max": str(PIDS)})]
    return [
        (CGROUP / "memory" / name, {"memory.limit_in_bytes": str(MEMORY)}),
        (CGROUP / "pids" / name, {"pids.max": str(PIDS)}),
        (CGROUP / "unified" / name, {}),
    ]


class _Job:
    def __init__(self, job_id: str, command: list[str], leaves: list[Path]) -> None:
        self.id = job_id
        self.command = command
        self.leaves = leaves
        self.started = time.time()
        self.ended_at = 0.0
        self.output = bytearray()
        self.done = False
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code = 0
        self.signal = 0

    def pump(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while data := os.read(fd, 1 << 20):
            with self.cond:
                self.output += data
                self.cond.notify_all()
        proc.stdout.close()
        code = proc.wait()
        for leaf in self.leaves:
            _rmdir_when_empty(leaf)
        with self.cond:
            self.exit_code, self.signal = (code, 0) if code >= 0 else (0, -code)
            self.ended_at = time.time()
            self.done = True
            self.cond.notify_all()

    def to_pb(self) -> pb.Job:
        return pb.Job(
            id=self.id,
            owner="alice",
            command=self.command,
            state=pb.EXITED if self.done else pb.RUNNING,
            exit_code=self.exit_code,
            signal=self.signal,
            started_at=_timestamp(self.started),
            ended_at=_timestamp(self.ended_at),
            limits=pb.Limits(memory_bytes=MEMORY, pids=PIDS),
            usage=pb.Usage(cpu_usec=0, memory_peak_bytes=0, oom_kills=0),
        )


def _rmdir_when_empty(leaf: Path) -> None:
    for _ in range(1000):
        try:
            leaf.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.001)  # the last process is still leaving the cgroup


class SyncPeer(pb_grpc.JobServiceServicer):
    def __init__(self, tree: str, chunk: int) -> None:
        self.tree = tree
        self.chunk = chunk
        self.jobs: dict[str, _Job] = {}

    def Start(self, request: pb.StartRequest, context: Any) -> pb.Job:
        job_id = str(uuid.uuid4())
        leaves = []
        for base, limits in _hierarchies(self.tree):
            leaf = base / job_id
            leaf.mkdir()
            for file, value in limits.items():
                (leaf / file).write_text(value)
            leaves.append(leaf)
        joins = "; ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in leaves)
        script = f"{joins}; exec setpriv --reuid={UID} --regid={UID} --clear-groups -- " + '"$@"'
        job = _Job(job_id, list(request.command), leaves)
        job.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", *request.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.jobs[job_id] = job
        threading.Thread(target=job.pump, daemon=True).start()
        return job.to_pb()

    def _get(self, job_id: str, context: Any) -> _Job:
        job = self.jobs.get(job_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
        assert job is not None
        return job

    def Stop(self, request: pb.StopRequest, context: Any) -> pb.Job:
        job = self._get(request.id, context)
        assert job.proc is not None
        if not job.done:
            try:
                os.killpg(job.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with job.cond:
            job.cond.wait_for(lambda: job.done)
        return job.to_pb()

    def Status(self, request: pb.JobRequest, context: Any) -> pb.Job:
        return self._get(request.id, context).to_pb()

    def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(jobs=[j.to_pb() for j in list(self.jobs.values())])

    def Output(self, request: pb.OutputRequest, context: Any) -> Iterator[pb.OutputChunk]:
        job = self._get(request.id, context)
        pos = request.offset
        while True:
            with job.cond:
                while len(job.output) <= pos and not job.done:
                    job.cond.wait()
                data = bytes(job.output[pos : pos + self.chunk])
                done = job.done
            if not data:
                if done:
                    return
                continue
            yield pb.OutputChunk(
                data=data, stream=pb.STDOUT, offset=pos, time=_timestamp(time.time())
            )
            pos += len(data)


def run_sync_peer(certs_dir: str, chunk: str, tree: str) -> int:
    certs = Path(certs_dir)
    for base, _ in _hierarchies(tree):
        base.mkdir()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        options=[("grpc.max_send_message_length", 4 << 20)],
    )
    peer = SyncPeer(tree, int(chunk))
    pb_grpc.add_JobServiceServicer_to_server(peer, server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    try:
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        server.stop(1).wait()
        for job in list(peer.jobs.values()):
            peer.Stop(pb.StopRequest(id=job.id), None)  # kills it, waits for its leaves to go
        for base, _ in _hierarchies(tree):
            _rmdir_when_empty(base)
    return 0
