"""jobd's gRPC endpoint: its own TCP listener, TLS 1.3 with client certificates, the caller's
identity, and purerpc's call handling per connection with the server defects of
docs/DESIGN.md ("purerpc defects") closed. Service-agnostic: must not import jobd.engine.

    ctx = make_server_ssl_context(cert, key, client_ca)
    server = await nursery.start(partial(serve_grpc, [servicer.service], host=h, port=p,
                                         ssl_context=ctx))
    ...                                   # handlers read current_identity.get()
    server.shutdown(grace=5.0)            # serve_grpc returns once every connection has closed
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import math
import os
import resource
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import anyio.abc
import trio
from google.protobuf.message import DecodeError
from purerpc import Cardinality, RPCSignature, Service
from purerpc.grpclib.connection import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestReceived
from purerpc.grpclib.exceptions import MessageTooLargeError, RpcFailedError, UnauthenticatedError
from purerpc.grpclib.exceptions import ProtocolError as GrpcProtocolError
from purerpc.grpclib.status import Status, StatusCode
from purerpc.server import ConnectionHandler
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    extract_message_from_singleton_stream,
)

from jobd.server._audit import RateLimitedLog, audit_event, defer_audit, write_deferred
from jobd.server._callstats import TransportStatistics
from jobd.server._grpc_stream import (
    ACCEPT_ENCODING,
    OutboundBudget,
    ReaderEnd,
    ServerSocket,
    ServerStream,
    TrioByteStream,
    message_limit,
)

__all__ = [
    "GrpcServer",
    "Identity",
    "TransportLimits",
    "current_identity",
    "answer_inline",
    "make_server_ssl_context",
    "serve_grpc",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller, from its verified client certificate: user = subject CN, roles = the values
    of every subject OU. Never taken from metadata or request data."""

    user: str
    roles: frozenset[str]


current_identity: ContextVar[Identity] = ContextVar("jobd_current_identity")
"""Set in each connection's task once its handshake is done; every call task on that
connection inherits it. Unset (LookupError) anywhere else."""


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """What one client may cost the server (docs/DESIGN.md, purerpc rows 7-9; issue 9). Times
    in seconds."""

    # Established connections in all; one more is answered RESOURCE_EXHAUSTED and closed.
    max_connections: int = 1000
    # Connections not yet handshaken have budgets of their own, so that peers without a
    # certificate can never lock out clients that complete a handshake: those that have sent
    # nothing yet (cheap: a descriptor each; at most a quarter of RLIMIT_NOFILE), and those
    # in their TLS handshake. When one is full its oldest is dropped for the new one.
    max_silent: int = 4096
    max_handshakes: int = 128
    handshake_timeout: float = 5.0  # from accept to a completed handshake
    # Per user (certificate CN): established connections, and calls open at once over all of
    # them; more are answered RESOURCE_EXHAUSTED.
    max_connections_per_user: int = 100
    max_calls_per_user: int = 1000
    max_concurrent_streams: int = 100  # per connection: SETTINGS_MAX_CONCURRENT_STREAMS
    # A larger request gets RESOURCE_EXHAUSTED. purerpc applies one limit both ways, so this
    # also caps each response message.
    max_message_bytes: int = 4 * 1024 * 1024
    max_outbound_queued_bytes: int = 1024 * 1024  # per connection: calls wait past this
    # Server-wide: bytes queued for all sockets plus those reserved by streaming calls for
    # their next message. Past it, a stream waits unless its own connection is idle.
    max_outbound_bytes: int = 32 * 1024 * 1024
    # One user's share of it, for calls whose peer has never acknowledged any data: 128 such
    # calls may hold a message at once (a follow of a job that prints nothing holds one).
    max_outbound_bytes_per_user: int = 8 * 1024 * 1024
    idle_timeout: float = 300.0  # no call open this long: GOAWAY, close
    # Upper bound on every call's deadline. inf: a call without grpc-timeout (a follow) may
    # run until it ends.
    max_deadline: float = math.inf
    close_timeout: float = 5.0  # for the last frames and close_notify of a closing connection

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_silent",
            "max_handshakes",
            "max_connections_per_user",
            "max_calls_per_user",
            "max_concurrent_streams",
            "max_outbound_queued_bytes",
            "max_outbound_bytes",
            "max_outbound_bytes_per_user",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 1 <= self.max_message_bytes <= 2**31 - 1 - 5:
            raise ValueError("max_message_bytes must be between 1 and 2**31 - 6")
        for name in ("handshake_timeout", "idle_timeout", "max_deadline", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    @property
    def connection_window_bytes(self) -> int:
        # Room for two whole messages in flight per connection; bounded so that a client
        # cannot make the server buffer more (purerpc granted 1 GiB).
        return min(2 * (self.max_message_bytes + 5), 2**31 - 1)


def make_server_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.3 only, a client certificate signed by client_ca required, ALPN "h2"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=client_ca)
    context.set_alpn_protocols(["h2"])
    # No session tickets: no resumption, so every connection presents its certificate afresh.
    context.num_tickets = 0
    return context


