"""A conversation with the server: where it is and which certificates to use (`Settings`),
the TLS context, and `Api`, the JobService calls with the client's deadlines and errors.

    async with open_api(settings) as api:
        job = await api.status(job_id)
"""

from __future__ import annotations

import math
import re
import ssl
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
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

    def user(self) -> str:
        """Who the server will take us for: our certificate's subject CN."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the certificate {self.cert}: {exc}") from exc
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise ClientError(f"the certificate {self.cert} names no user (subject CN)")
        return str(names[0].value)


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

    async def wait(self, job_id: str) -> pb.Job:
        """The job once it has ended: waits as long as it runs (the caller bounds it)."""
        job: pb.Job = await self._stub.Wait(pb.JobRequest(id=job_id))
        return job

    async def remove(self, job_id: str, *, force: bool = False) -> pb.Job:
        wait = SERVER_DEFAULT_GRACE if force else 0.0
        request = pb.RemoveRequest(id=job_id, force=force)
        job: pb.Job = await self._unary(self._stub.Remove, request, extra_wait=wait)
        return job

    async def list_page(self, request: pb.ListRequest) -> pb.ListResponse:
        response: pb.ListResponse = await self._unary(self._stub.List, request)
        return response

    async def list(self, request: pb.ListRequest | None = None, limit: int = 0) -> list[pb.Job]:
        """Every job the request selects, through the server's pages (at most limit, if set,
        the newest first as the server sends them)."""
        request = request or pb.ListRequest()
        jobs: list[pb.Job] = []
        seen_tokens: set[str] = set()
        while True:
            if limit:
                request.page_size = min(limit - len(jobs), 1000)
            response = await self.list_page(request)
            jobs += response.jobs
            token = response.next_page_token
            if not token or token in seen_tokens or (limit and len(jobs) >= limit):
                return jobs[:limit] if limit else jobs
            seen_tokens.add(token)
            request.page_token = token

    async def resolve(self, ref: str) -> str:
        """The id of the job ref names: a full id; else the name of one of the caller's jobs;
        else a unique id prefix of at least 4 characters. Ambiguity is an error that lists
        the candidates."""
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        if not ref or "\0" in ref:
            raise ClientError(f"{ref!r} is not a job id or name")
        # Filtered here as well: a server that ignores a filter must not make us pick wrong.
        named = [j for j in await self.list(pb.ListRequest(name=ref)) if j.name == ref]
        if len(named) == 1:
            return named[0].id
        if len(named) > 1:
            raise ClientError(_ambiguous(f"the name {ref!r}", named, "give the id"))
        prefix = ref.lower()
        if not _ID_PREFIX.fullmatch(prefix):
            raise ClientError(f"no job named {ref!r} (and it is not an id or id prefix)")
        if len(prefix) < 4:
            raise ClientError(
                f"no job named {ref!r}; as an id prefix it is too short: give at least 4 "
                "characters of the id"
            )
        request = pb.ListRequest(id_prefix=prefix)
        matches = [j for j in await self.list(request) if j.id.startswith(prefix)]
        if not matches:
            raise ClientError(f"no job with the name or id prefix {ref!r}")
        if len(matches) > 1:
            raise ClientError(_ambiguous(f"the id prefix {ref!r}", matches, "give more of it"))
        return matches[0].id

    async def input(self, job_id: str, chunks: AsyncIterable[bytes]) -> pb.Job:
        """Send chunks to the job's stdin in one Input call; its end is EOF for the job."""

        async def messages() -> AsyncIterator[pb.InputChunk]:
            yield pb.InputChunk(id=job_id)
            async for data in chunks:
                yield pb.InputChunk(data=data)

        job: pb.Job = await self._stub.Input(messages())
        return job

    async def output(
        self,
        job_id: str,
        *,
        follow: bool,
        offset: int = 0,
        request: pb.OutputRequest | None = None,
    ) -> AsyncGenerator[pb.OutputChunk]:
        """The job's output chunks from offset (or as request asks); with follow, until the
        job's output ends.

        A follow waits as long as the job runs. Without follow the server has everything at
        hand, so each chunk (or the end) must come within the unary timeout.
        """
        if request is None:
            request = pb.OutputRequest(id=job_id, offset=offset)
        request.id, request.follow = job_id, follow
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


_ID_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]*")


def _ambiguous(what: str, jobs: list[pb.Job], fix: str) -> str:
    shown = ", ".join(f"{j.id} ({j.owner}{', ' + j.name if j.name else ''})" for j in jobs[:10])
    more = f" and {len(jobs) - 10} more" if len(jobs) > 10 else ""
    return f"{what} matches {len(jobs)} jobs: {shown}{more}; {fix}"


@asynccontextmanager
async def open_api(settings: Settings) -> AsyncIterator[Api]:
    """Connect to the server; every error on the way in, out or in between is a ClientError."""
    context = make_ssl_context(settings)
    with map_errors(settings.server, settings.timeout):
        async with open_job_service(
            settings.host, settings.port, context, connect_timeout=settings.timeout
        ) as stub:
            yield Api(stub, settings)
