"""Prometheus metrics of a real `jobd serve` (--metrics-listen): scraped over HTTP, parsed with
prometheus_client's own parser, and seen to move with real jobs, calls and connections."""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from jobd import __version__

from .e2e import Pki, Server, running_server

pytestmark = pytest.mark.cgroups

METRICS_AT = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")
START = "jobd.v1.JobService/Start"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def server(tmp_path: Path, pki_dir: Pki, cgroup_name: str) -> AsyncIterator[Server]:
    extra = ("--metrics-listen", "127.0.0.1:0")
    async with running_server(tmp_path, pki_dir, cgroup_name, *extra) as srv:
        yield srv


async def http_get(server: Server, path: str, method: str = "GET") -> tuple[int, bytes, bytes]:
    match = METRICS_AT.search(server.log)
    assert match, server.log.decode(errors="replace")
    stream = await trio.open_tcp_stream("127.0.0.1", int(match.group(1)))
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = bytearray()
        while data := await stream.receive_some(65536):
            response += data
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: Server) -> Samples:
    status, head, body = await http_get(server, "/metrics")
    assert status == 200 and b"text/plain; version=0.0.4" in head
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_until(server: Server, check: object) -> Samples:
    """Scrape until `check(samples)` holds: the server counts a connection's end in its own
    task, after the client has moved on. Bounded by the test's own timeout, not a threshold."""
    assert callable(check)
    while True:
        samples = await scrape(server)
        if check(samples):
            return samples
        await trio.sleep(0.05)  # a poll of the server's state, not a wait for time to pass


async def test_metrics_move_with_real_jobs_and_calls(server: Server) -> None:
    before = await scrape(server)
    assert value(before, "jobd_build_info", version=__version__) == 1
    assert value(before, "jobd_job_starts_total") == 0
    assert value(before, "jobd_jobs", state="running") == 0
    assert value(before, "jobd_data_dir_free_bytes") > 0
    assert value(before, "jobd_data_dir_size_bytes") >= value(before, "jobd_data_dir_free_bytes")
    assert value(before, "process_open_fds") > 0

    # A job that writes 100,001 bytes and exits 0.
    done = await server.client("run", "--", "sh", "-c", "head -c 100000 /dev/zero; echo")
    assert done.rc == 0 and len(done.stdout) == 100_001
    after = await scrape(server)
    assert value(after, "jobd_job_starts_total") == 1
    assert value(after, "jobd_job_ends_total", reason="exit") == 1
    assert value(after, "jobd_jobs", state="exited") == 1
    assert value(after, "jobd_jobs", state="running") == 0
    assert value(after, "jobd_output_written_bytes_total") == 100_001
    # Kept on disk in whole blocks.
    assert value(after, "jobd_output_stored_bytes") >= 100_001
    assert value(after, "jobd_output_dropped_bytes_total") == 0
    assert value(after, "jobd_rpcs_total", method=START, code="OK") == 1
    assert value(after, "jobd_rpc_duration_seconds_count", method=START) == 1
    assert value(after, "jobd_rpc_duration_seconds_bucket", method=START, le="+Inf") == 1
    assert value(after, "jobd_rpc_duration_seconds_sum", method=START) > 0

    # A running job, followed: one stream open while the follow lasts, then a stop.
    job = await server.start_job("sh", "-c", "echo up; exec sleep 1000")
    follow = await trio.lowlevel.open_process(
        [*server.client_argv(), "logs", "-f", job], stdout=subprocess.PIPE
    )
    assert follow.stdout is not None
    assert await follow.stdout.receive_some(100) == b"up\n"  # the follow is being served
    running = await scrape(server)
    assert value(running, "jobd_jobs", state="running") == 1
    assert value(running, "jobd_streams") == 1
    assert value(running, "jobd_connections") == 1
    stopped = await server.client("stop", "--grace", "0", job)
    assert stopped.rc == 0, stopped
    await follow.wait()
    ended = await scrape_until(server, lambda s: value(s, "jobd_streams") == 0)
    assert value(ended, "jobd_job_ends_total", reason="stop") == 1
    assert value(ended, "jobd_jobs", state="stopped") == 1
    # `run` followed the first job, `logs -f` the second.
    assert value(ended, "jobd_rpcs_total", method="jobd.v1.JobService/Output", code="OK") == 2


