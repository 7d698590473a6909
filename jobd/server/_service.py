"""The JobService handlers: adapt the engine to the jobd.v1 API, authorize every call and map
engine errors to gRPC statuses in one place. Knows nothing of sockets or TLS: the caller's
identity arrives through `current_identity`, set by the transport from the peer certificate.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import purerpc
import trio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jobd import engine
from jobd.v1 import jobd_grpc
from jobd.v1 import jobd_pb2 as pb

from ._audit import audit_event
from ._grpc_stream import FramedMessage, message_limit, report_waits
from ._transport import Identity, answer_inline, current_identity

log = logging.getLogger(__name__)

ADMIN_ROLE = "admin"
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
# Room left in a List response for its envelope and token, below the message limit.
PAGE_MARGIN = 64 * 1024
_TOKEN_PREFIX = "jobs-before:"


# The engine's errors a client caused, and their gRPC statuses (first match wins).
_STATUS_ERRORS: tuple[tuple[type[engine.JobdError], type[purerpc.RpcFailedError]], ...] = (
    (engine.InvalidArgument, purerpc.InvalidArgumentError),
    (engine.NotFound, purerpc.NotFoundError),
    (engine.Unavailable, purerpc.UnavailableError),
    (engine.ResourceExhausted, purerpc.ResourceExhaustedError),
    (engine.FailedPrecondition, purerpc.FailedPreconditionError),
    (engine.AlreadyExists, purerpc.AlreadyExistsError),
)


def _status_error(exc: BaseException) -> purerpc.RpcFailedError | None:
    """The gRPC status error for one of the engine's errors, None for anything else: the one
    place this translation is made."""
    if not isinstance(exc, engine.JobdError):
        return None
    for kind, status_error in _STATUS_ERRORS:
        if isinstance(exc, kind):
            return status_error(str(exc))
    # Not caused by the client (cgroups, setup): say what failed, log it for the operator.
    log.error("engine failure: %s", exc)
    return purerpc.InternalError(f"server failure: {exc}")


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate the engine's errors into gRPC statuses (`_status_error`)."""
    try:
        yield
    except engine.JobdError as exc:
        status_error = _status_error(exc)
        assert status_error is not None
        raise status_error from exc


def _timestamp(t: float) -> Timestamp | None:
    if not t:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _limits_to_pb(limits: engine.Limits) -> pb.Limits:
    return pb.Limits(
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        io_read_bps=limits.io_read_bps,
        io_write_bps=limits.io_write_bps,
    )


def _duration(seconds: float) -> Duration | None:
    if not seconds:
        return None
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def job_to_pb(job: engine.JobInfo) -> pb.Job:
    return pb.Job(
        reason=pb.EndReason.ValueType(job.reason),
        name=job.name,
        labels=dict(job.labels),
        output_bytes=job.output_bytes,
        output_start=job.output_start,
        working_dir=job.working_dir,
        uid=job.uid or 0,
        timeout=_duration(job.timeout),
        network=pb.Network.ValueType(job.network),
        output_blocked=job.output_blocked,
        id=job.id,
        owner=job.owner,
        command=list(job.command),
        state=pb.State.ValueType(job.state),
        exit_code=job.exit_code,
        signal=job.signal,
        started_at=_timestamp(job.started_at),
        ended_at=_timestamp(job.ended_at),
        limits=_limits_to_pb(job.limits),
        usage=pb.Usage(
            cpu_usec=job.usage.cpu_usec,
            memory_peak_bytes=job.usage.memory_peak_bytes,
            oom_kills=job.usage.oom_kills,
        ),
    )


def _output_message(chunk: engine.Chunk) -> FramedMessage:
    """`pb.OutputChunk(data=chunk.data, stream=..., offset=..., time=...)` as sent, but with the
    data field written last, by hand, so that the transport sends `chunk.data` without copying
    it (protobuf would copy it into the message, then into the serialized string)."""
    head = pb.OutputChunk(
        stream=pb.Stream.ValueType(chunk.stream), offset=chunk.offset, time=_timestamp(chunk.time)
    ).SerializeToString()
    return FramedMessage(head + _DATA_TAG + _varint(len(chunk.data)), chunk.data)


