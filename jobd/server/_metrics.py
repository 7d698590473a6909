"""Prometheus metrics on a port of their own (`--metrics-listen`): what the engine and the
transport count, collected at scrape time from the read-only statistics they expose, rendered
by prometheus_client. A scrape only reads numbers already in memory (plus one statvfs of the
data dir, in a worker thread): it never blocks the event loop. Must not import the engine's
or the transport's privates.

    port = await nursery.start(serve_metrics, host, port, Sources(jobs, grpc_server, data_dir))
    # GET http://host:port/metrics  ->  text/plain; version=0.0.4
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from jobd import __version__
from jobd.engine import EngineStatistics

from ._callstats import LATENCY_BUCKETS, TransportStatistics

__all__ = ["Sources", "metrics_text", "serve_metrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scraper sends one short request; anything else is cut off.
_MAX_REQUEST_HEAD = 8192
_REQUEST_TIMEOUT = 10.0
_MAX_SCRAPERS = 8  # connections served at once; more wait in the listen backlog
_REFUSALS = (
    "handshake_failed",  # TLS refused: no or an untrusted client certificate, not TLS 1.3, ...
    "handshake_timeout",
    "silent",  # sent nothing before the handshake deadline
    "evicted",  # dropped from a full silent or handshake budget for a newer connection
    "too_many_connections",
    "too_many_connections_per_user",
    "too_many_sockets",  # the descriptor backstop at accept
)


class EngineSource(Protocol):
    def statistics(self) -> EngineStatistics: ...


class TransportSource(Protocol):
    @property
    def stats(self) -> TransportStatistics: ...
    @property
    def connection_count(self) -> int: ...
    @property
    def open_calls(self) -> int: ...
    @property
    def handshake_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Sources:
    """Where the numbers come from: the job manager, the gRPC server, the data dir."""

    engine: EngineSource
    transport: TransportSource
    data_dir: Path


@dataclass(frozen=True, slots=True)
class _Disk:
    free_bytes: int
    size_bytes: int


class _JobdCollector(Collector):
    """Builds every jobd_* family from one snapshot of each source."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self.disk: _Disk | None = None  # measured just before each scrape

    def collect(self) -> Iterator[Metric]:
        engine = self._sources.engine.statistics()
        transport = self._sources.transport
        stats = transport.stats

        info = GaugeMetricFamily("jobd_build_info", "jobd's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        jobs = GaugeMetricFamily("jobd_jobs", "Jobs the server holds, by state.", labels=["state"])
        for state, count in sorted(engine.jobs.items()):
            jobs.add_metric([state.name.lower()], count)
        yield jobs
        yield CounterMetricFamily("jobd_job_starts", "Jobs started.", value=engine.starts)
        ends = CounterMetricFamily("jobd_job_ends", "Jobs ended, by reason.", labels=["reason"])
        for reason, count in sorted(engine.ends.items()):
            ends.add_metric([reason.name.lower()], count)
        yield ends

        yield CounterMetricFamily(
            "jobd_output_written_bytes",
            "Bytes of output jobs wrote (both streams), kept or not.",
            value=engine.output_bytes_written,
        )
        yield CounterMetricFamily(
            "jobd_output_dropped_bytes",
            "Bytes of output no longer kept (job output cap, data dir budget, removed jobs).",
            value=engine.output_bytes_dropped,
        )
        yield GaugeMetricFamily(
            "jobd_output_stored_bytes",
            "Bytes of job output kept in the data dir.",
            value=engine.output_bytes_stored,
        )
        yield GaugeMetricFamily(
            "jobd_outputs_blocked",
            "Running jobs whose output is not being stored right now (disk full, budget).",
            value=engine.outputs_blocked,
        )
        if self.disk is not None:
            yield GaugeMetricFamily(
                "jobd_data_dir_free_bytes",
                "Bytes free for jobd on the data dir's filesystem.",
                value=self.disk.free_bytes,
            )
            yield GaugeMetricFamily(
                "jobd_data_dir_size_bytes",
                "Size of the data dir's filesystem.",
                value=self.disk.size_bytes,
            )

        calls = CounterMetricFamily(
            "jobd_rpcs", "RPCs ended, by method and status code.", labels=["method", "code"]
        )
        for (method, code), count in sorted(stats.calls.items()):
            calls.add_metric([method, code], count)
        yield calls
        latency = HistogramMetricFamily(
            "jobd_rpc_duration_seconds", "Duration of RPCs, by method.", labels=["method"]
        )
        for method, hist in sorted(stats.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([method], buckets, sum_value=hist.total_seconds)
        yield latency

        yield GaugeMetricFamily(
            "jobd_connections",
            "Open client connections, including those still in their TLS handshake.",
            value=transport.connection_count,
        )
        yield GaugeMetricFamily(
            "jobd_handshakes",
            "Connections in their TLS handshake now.",
            value=transport.handshake_count,
        )
        yield GaugeMetricFamily(
            "jobd_streams", "RPCs (HTTP/2 streams) in progress.", value=transport.open_calls
        )
        refusals = CounterMetricFamily(
            "jobd_connection_refusals",
            "Connections refused before any call could run: failed, timed-out, silent or "
            "evicted handshakes, and connection caps (server, per user).",
            labels=["reason"],
        )
        # The usual reasons are always present (at 0), so that rate() works from the start.
        for why in sorted({*_REFUSALS, *stats.refusals}):
            refusals.add_metric([why], stats.refusals[why])
        yield refusals


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class _Exporter:
    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self._collector = _JobdCollector(sources)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        ProcessCollector(registry=self.registry)  # jobd's own RSS, CPU, open fds (from /proc)

    async def render(self) -> bytes:
        try:
            fs = await trio.to_thread.run_sync(os.statvfs, self._sources.data_dir)
        except OSError as exc:
            log.warning("metrics: cannot stat the data dir %s: %s", self._sources.data_dir, exc)
            self._collector.disk = None
        else:
            self._collector.disk = _Disk(fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize)
        return bytes(generate_latest(self.registry))


async def metrics_text(sources: Sources) -> str:
    """One scrape's text, for tests and debugging."""
    return (await _Exporter(sources).render()).decode()


async def serve_metrics(
    host: str,
    port: int,
    sources: Sources,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics over plain HTTP/1.1 on host:port (0: any free port) until cancelled.
    `task_status.started` gets the bound port; binding errors are raised before that."""
    exporter = _Exporter(sources)
    listeners = await trio.open_tcp_listeners(port, host=host)
    ports = {listener.socket.getsockname()[1] for listener in listeners}
    if len(ports) != 1:
        for listener in listeners:
            await listener.aclose()
        raise OSError(f"{host!r} has several addresses: give one address, or a fixed port")
    bound = ports.pop()
    limiter = trio.CapacityLimiter(_MAX_SCRAPERS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limiter, stream:
            try:
                with trio.fail_after(_REQUEST_TIMEOUT):
                    await _answer(stream, exporter)
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.debug("metrics scrape cut short: %r", exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)


async def _answer(stream: trio.SocketStream, exporter: _Exporter) -> None:
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            return
        head += data
        if len(head) > _MAX_REQUEST_HEAD:
            await _respond(stream, "431 Request Header Fields Too Large", b"request too large\n")
            return
    method, _, rest = bytes(head).partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        await _respond(stream, "405 Method Not Allowed", b"GET /metrics\n", allow=True)
    elif path != b"/metrics":
        await _respond(stream, "404 Not Found", b"jobd serves only /metrics here\n")
    else:
        body = await exporter.render()
        await _respond(stream, "200 OK", body, content_type=CONTENT_TYPE, head=method == b"HEAD")


async def _respond(
    stream: trio.SocketStream,
    status: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: bool = False,
    head: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body))