_NO_CN = "client certificate has no subject CN"


def _identity_from_peer_cert(cert: Mapping[str, Any]) -> Identity:
    """The identity in a verified peer certificate (`SSLObject.getpeercert()` form)."""
    subject = cert.get("subject", ())
    common_names = {value for rdn in subject for key, value in rdn if key == "commonName"}
    common_names.discard("")
    if not common_names:
        raise UnauthenticatedError(_NO_CN)
    if len(common_names) > 1:
        raise UnauthenticatedError("client certificate has more than one subject CN")
    roles = frozenset(
        value for rdn in subject for key, value in rdn if key == "organizationalUnitName" and value
    )
    return Identity(user=common_names.pop(), roles=roles)


# --------------------------------------------------------------------------------------------
# Calls: purerpc's ConnectionHandler, one per connection
# --------------------------------------------------------------------------------------------

_Runner = Callable[[Callable[..., Any], ServerStream], Awaitable[None]]


async def _call_unary_unary(func: Callable[..., Any], stream: ServerStream) -> None:
    """purerpc's call_server_unary_unary, but the response's headers (queued by `_run_call`),
    message and trailers are flushed once: purerpc flushed after each (three yields to the
    event loop, often three TLS records and socket writes per call)."""
    request = await extract_message_from_singleton_stream(stream)
    response = await func(request)
    await stream.send_message(response, flush=False)
    await stream.close(Status(StatusCode.OK))


async def _call_unary_stream(func: Callable[..., Any], stream: ServerStream) -> None:
    """purerpc's call_server_unary_stream, but the next message is asked of the handler only
    once it can be sent (`ServerStream.reserve`): a call whose peer reads nothing holds no
    message, and all of them together stay within the server's outbound budget."""
    request = await extract_message_from_singleton_stream(stream)
    async with contextlib.aclosing(func(request)) as responses:
        while True:
            message_limit.set(await stream.reserve())  # the handler's next message's body
            try:
                # A follow may wait here for long: meanwhile its reservation counts against
                # the budgets (it will hold a message), not against its connection's room.
                stream.set_waiting(True)
                try:
                    message = await anext(responses)
                except StopAsyncIteration:
                    break
                finally:
                    stream.set_waiting(False)
                await stream.send_message(message)
            finally:
                stream.unreserve()
    await stream.close(Status(StatusCode.OK))


AnswerNow = Callable[[Any], Any]


class _InlineMethod(NamedTuple):
    """purerpc's BoundRPCMethod (its two fields: the handler, the signature), and the
    method's synchronous answer (`answer_inline`)."""

    method_fn: Callable[..., Any]
    signature: RPCSignature
    answer_now: AnswerNow


def answer_inline(service: Service, method: str, answer_now: AnswerNow) -> None:
    """Let the connection's reader answer unary `method` of `service` itself, with no task
    and no stream object, by calling `answer_now(request)` when the request has arrived whole
    and the answer can be sent at once (see `_Dispatcher._answer_now`). `answer_now` is a
    plain function, so it can never wait; it returns the response message, or None to have
    the call run as any other (having done nothing), and raises what the method's handler
    would. The handler itself serves every call that is not answered so."""
    bound = service.methods[method]
    if bound.signature.cardinality is not Cardinality.UNARY_UNARY:
        raise ValueError(f"{service.name}/{method} is not a unary call")
    service.methods[method] = _InlineMethod(bound.method_fn, bound.signature, answer_now)


@dataclass(frozen=True, slots=True)
class _Ready:
    """A call answered by `answer_now` whose answer could not be sent at once: its call task
    sends it as any handler's answer, within the call's deadline."""

    response: Any  # the message, or None when the answer is `status` alone
    status: Status
    deadline: float