_DATA_TAG = bytes([pb.OutputChunk.DATA_FIELD_NUMBER << 3 | 2])  # field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
def limit_fields(limits: engine.Limits) -> dict[str, object]:
    """The effective limits as audit fields."""
    return {
        "cpus": limits.cpus,
        "memory_bytes": limits.memory_bytes,
        "pids": limits.pids,
        "io_read_bps": limits.io_read_bps,
        "io_write_bps": limits.io_write_bps,
    }


# Without the store's reason: what the state alone says.
_END_REASONS = {
    engine.State.RUNNING: engine.EndReason.UNSPECIFIED,
    engine.State.EXITED: engine.EndReason.EXIT,
    engine.State.STOPPED: engine.EndReason.STOP,
    engine.State.KILLED: engine.EndReason.SIGNAL,
}


def audit_job_end(job: engine.JobInfo) -> None:
    """The one audit line of a job's end (the engine calls it: EngineConfig.on_job_end)."""
    reason = getattr(job, "reason", None)  # the store's EndReason, where merged
    if not isinstance(reason, engine.EndReason) or reason is engine.EndReason.UNSPECIFIED:
        reason = _END_REASONS[job.state]
        if job.oom_killed:
            reason = engine.EndReason.OOM
    audit_event(
        "job-end",
        job=job.id,
        user=job.owner,
        state=job.state.name,
        reason=reason.name,
        exit_code=job.exit_code,
        signal=job.signal,
        duration_s=round(max(job.ended_at - job.started_at, 0.0), 3),
        cpu_usec=job.usage.cpu_usec,
        memory_peak_bytes=job.usage.memory_peak_bytes,
        oom_kills=job.usage.oom_kills,
    )


def _page_token(token: str) -> int | None:
    """The seq a page token stands for (jobs before it come next); None for the first."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
        if text.startswith(_TOKEN_PREFIX) and text[len(_TOKEN_PREFIX) :].isdigit():
            return int(text[len(_TOKEN_PREFIX) :])
    except (ValueError, UnicodeError):
        pass
    raise purerpc.InvalidArgumentError(
        "page_token is not one this server gave: pass next_page_token of the previous page, "
        "or none for the first"
    )


def _grace(request: pb.StopRequest) -> float | None:
    if not request.HasField("grace"):
        return None
    grace: Duration = request.grace
    seconds: float = grace.ToNanoseconds() / 1e9
    if seconds < 0 or not math.isfinite(seconds):
        raise purerpc.InvalidArgumentError(f"grace must be >= 0, not {seconds:g} s")
    return seconds


def _stream_filter(value: int) -> engine.Stream | None:
    if not value:
        return None
    try:
        return engine.Stream(value)
    except ValueError:
        raise purerpc.InvalidArgumentError(
            f"stream must be STDOUT (1), STDERR (2) or unset for both, not {value}"
        ) from None


@dataclass(slots=True)
class _Call:
    """One RPC, for the audit log."""

    method: str
    identity: Identity | None
    job_id: str = ""
    code: str = "OK"
    details: dict[str, object] = field(default_factory=dict)  # more fields for its line


class _Audited:
    """The context of `JobService._call`. A class: a generator context manager per call cost
    more (issue 12)."""

    __slots__ = ("_call", "_start")

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._start = time.perf_counter()

    def __enter__(self) -> _Call:
        if self._call.identity is None:
            error = purerpc.UnauthenticatedError(
                "client certificate has no usable identity (subject CN)"
            )
            self._end(error)
            raise error
        return self._call

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        status_error = None if exc is None else _status_error(exc)
        self._end(status_error or exc)
        if status_error is not None:
            raise status_error from exc

    def _end(self, exc: BaseException | None) -> None:
        call = self._call
        if isinstance(exc, purerpc.RpcFailedError):
            call.code = exc.status.status_code.name
        elif exc is not None:
            call.code = "CANCELLED" if isinstance(exc, trio.Cancelled) else "UNKNOWN"
        audit_event(
            "rpc",
            user=call.identity.user if call.identity else None,
            method=call.method,
            job=call.job_id or None,
            code=call.code,
            duration_ms=round((time.perf_counter() - self._start) * 1000, 1),
            **call.details,
        )


class _EndedJobMessages:
    """Serialized `Job` messages of ended jobs, which Status is asked for again and again
    (a client polling for the result). An entry is served only for a `JobInfo` equal to the
    one it was made from, so whatever the engine changes about a job (removal, a new record
    after a restart) can never be answered from here; at most `size` entries, oldest dropped."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: collections.OrderedDict[str, tuple[engine.JobInfo, FramedMessage]] = (
            collections.OrderedDict()
        )

    def message(self, job: engine.JobInfo) -> pb.Job | FramedMessage:
        if job.state is engine.State.RUNNING:
            return job_to_pb(job)  # its usage changes
        entry = self._entries.get(job.id)
        if entry is not None and entry[0] == job:
            return entry[1]
        framed = FramedMessage(job_to_pb(job).SerializeToString(), b"")
        self._entries[job.id] = (job, framed)
        self._entries.move_to_end(job.id)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return framed


