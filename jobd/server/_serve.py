"""Run the jobd server: engine, service and transport put together, with the signal handling
an operator expects (SIGTERM/SIGINT: stop accepting, end open calls, stop every job, exit)."""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import trio
from grpc_health.v1 import health_pb2

from jobd.engine import EngineConfig, JobdError, JobManager, open_job_manager
from jobd.v1 import jobd_pb2

from ._health import SERVICE_NAME as HEALTH_SERVICE
from ._health import HealthService
from ._metrics import Sources, serve_metrics
from ._reflection import REFLECTION_FILES, ReflectionService
from ._sdnotify import notify
from ._service import JobService, audit_job_end
from ._transport import GrpcServer, TransportLimits, make_server_ssl_context, serve_grpc

log = logging.getLogger("jobd")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    engine: EngineConfig
    # How long calls in flight at shutdown may take before they end with UNAVAILABLE.
    # Short: a follow of a running job never ends by itself.
    call_grace: float = 1.0
    transport: TransportLimits = field(default_factory=TransportLimits)
    # Where to serve Prometheus metrics (plain HTTP); None: nowhere.
    metrics_listen: tuple[str, int] | None = None


async def run_server(
    config: ServerConfig, *, task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly and return.

    A second signal during shutdown kills the remaining jobs at once instead of waiting for
    their grace period."""
    try:
        ssl_context = make_server_ssl_context(config.cert, config.key, config.client_ca)
    except (OSError, ValueError) as exc:
        raise JobdError(
            f"cannot load the TLS files (--cert {config.cert}, --key {config.key}, "
            f"--client-ca {config.client_ca}): {exc}"
        ) from exc
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as top:
            with trio.CancelScope() as everything:
                engine = config.engine
                if engine.on_job_end is None:
                    engine = replace(engine, on_job_end=audit_job_end)
                async with open_job_manager(engine) as jobs:
                    await _serve(config, jobs, ssl_context, signals, task_status)
                    top.start_soon(_second_signal, signals, everything)
                    # Leaving the manager stops every job (SIGTERM, grace, SIGKILL).
            top.cancel_scope.cancel()
    log.info("stopped")


async def _serve(
    config: ServerConfig,
    jobs: JobManager,
    ssl_context: ssl.SSLContext,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[GrpcServer],
) -> None:
    service = JobService(jobs, max_message_bytes=config.transport.max_message_bytes)
    job_service = service.service
    health = HealthService([job_service.name])
    reflection = ReflectionService(
        {
            job_service.name: jobd_pb2.DESCRIPTOR,
            HEALTH_SERVICE: health_pb2.DESCRIPTOR,
            **REFLECTION_FILES,
        }
    )
    async with trio.open_nursery() as nursery:
        try:
            server: GrpcServer = await nursery.start(
                partial(
                    serve_grpc,
                    [job_service, health.service, *reflection.services],
                    host=config.host,
                    port=config.port,
                    ssl_context=ssl_context,
                    limits=config.transport,
                )
            )
        except OSError as exc:
            raise JobdError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from exc
        async with trio.open_nursery() as extras:
            if config.metrics_listen is not None:
                await _start_metrics(extras, config, jobs, server)
            log.info(
                "listening on %s:%d (cgroups: %s; jobs run as %s; data in %s)",
                config.host,
                server.port,
                jobs.cgroup_mode.value,
                config.engine.run_as or "the server's user",
                config.engine.data_dir,
            )
            notify(f"READY=1\nSTATUS=serving on {config.host}:{server.port}")
            task_status.started(server)
            async for signum in signals:
                log.info(
                    "%s: shutting down (%d job(s) running)",
                    signal.Signals(signum).name,
                    jobs.running_count(),
                )
                break
            notify("STOPPING=1\nSTATUS=stopping: ending calls, stopping jobs")
            health.shut_down()
            jobs.refuse_new_jobs()
            server.shutdown(config.call_grace)
            extras.cancel_scope.cancel()
    # serve_grpc has returned: every connection is closed.


async def _start_metrics(
    nursery: trio.Nursery, config: ServerConfig, jobs: JobManager, server: GrpcServer
) -> None:
    assert config.metrics_listen is not None
    host, port = config.metrics_listen
    sources = Sources(engine=jobs, transport=server, data_dir=config.engine.data_dir)
    try:
        bound: int = await nursery.start(serve_metrics, host, port, sources)
    except OSError as exc:
        raise JobdError(
            f"cannot serve metrics on {host}:{port} (--metrics-listen): {exc.strerror or exc}"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", host, bound)


async def _second_signal(signals: AsyncIterator[int], everything: trio.CancelScope) -> None:
    async for signum in signals:
        log.warning("%s again: killing every job now", signal.Signals(signum).name)
        everything.cancel()
        return
