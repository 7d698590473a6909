"""A conversation with the server: where it is and which certificates to use (`Settings`),
the TLS context, and `Api`, the JobService calls with the client's deadlines and errors.

    async with open_api(settings) as api:
        job = await api.status(job_id)
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from google.protobuf.duration_pb2 import Duration

from jobd.v1 import jobd_pb2 as pb
from jobd.v1.jobd_grpc import JobServiceStub

from ._channel import open_job_service
from .errors import ClientError, map_errors

__all__ = [
    "DEFAULT_TIMEOUT",
    "SERVER_DEFAULT_GRACE",
    "Api",
    "Settings",
    "make_ssl_context",
    "open_api",
]

DEFAULT_TIMEOUT: float = 10
# Stop returns once the job's processes are gone, so its deadline is the unary timeout plus
# the grace period: the one asked for, else the server's default as docs/DESIGN.md states it.
SERVER_DEFAULT_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    timeout: float = DEFAULT_TIMEOUT
    # Appended to "no CA certificate at ...", "no certificate at ...": how to get the defaults.
    ca_hint: str = ""
    cert_hint: str = ""

    @property
    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def make_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.3 only, the server verified against the CA and its host name, our certificate
    presented, ALPN h2. Missing or unusable files raise ClientError."""
    for path, what, hint in (
        (settings.cert, "certificate", settings.cert_hint),
        (settings.key, "key", settings.cert_hint),
        (settings.ca, "CA certificate", settings.ca_hint),
    ):
        if not path.is_file():
            raise ClientError(f"no {what} at {path}{hint}")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cafile=settings.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ClientError(f"cannot load the CA certificate {settings.ca}: {_reason(exc)}") from exc
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError) as exc:
        raise ClientError(
            f"cannot load the certificate {settings.cert} with the key {settings.key}: "
            f"{_reason(exc)}"
        ) from exc
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


class Api:
    """The JobService calls. Each unary call must answer within the timeout (raises
    ClientError); `output` waits as long as the job runs."""

    def __init__(self, stub: JobServiceStub, settings: Settings) -> None:
        self._stub = stub
        self._settings = settings

    async def _unary(self, method: Any, request: Any, extra_wait: float = 0.0) -> Any:
        deadline = self._settings.timeout + extra_wait
        try:
            with trio.fail_after(deadline):
                return await method(request)
        except trio.TooSlowError:
            raise self._too_slow(deadline) from None

    def _too_slow(self, seconds: float) -> ClientError:
        return ClientError(
            f"the server at {self._settings.server} did not answer within {seconds:g} s"
        )

    async def start(self, request: pb.StartRequest) -> pb.Job:
        job: pb.Job = await self._unary(self._stub.Start, request)
        return job

    async def stop(self, job_id: str, grace: float | None = None) -> pb.Job:
        request = pb.StopRequest(id=job_id)
        if grace is not None:
            duration = Duration()
            duration.FromNanoseconds(int(grace * 1e9))
            request.grace.CopyFrom(duration)
        wait = SERVER_DEFAULT_GRACE if grace is None else grace
        job: pb.Job = await self._unary(self._stub.Stop, request, extra_wait=wait)
        return job

    async def status(self, job_id: str) -> pb.Job:
        job: pb.Job = await self._unary(self._stub.Status, pb.JobRequest(id=job_id))
        return job

    async def list(self) -> list[pb.Job]:
        response: pb.ListResponse = await self._unary(self._stub.List, pb.ListRequest())
        return list(response.jobs)

    async def output(
        self, job_id: str, *, follow: bool, offset: int = 0
    ) -> AsyncGenerator[pb.OutputChunk]:
        """The job's output chunks from offset; with follow, until the job's output ends.

        A follow waits as long as the job runs. Without follow the server has everything at
        hand, so each chunk (or the end) must come within the unary timeout.
        """
        request = pb.OutputRequest(id=job_id, follow=follow, offset=offset)
        patience = math.inf if follow else self._settings.timeout
        async with aclosing(self._stub.Output(request)) as chunks:
            while True:
                # The deadline covers the wait only: never yield inside a cancel scope.
                try:
                    with trio.fail_after(patience):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except trio.TooSlowError:
                    raise self._too_slow(patience) from None
                yield chunk


@asynccontextmanager
async def open_api(settings: Settings) -> AsyncIterator[Api]:
    """Connect to the server; every error on the way in, out or in between is a ClientError."""
    context = make_ssl_context(settings)
    with map_errors(settings.server, settings.timeout):
        async with open_job_service(
            settings.host, settings.port, context, connect_timeout=settings.timeout
        ) as stub:
            yield Api(stub, settings)