class JobService(jobd_grpc.JobServiceServicer):
    """Every handler: who is calling, may they, do it, log it."""

    def __init__(
        self, jobs: engine.JobManager, *, max_message_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self._jobs = jobs
        self._ended = _EndedJobMessages()
        self._page_bytes = max(max_message_bytes - PAGE_MARGIN, 1)

    def _call(self, method: str, job_id: str = "") -> _Audited:
        """`with self._call(method) as call:` authenticates, maps engine errors
        (`map_errors`) and writes the call's audit line however it ends."""
        return _Audited(_Call(method, current_identity.get(None), job_id))

    def _authorized(self, call: _Call, job_id: str) -> engine.JobInfo:
        """The job, if the caller may act on it (its owner, or an admin)."""
        job = self._jobs.status(job_id)
        call.job_id = job.id
        identity = call.identity
        assert identity is not None
        if job.owner != identity.user and ADMIN_ROLE not in identity.roles:
            # NOT_FOUND, word for word what a missing job gets: PERMISSION_DENIED told anyone
            # which ids exist. The audit line says what happened.
            call.details["denied"] = "not the owner"
            raise purerpc.NotFoundError(f"no job {job.id}")
        return job

    async def Start(self, request: pb.StartRequest) -> pb.Job:
        with self._call("Start") as call:
            assert call.identity is not None
            call.details["command"] = list(request.command)
            if request.name:
                call.details["name"] = request.name
            if request.working_dir:
                call.details["working_dir"] = request.working_dir
            lim = request.limits
            if request.network not in engine.Network._value2member_map_:
                raise purerpc.InvalidArgumentError(f"unknown network {request.network}")
            timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 0
            job = await self._jobs.start(
                call.identity.user,
                list(request.command),
                env=dict(request.env),
                working_dir=request.working_dir,
                limits=engine.Limits(
                    cpus=lim.cpus,
                    memory_bytes=lim.memory_bytes,
                    pids=lim.pids,
                    io_read_bps=lim.io_read_bps,
                    io_write_bps=lim.io_write_bps,
                ),
                name=request.name,
                labels=dict(request.labels),
                timeout=timeout,
                network=engine.Network(request.network),
                stdin=request.stdin,
            )
            call.job_id = job.id
            call.details.update(limit_fields(job.limits))
            return job_to_pb(job)

    async def Stop(self, request: pb.StopRequest) -> pb.Job:
        with self._call("Stop", request.id) as call:
            self._authorized(call, request.id)
            return job_to_pb(await self._jobs.stop(request.id, _grace(request)))

    async def Status(self, request: pb.JobRequest) -> pb.Job:
        return self._status_now(request)  # type: ignore[return-value]  # framed: same bytes

    def _status_now(self, request: pb.JobRequest) -> pb.Job | FramedMessage:
        """Status, which never waits: the transport's reader may answer it itself
        (`answer_inline`)."""
        with self._call("Status", request.id) as call:
            job = self._authorized(call, request.id)
            return self._ended.message(job)

    @property
    def service(self) -> purerpc.Service:
        service = super().service
        answer_inline(service, "Status", self._status_now)
        return service

    async def Wait(self, request: pb.JobRequest) -> pb.Job:
        """Until the job ends; the client's deadline (grpc-timeout, enforced by the
        transport) bounds it."""
        with self._call("Wait", request.id) as call:
            self._authorized(call, request.id)
            return job_to_pb(await self._jobs.wait(request.id))

    async def Remove(self, request: pb.RemoveRequest) -> pb.Job:
        with self._call("Remove", request.id) as call:
            self._authorized(call, request.id)
            return job_to_pb(await self._jobs.remove(request.id, force=request.force))

    async def List(self, request: pb.ListRequest) -> pb.ListResponse:
        """A page of the caller's kept jobs (an admin's: everyone's, or `owner`'s), newest
        first. A non-admin naming another owner gets PERMISSION_DENIED (not silently their
        own jobs). A page ends early rather than pass the message limit."""
        with self._call("List") as call:
            assert call.identity is not None
            admin = ADMIN_ROLE in call.identity.roles
            owner: str | None = request.owner or None
            if not admin:
                if owner is not None and owner != call.identity.user:
                    raise purerpc.PermissionDeniedError(
                        f"only admins may list another user's jobs; {call.identity.user} "
                        "may list only their own"
                    )
                owner = call.identity.user
            if request.page_size < 0:
                raise purerpc.InvalidArgumentError(
                    f"page_size must be >= 0 (0: {DEFAULT_PAGE_SIZE}), not {request.page_size}"
                )
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            states = set()
            for value in request.states:
                if value not in engine.State._value2member_map_:
                    raise purerpc.InvalidArgumentError(f"unknown state {value} in states")
                states.add(engine.State(value))
            page = self._jobs.list_page(
                owner,
                before=_page_token(request.page_token),
                limit=size,
                states=frozenset(states),
                labels=dict(request.labels),
                id_prefix=request.id_prefix,
                name=request.name,
            )
            response = pb.ListResponse()
            total, more = 0, page.more
            for info in page.jobs:
                job = job_to_pb(info)
                total += job.ByteSize() + 8  # field tag and length prefix
                if total > self._page_bytes and len(response.jobs):
                    more = True
                    break
                response.jobs.append(job)
            if more and response.jobs:
                last = page.jobs[len(response.jobs) - 1]
                token = f"{_TOKEN_PREFIX}{last.seq}".encode()
                response.next_page_token = base64.urlsafe_b64encode(token).decode()
            return response

    async def Output(  # type: ignore[override]  # a server stream: an async generator
        self, request: pb.OutputRequest
    ) -> AsyncIterator[pb.OutputChunk]:
        # An async generator that others iterate: no nursery or cancel scope spans a yield
        # here; `_call` is a plain (non-async) context manager around the iteration.
        with self._call("Output", request.id) as call:
            self._authorized(call, request.id)
            chunks = self._jobs.read_output(
                request.id,
                request.offset,
                follow=request.follow,
                tail_lines=request.tail_lines,
                since=request.since.ToNanoseconds() / 1e9 if request.HasField("since") else None,
                stream=_stream_filter(request.stream),
                max_chunk=message_limit.get,  # the transport's room for the next message
                # Its waits for new output, so that a replay's message counts against its
                # connection's room while it is made (issue 12, fan-out).
                on_wait=report_waits(),
            )
            try:
                async for chunk in chunks:
                    yield _output_message(chunk)  # type: ignore[misc]  # framed OutputChunk
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]

    async def Input(self, requests: AsyncIterator[pb.InputChunk]) -> pb.Job:
        """A client stream: its first message names the job, every message's data goes to
        the job's stdin in order, and the call's end is EOF. Each message is written (the
        pipe blocks while the job does not read) before the next is read, so the transport's
        flow control holds a fast client back."""
        with self._call("Input") as call:
            first = await anext(aiter(requests), None)
            if first is None or not first.id:
                raise purerpc.InvalidArgumentError(
                    "Input: the first message must carry the job's id"
                )
            self._authorized(call, first.id)

            async def data() -> AsyncIterator[bytes]:
                yield first.data
                async for chunk in requests:
                    if chunk.id and chunk.id != first.id:
                        raise purerpc.InvalidArgumentError(
                            f"Input: one call feeds one job ({first.id}), not {chunk.id}"
                        )
                    yield chunk.data

            return job_to_pb(await self._jobs.feed_stdin(first.id, data()))