def _bad_calls(server: Server) -> None:
    """A made-up method, and a certificate from a CA the server does not trust."""
    pki = server.pki
    good = grpc.ssl_channel_credentials(
        root_certificates=(pki.dir / "ca.pem").read_bytes(),
        private_key=(pki.dir / "alice.key").read_bytes(),
        certificate_chain=(pki.dir / "alice.pem").read_bytes(),
    )
    with grpc.secure_channel(server.address, good) as channel:
        for n in range(3):
            call = channel.unary_unary(f"/made.up.Service{n}/Method{n}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.load_cert_chain(pki.dir / "evil-admin.pem", pki.dir / "evil-admin.key")
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            try:
                tls.recv(1)  # TLS 1.3: the server's refusal arrives after our handshake
            except (ssl.SSLError, OSError):
                pass


async def test_metrics_count_unknown_methods_under_one_label_and_refusals(
    server: Server,
) -> None:
    await trio.to_thread.run_sync(_bad_calls, server)
    samples = await scrape_until(
        server, lambda s: value(s, "jobd_connection_refusals_total", reason="handshake_failed")
    )
    assert value(samples, "jobd_rpcs_total", method="unknown", code="UNIMPLEMENTED") == 3
    assert not [key for key in samples if "made.up" in str(key)]
    assert value(samples, "jobd_connection_refusals_total", reason="handshake_failed") == 1
    assert value(samples, "jobd_connection_refusals_total", reason="too_many_connections") == 0


async def test_metrics_http_answers(server: Server) -> None:
    status, _, _ = await http_get(server, "/")
    assert status == 404
    status, head, body = await http_get(server, "/metrics", method="POST")
    assert status == 405 and b"Allow: GET, HEAD" in head
    status, head, body = await http_get(server, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and b"Content-Length: " in head


def _bounded_and_timed_out(server: Server) -> tuple[Any, Any, Any]:
    from jobd.v1 import jobd_pb2 as pb
    from jobd.v1 import jobd_pb2_grpc

    pki = server.pki
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki.dir / "ca.pem").read_bytes(),
        private_key=(pki.dir / "alice.key").read_bytes(),
        certificate_chain=(pki.dir / "alice.pem").read_bytes(),
    )
    with grpc.secure_channel(server.address, creds) as channel:
        stub = jobd_pb2_grpc.JobServiceStub(channel)
        big = stub.Start(pb.StartRequest(command=["head", "-c", "8000000", "/dev/zero"]),
                         timeout=10)  # fmt: skip
        slow = stub.Start(
            pb.StartRequest(command=["sleep", "1000"], timeout={"nanos": 1}), timeout=10
        )
        removed = stub.Start(pb.StartRequest(command=["echo", "bye"]), timeout=10)
        big, slow = stub.Wait(pb.JobRequest(id=big.id)), stub.Wait(pb.JobRequest(id=slow.id))
        stub.Wait(pb.JobRequest(id=removed.id))
        gone = stub.Remove(pb.RemoveRequest(id=removed.id), timeout=10)
        return big, slow, gone


async def test_metrics_dropped_output_and_end_reasons(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    extra = ("--metrics-listen", "127.0.0.1:0", "--max-job-output", "1M")
    async with running_server(tmp_path, pki_dir, cgroup_name, *extra) as server:
        big, slow, gone = await trio.to_thread.run_sync(_bounded_and_timed_out, server)
        samples = await scrape(server)
    assert big.output_bytes == 8_000_000 and big.output_start > 0
    assert value(samples, "jobd_output_written_bytes_total") == 8_000_000 + 4
    # What the bound dropped of the big job, and the removed job's 4 bytes.
    assert value(samples, "jobd_output_dropped_bytes_total") == big.output_start + 4
    assert value(samples, "jobd_job_ends_total", reason="timeout") == 1
    assert value(samples, "jobd_job_ends_total", reason="exit") == 2
    assert value(samples, "jobd_jobs", state="exited") == 1  # the removed one is not kept
    assert value(samples, "jobd_jobs", state="stopped") == 1
    assert value(samples, "jobd_rpcs_total", method="jobd.v1.JobService/Remove", code="OK") == 1
    assert gone.id and slow.state == 3  # STOPPED