async def _send_answer(ready: _Ready, stream: ServerStream) -> Status | None:
    if ready.response is None:
        return ready.status
    await stream.send_message(ready.response, flush=False)
    await stream.close(ready.status)
    return None


_OK = Status(StatusCode.OK)

_RUNNERS: dict[Cardinality, _Runner] = {
    Cardinality.UNARY_UNARY: _call_unary_unary,
    Cardinality.UNARY_STREAM: _call_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}

_SHUTTING_DOWN = Status(StatusCode.UNAVAILABLE, "server is shutting down")


class _Dispatcher(ConnectionHandler):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's ConnectionHandler for one connection, with its own dispatch: each call runs in
    its own task and cancel scope, under its deadline, and always ends with a status unless the
    client reset it; only `Exception` is ever caught (row 3). The connection closes when the
    client goes, after a drain (GOAWAY, calls finish), or after idle_timeout without calls."""

    def __init__(
        self,
        services: Mapping[str, Service],
        server: GrpcServer,
        limits: TransportLimits,
        user: str | None,
        refusal: Status | None = None,
        *,
        close_after_call: bool = False,
    ) -> None:
        super().__init__(services, server)
        self._server = server
        # purerpc's default is a 32 MiB message limit.
        self.config = GRPCConfiguration(
            client_side=False,
            max_message_length=limits.max_message_bytes,
            message_accept_encoding=[ACCEPT_ENCODING],
        )
        self._limits = limits
        self._user = user
        # Every call on this connection gets this status (no identity, or over a connection
        # cap); one over a cap closes after its first call or a short idle time.
        self._refusal = refusal
        self._close_after_call = close_after_call
        self._idle_timeout = limits.handshake_timeout if close_after_call else limits.idle_timeout
        self._socket: ServerSocket | None = None
        self._calls: set[ServerStream] = set()
        self._calls_nursery: trio.Nursery | None = None
        self._changed = trio.lowlevel.ParkingLot()  # wakes _supervise
        self._draining = False
        self._h2_closed = False  # h2 sends nothing more: it saw or sent a GOAWAY for an error
        self._idle_since = trio.current_time()
        self._scope = trio.CancelScope()
        self.peer_gone = False

    @property
    def queued_bytes(self) -> int:
        return 0 if self._socket is None else self._socket.queued_bytes

    async def __call__(self, stream_: anyio.abc.ByteStream) -> None:
        # The calls' audit lines are written after their responses (`_audit.defer_audit`): by
        # the writer after its next socket write, the reader before it reads on, and here at
        # the end, whichever comes first; and by the server's timer (`GrpcServer._serve`).
        defer_audit.set(True)  # this task's context: the reader and call tasks copy it
        try:
            await self._serve(stream_)
        finally:
            write_deferred()

    async def _serve(self, stream_: anyio.abc.ByteStream) -> None:
        with self._scope:
            socket = ServerSocket(
                self.config,
                stream_,
                max_concurrent_streams=self._limits.max_concurrent_streams,
                connection_window=self._limits.connection_window_bytes,
                max_queued=self._limits.max_outbound_queued_bytes,
                on_broken=self._lose_peer,
                budget=self._server.outbound,
                user=self._user or "",
            )
            async with socket:  # purerpc: the writer task starts, our SETTINGS go out
                self._socket = socket
                if self._draining:  # asked before the socket existed
                    socket.send_goaway()
                async with trio.open_nursery() as calls:
                    self._calls_nursery = calls
                    calls.start_soon(self._read, socket)
                    await self._supervise()
                    calls.cancel_scope.cancel()
                # Leaving the socket lets the writer flush the last frames: bounded.
                self._scope.deadline = trio.current_time() + self._limits.close_timeout

    def _lose_peer(self) -> None:
        """The peer is gone: nothing can be sent any more, so end every task of the connection
        now (row 6: purerpc left them blocked, and the socket in CLOSE-WAIT)."""
        self.peer_gone = True
        self._scope.cancel()

    async def _read(self, socket: ServerSocket) -> None:
        end = await socket.run_reader(self._start_call, self._answer_now)
        log.debug("connection ends: %s", end.value)
        if end is ReaderEnd.PEER_GONE:
            self._lose_peer()
        else:
            # h2 3.2 sends nothing after a GOAWAY either way: end the calls now, then flush
            # what is queued (h2's GOAWAY) and close.
            self._h2_closed = True
            assert self._calls_nursery is not None
            self._calls_nursery.cancel_scope.cancel()

    def _start_call(self, stream: ServerStream, ready: _Ready | None = None) -> None:
        # Called by the reader task, so the call task copies the reader's context: the
        # connection's current_identity.
        assert self._calls_nursery is not None
        self._calls.add(stream)
        self._calls_nursery.start_soon(self.request_received, stream, ready)

    def _answer_now(self, event: RequestReceived, message: MessageReceived) -> bool:
        """Answer a unary call in the reader (issue 12: a task, a stream object and their
        scheduling per call cost more than a quick handler), when that is sure to need no
        wait: the method has a synchronous answer (`answer_inline`), the connection is not
        refusing or draining, the user is under the call cap, the deadline has not passed,
        and the answer can be queued at once (`ServerSocket.answer_unary`). It does what the
        call's task would: authorization and the audit line are the answer's own (in the
        reader's context: the connection's identity, audit lines deferred), errors map to
        statuses as `_status_for` maps them, statistics are counted. An answer made that
        cannot be sent at once goes to a call task, which sends it as today's calls send
        theirs. False: nothing was done, the call is routed as any other."""
        if self._refusal is not None or self._draining or self._close_after_call:
            return False
        service = self.services.get(event.service_name)
        method = None if service is None else service.methods.get(event.method_name)
        if type(method) is not _InlineMethod:
            return False
        assert self._user is not None and self._socket is not None
        if self._server.calls_by_user[self._user] >= self._limits.max_calls_per_user:
            return False
        socket = self._socket
        stream_id = event.stream_id
        started = trio.current_time()
        timeout = self._deadline(event)
        if not timeout > 0 or not socket.can_answer(stream_id):
            return False  # DEADLINE_EXCEEDED, or waits on the windows or the queue: as today
        body = None
        status = _OK
        try:
            response = method.answer_now(method.signature.request_type.FromString(message.data))
            if response is None:
                return False
            body = response.SerializeToString()
        except Exception as exc:  # never BaseException, as in `_answer`
            response = None
            status = self._status_for(exc, event)
        if not socket.answer_unary(stream_id, body, status):
            self._start_call(socket.open_stream(event), _Ready(response, status, started + timeout))
            return True
        self._server.stats.call_ended(
            self._server.stats.method_label(event.service_name, event.method_name),
            status.status_code.name,
            trio.current_time() - started,
        )
        if not self._calls:
            self._idle_since = trio.current_time()
        return True

    async def _supervise(self) -> None:
        """Return once the connection should close. Woken only by a drain and by the last call
        of a draining connection: the idle check runs on a timer, so that a call costs it
        nothing."""
        timeout = self._idle_timeout
        while not (self._draining and not self._calls):
            if self._draining:
                deadline = math.inf
            elif self._calls:
                deadline = trio.current_time() + timeout  # look again then
            else:
                deadline = self._idle_since + timeout
            with trio.move_on_at(deadline):
                await self._changed.park()
            idle_for = trio.current_time() - self._idle_since
            if not self._calls and not self._draining and idle_for >= timeout:
                log.debug("no call for %s s: closing", timeout)
                self.drain()

    def drain(self) -> None:
        """Send GOAWAY, refuse new streams, close once the open calls have ended."""
        if not self._draining:
            self._draining = True
            if self._socket is not None:
                self._socket.send_goaway()
            self._changed.unpark_all()

    def abort(self, status: Status) -> None:
        """End every open call now, answering `status`."""
        self.drain()
        for call in list(self._calls):
            call.abort(status)

    async def request_received(self, stream: ServerStream, ready: _Ready | None = None) -> None:
        assert self._socket is not None
        started = trio.current_time()
        code = "CANCELLED"  # unless the call gets as far as a status
        try:
            status = await self._answer(stream, ready)
            if status is not None:
                code = status.status_code.name
            elif not (stream.reset_by_peer or self.peer_gone or self._h2_closed):
                code = "OK"  # the call sent its own OK
            if status is not None and stream.can_respond:
                try:
                    await stream.close(status)
                except Exception as exc:  # h2 closed the stream or the connection meanwhile
                    log.debug("no status sent on stream %d: %r", stream.stream_id, exc)
        finally:
            self._record(stream, code, trio.current_time() - started)
            self._socket.release(stream)
            self._calls.discard(stream)
            if not self._calls:
                self._idle_since = trio.current_time()
                if self._draining:
                    self._changed.unpark_all()
            if self._close_after_call:
                self.drain()

    def _record(self, stream: ServerStream, code: str, seconds: float) -> None:
        event = stream.start_stream_event
        stats: TransportStatistics = self._server.stats
        if event is not None:
            method = stats.method_label(event.service_name, event.method_name)
            stats.call_ended(method, code, seconds)

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    async def _answer(self, stream: ServerStream, ready: _Ready | None) -> Status | None:
        """Run the call (or send its `ready` answer); return the status still to send, None
        when it was sent already or there is nobody to send it to."""
        try:
            with stream.cancel_scope:
                return await self._run_call(stream, ready)
            return stream.abort_status  # reset by the client, or ended by the server
        except Exception as exc:  # never BaseException: Cancelled, KeyboardInterrupt propagate
            if self._h2_closed or self.peer_gone:
                # It failed because the connection did (h2 refuses to send after a GOAWAY).
                log.debug("call on a closed connection: %r", exc)
                return None
            return self._status_for(exc, stream.start_stream_event)

    async def _run_call(self, stream: ServerStream, ready: _Ready | None) -> Status | None:
        event: RequestReceived = await stream.receive_event()  # queued by the reader
        if ready is not None:  # answered in the reader (under the caps); to be sent
            return await self._send_ready(stream, ready)
        if self._refusal is not None:
            return self._refusal
        assert self._user is not None
        calls = self._server.calls_by_user
        if calls[self._user] >= self._limits.max_calls_per_user:
            return Status(
                StatusCode.RESOURCE_EXHAUSTED,
                f"user {self._user} has {calls[self._user]} calls open, the server's limit "
                "per user: end some first",
            )
        calls[self._user] += 1
        try:
            return await self._run_method(stream, event)
        finally:
            calls[self._user] -= 1
            if not calls[self._user]:
                del calls[self._user]

    async def _run_method(self, stream: ServerStream, event: RequestReceived) -> Status | None:
        service = self.services.get(event.service_name)
        method = None if service is None else service.methods.get(event.method_name)
        if method is None:
            return Status(
                StatusCode.UNIMPLEMENTED,
                f"method {event.service_name}/{event.method_name} is not implemented",
            )
        cardinality = method.signature.cardinality
        if cardinality is Cardinality.UNARY_UNARY:
            stream.queue_response_start()  # sent with the response or the status
        else:
            await stream.start_response()
        stream.expect_message_type(method.signature.request_type)
        run = _RUNNERS[cardinality]
        call = functools.partial(method.method_fn, request=event)
        timeout = self._deadline(event)
        if timeout == math.inf:  # no deadline: no cancel scope to open and close per call
            await run(call, stream)
            return None
        with trio.move_on_after(timeout):  # row 7: purerpc ignored grpc-timeout
            await run(call, stream)
            return None
        return Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    async def _send_ready(self, stream: ServerStream, ready: _Ready) -> Status | None:
        assert self._user is not None
        calls = self._server.calls_by_user
        calls[self._user] += 1
        try:
            stream.queue_response_start()
            with trio.move_on_at(ready.deadline):
                return await _send_answer(ready, stream)
            return Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        finally:
            calls[self._user] -= 1
            if not calls[self._user]:
                del calls[self._user]

    def _deadline(self, event: RequestReceived) -> float:
        client = math.inf if event.timeout is None else event.timeout.total_seconds()
        return min(max(client, 0.0), self._limits.max_deadline)

    @staticmethod
    def _status_for(exc: Exception, event: RequestReceived | None) -> Status:
        """The status for an exception out of a call (row 4: purerpc sent CANCELLED with the
        exception's repr)."""
        if isinstance(exc, RpcFailedError):
            return exc.status
        if isinstance(exc, ExceptionGroup):
            # A handler's own nursery wraps the status error it meant to raise.
            failed, rest = exc.split(RpcFailedError)
            if failed is not None and rest is None:
                leaf: BaseException = failed
                while isinstance(leaf, BaseExceptionGroup):
                    leaf = leaf.exceptions[0]
                assert isinstance(leaf, RpcFailedError)
                return leaf.status
        if isinstance(exc, DecodeError):
            return Status(StatusCode.INVALID_ARGUMENT, "request message cannot be parsed")
        if isinstance(exc, GrpcProtocolError) and not isinstance(exc, MessageTooLargeError):
            # purerpc's own check of the client's messages, e.g. two on a unary call.
            return Status(StatusCode.INVALID_ARGUMENT, str(exc))
        method = "?" if event is None else f"{event.service_name}/{event.method_name}"
        log.error("call %s failed", method, exc_info=exc)
        return Status(StatusCode.UNKNOWN, "internal error")


# --------------------------------------------------------------------------------------------
# Connections and the listener
# --------------------------------------------------------------------------------------------


class _Connection:
    """One accepted TCP connection: TLS handshake under a timeout, in its own task (a silent
    peer never stalls accept) and within the server's handshake budget, identity and the
    per-user and server-wide connection caps, then a _Dispatcher until it ends."""

    def __init__(self, server: GrpcServer, tcp: trio.SocketStream) -> None:
        self._server = server
        self._tcp = tcp
        self.cancel_scope = trio.CancelScope()
        self.dispatcher: _Dispatcher | None = None
        self.evicted = ""  # why it was dropped before its handshake completed
        try:
            host, port, *_ = tcp.socket.getpeername()
            self.peer = f"{host}:{port}"
        except (OSError, ValueError):
            self.peer = "?"

    def evict(self, why: str) -> None:
        """Drop this connection, still silent or handshaking, for a newer one."""
        self.evicted = why
        self.cancel_scope.cancel()

    def drain(self) -> None:
        if self.dispatcher is None:
            self.cancel_scope.cancel()  # still handshaking: nothing to let finish
        else:
            self.dispatcher.drain()

    def abort(self, status: Status) -> None:
        if self.dispatcher is None:
            self.cancel_scope.cancel()
        else:
            self.dispatcher.abort(status)

    async def run(self) -> None:
        server = self._server
        limits = server.limits
        ssl_stream = trio.SSLStream(self._tcp, server.ssl_context, server_side=True)
        graceful = False
        user: str | None = None
        deadline = trio.current_time() + limits.handshake_timeout
        try:
            with self.cancel_scope:
                # Until its first byte, a connection costs a descriptor and this task only,
                # in a large budget of its own: so a flood of silent connections is held by
                # the server, not queued in the kernel's accept backlog in front of real
                # clients (measured: 2,000 of them re-opened as fast as they were dropped
                # held every new client 3-6 s in that queue with a 128-slot budget alone).
                heard = False
                try:
                    with trio.move_on_at(deadline):
                        await trio.lowlevel.wait_readable(self._tcp.socket)
                        heard = True
                finally:
                    server.speech_heard(self, heard)
                if not heard:
                    server.refused_handshake(self.peer, "sent nothing", kind="silent")
                    return
                try:
                    with trio.move_on_at(deadline) as handshake:
                        try:
                            await ssl_stream.do_handshake()
                        except trio.BrokenResourceError as exc:
                            server.refused_handshake(self.peer, _tls_failure(exc))
                            return
                finally:
                    server.handshake_ended(self)
                if handshake.cancelled_caught:
                    server.refused_handshake(
                        self.peer, "handshake timed out", kind="handshake_timeout"
                    )
                    return
                refusal: Status | None = None
                try:
                    identity = _identity_from_peer_cert(ssl_stream.getpeercert() or {})
                except UnauthenticatedError as exc:
                    refusal = exc.status
                    log.debug("connection from %s: %s", self.peer, exc.status.status_message)
                    user = ""  # counted as one anonymous user, each call UNAUTHENTICATED
                else:
                    # This task's context only: the reader and call tasks it starts copy it.
                    current_identity.set(identity)
                    log.debug("connection from %s: %s", self.peer, identity)
                    user = identity.user
                over_cap = server.admit_connection(user)
                if over_cap is not None:
                    refusal, user = over_cap, None  # not counted; closes after one answer
                self.dispatcher = _Dispatcher(
                    server.services, server, limits, user, refusal, close_after_call=over_cap
                    is not None
                )
                if server.draining:
                    self.dispatcher.drain()
                await self.dispatcher(TrioByteStream(ssl_stream))
                graceful = not self.dispatcher.peer_gone
            if self.evicted and self.dispatcher is None:
                server.refused_handshake(self.peer, self.evicted, kind="evicted")
        finally:
            if user is not None:
                server.release_connection(user)
            if graceful:
                # close_notify, bounded: a peer that reads nothing must not hold us here.
                with trio.move_on_after(limits.close_timeout):
                    await ssl_stream.aclose()
            await trio.aclose_forcefully(ssl_stream)


def _tls_failure(exc: BaseException) -> str:
    """Why a handshake failed, in a few words: the ssl module's reason, not its repr."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return f"TLS error: {cause.reason}"
    return "peer closed or broke the connection"


# accept() errors that mean "out of resources, try again" (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY = 0.1


class GrpcServer:
    """A running server, as `serve_grpc` hands it to `nursery.start`: its bound port, and
    `shutdown(grace)`. Connection count and queued outbound bytes are for metrics and tests."""

    def __init__(
        self,
        services: Mapping[str, Service],
        *,
        port: int,
        ssl_context: ssl.SSLContext,
        limits: TransportLimits,
    ) -> None:
        self.port = port
        self.services = services
        self.stats = TransportStatistics(
            f"{name}/{method}" for name, service in services.items() for method in service.methods
        )
        self.ssl_context = ssl_context
        self.limits = limits
        self.draining = False
        self._connections: set[_Connection] = set()
        # Accepted and silent yet, and in their TLS handshake: oldest first (a dict keeps
        # insertion order). Silent ones are bounded by the descriptors we may hold too.
        self._silent: dict[_Connection, None] = {}
        self._handshaking: dict[_Connection, None] = {}
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_silent = max(1, min(limits.max_silent, nofile // 4))
        self._established = 0
        self._established_by_user: collections.Counter[str] = collections.Counter()
        self.calls_by_user: collections.Counter[str] = collections.Counter()
        self._refusals = RateLimitedLog()
        self.outbound = OutboundBudget(
            limits.max_outbound_bytes, limits.max_outbound_bytes_per_user
        )
        self._changed = trio.lowlevel.ParkingLot()
        self._shutdown_requested = trio.Event()
        self._grace = trio.CancelScope()

    @property
    def connection_count(self) -> int:
        """Open connections, including those still in their TLS handshake."""
        return len(self._connections)

    @property
    def open_calls(self) -> int:
        """Calls (HTTP/2 streams) being served on all connections."""
        return sum(c.dispatcher.open_calls for c in self._connections if c.dispatcher)

    @property
    def handshake_count(self) -> int:
        return len(self._handshaking)

    def speech_heard(self, connection: _Connection, heard: bool) -> None:
        """`connection` is silent no more: it has sent its first bytes (or closed), so it
        needs a handshake slot, and the oldest handshake is dropped if all are taken; or
        `heard` is False: it timed out or was dropped."""
        if self._silent.pop(connection, None) is None or not heard:
            return
        if len(self._handshaking) >= self.limits.max_handshakes:
            victim = next(iter(self._handshaking))
            del self._handshaking[victim]
            victim.evict("handshake budget full: dropped for a newer one")
        self._handshaking[connection] = None

    def handshake_ended(self, connection: _Connection) -> None:
        self._handshaking.pop(connection, None)

    def refused_handshake(self, peer: str, reason: str, kind: str = "handshake_failed") -> None:
        """Log it (rate-limited) and count it under `kind`, one of a few fixed words."""
        self.stats.refused(kind)
        self._refusals.event("tls-refused", peer=peer, reason=reason)

    def admit_connection(self, user: str) -> Status | None:
        """Count an established connection of `user`; the status to answer instead when it
        would pass a cap."""
        if self._established_by_user[user] >= self.limits.max_connections_per_user:
            self.stats.refused("too_many_connections_per_user")
            message = (
                f"user {user} has {self._established_by_user[user]} connections open, the "
                "server's limit per user: reuse a connection"
            )
        elif self._established >= self.limits.max_connections:
            self.stats.refused("too_many_connections")
            message = f"the server has {self._established} connections open, its limit"
        else:
            self._established += 1
            self._established_by_user[user] += 1
            return None
        audit_event("connection-refused", user=user, reason=message)
        return Status(StatusCode.RESOURCE_EXHAUSTED, message)

    def release_connection(self, user: str) -> None:
        self._established -= 1
        self._established_by_user[user] -= 1
        if not self._established_by_user[user]:
            del self._established_by_user[user]

    @property
    def outbound_queued_bytes(self) -> int:
        """Bytes queued for all connections' sockets and not yet written."""
        return sum(c.dispatcher.queued_bytes for c in self._connections if c.dispatcher)

    @property
    def outbound_budget_used(self) -> int:
        """Of `limits.max_outbound_bytes`: queued plus reserved by streaming calls."""
        return self.outbound.used

    def shutdown(self, grace: float) -> None:
        """Stop accepting, send GOAWAY on every connection, let open calls finish for up to
        `grace` seconds, then end the rest with UNAVAILABLE; `serve_grpc` then returns. A
        second call can only shorten the grace period."""
        self._grace.deadline = min(self._grace.deadline, trio.current_time() + grace)
        self._shutdown_requested.set()

    async def _serve(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[GrpcServer]
    ) -> None:
        async with trio.open_nursery() as connections:
            connections.start_soon(_write_deferred_audit_lines)
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept, listener, connections)
                task_status.started(self)
                await self._shutdown_requested.wait()
                acceptors.cancel_scope.cancel()
            # Refuse connections from now on, before any client sees a GOAWAY.
            for listener in listeners:
                await listener.aclose()
            self.draining = True
            for connection in list(self._connections):
                connection.drain()
            with self._grace:
                await self._wait_all_closed()
            for connection in list(self._connections):
                connection.abort(_SHUTTING_DOWN)
            with trio.move_on_after(self.limits.close_timeout):
                await self._wait_all_closed()
            connections.cancel_scope.cancel()

    async def _wait_all_closed(self) -> None:
        while self._connections:
            await self._changed.park()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept: %s; retrying in %s s", os.strerror(exc.errno), _ACCEPT_RETRY)
                await trio.sleep(_ACCEPT_RETRY)
                continue
            if len(self._connections) >= self._max_sockets:
                # A backstop on descriptors only: handshakes and refused connections are
                # bounded and short-lived, so this is reached only in a flood of both.
                log.debug("refused a connection: %d open", len(self._connections))
                self.stats.refused("too_many_sockets")
                await trio.aclose_forcefully(tcp)
                continue
            if len(self._silent) >= self._max_silent:
                # Dropping the oldest, not refusing the newest: a peer that speaks at once
                # gets through however many silent ones keep arriving (issue 9: a global cap
                # let 1,000 of them lock everyone out).
                victim = next(iter(self._silent))
                del self._silent[victim]
                victim.evict("sent nothing: dropped for a newer connection")
            connection = _Connection(self, tcp)
            self._connections.add(connection)
            self._silent[connection] = None
            connections.start_soon(self._run_connection, connection)

    @property
    def _max_sockets(self) -> int:
        return self.limits.max_connections + self._max_silent + 2 * self.limits.max_handshakes

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            await connection.run()
        except Exception:  # a bug in jobd: lose the connection, keep the server
            log.exception("connection from %s failed", connection.peer)
        finally:
            self._silent.pop(connection, None)
            self._handshaking.pop(connection, None)
            self._connections.discard(connection)
            self._changed.unpark_all()


# A call's audit line waits at most this long for its connection's next write or read.
_AUDIT_WRITE_INTERVAL = 1.0


async def _write_deferred_audit_lines() -> None:
    """The bound on how late an audit line is written, when its connection neither writes nor
    reads any more (a peer that stopped reading its responses, and sends nothing)."""
    while True:
        await trio.sleep(_AUDIT_WRITE_INTERVAL)
        write_deferred()


async def serve_grpc(
    services: Iterable[Service],
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    limits: TransportLimits = TransportLimits(),  # noqa: B008  (frozen: safe to share)
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `services` (e.g. `[servicer.service]`) on exactly `host`:`port` (port 0: any free
    one) until cancelled, or until `GrpcServer.shutdown` has finished. `task_status.started`
    gets the `GrpcServer` once listening. Binding errors (the port is taken: no SO_REUSEPORT)
    are raised before that, unwrapped."""
    by_name = {service.name: service for service in services}
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        ports = {listener.socket.getsockname()[1] for listener in listeners}
        if len(ports) != 1:
            raise ValueError(
                f"{host!r} has several addresses, bound to different ports {sorted(ports)}: "
                "give one address, or a fixed port"
            )
        server = GrpcServer(by_name, port=ports.pop(), ssl_context=ssl_context, limits=limits)
        await server._serve(listeners, task_status)
    finally:
        write_deferred()
        for listener in listeners:
            await trio.aclose_forcefully(listener)
