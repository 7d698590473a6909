"""jobd.server._transport: the gRPC-over-mTLS transport. Each purerpc server defect it closes
(docs/DESIGN.md, "purerpc defects", rows 1-10) has a regression test here, named after what it
guarantees, driven by the official grpcio client or, where grpcio will not misbehave on request,
raw h2."""

from __future__ import annotations

import ctypes
import functools
import logging
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.wrappers_pb2 import StringValue
from purerpc import (
    Cardinality,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RPCSignature,
    Service,
    UnauthenticatedError,
)

from jobd import engine
from jobd.pki import Issued, issue_cert, make_ca
from jobd.server import _grpc_stream
from jobd.server._audit import audit_event
from jobd.server._grpc_stream import (
    LARGE_MESSAGE,
    MESSAGE_FRAMING,
    SMALL_MESSAGE,
    OutboundBudget,
    ServerStream,
    TrioByteStream,
    _Decoder,
    goaway_frame,
    message_limit,
    percent_encode_grpc_message,
    report_waits,
)
from jobd.server._service import JobService
from jobd.server._transport import (
    GrpcServer,
    Identity,
    TransportLimits,
    _identity_from_peer_cert,
    answer_inline,
    current_identity,
    make_server_ssl_context,
    serve_grpc,
)
from jobd.v1 import jobd_pb2 as pb

from .e2e import tcp_sockets

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BIG = 2**31 - 1
TEST_TIMEOUT = 30


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def issue_without_cn(ca: Issued) -> Issued:
    """A valid client certificate whose subject has an OU but no CN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca.cert.not_valid_before_utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "user")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


@dataclass
class Pki:
    ca: Issued
    directory: Path
    people: dict[str, Issued]

    def files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"

    def server_context(self) -> ssl.SSLContext:
        return make_server_ssl_context(*self.files("server"), self.directory / "ca.pem")

    def client_context(
        self, name: str | None, *, maximum_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.ca.cert_pem().decode())
        if name is not None:
            context.load_cert_chain(*self.files(name))
        if maximum_version is not None:
            context.maximum_version = maximum_version
        context.set_alpn_protocols(["h2"])
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("transport-pki")
    ca = make_ca()
    other_ca = make_ca("someone else's CA")
    people = {
        "server": issue_cert(ca, "localhost", server=True),
        "alice": issue_cert(ca, "alice", ["user"]),
        "bob": issue_cert(ca, "bob", ["user"]),
        "admin": issue_cert(ca, "root", ["admin", "ops"]),
        "nocn": issue_without_cn(ca),
        "stranger": issue_cert(other_ca, "alice", ["admin"]),
    }
    ca.write(directory / "ca.pem", directory / "ca.key")
    for name, issued in people.items():
        issued.write(directory / f"{name}.pem", directory / f"{name}.key")
    return Pki(ca, directory, people)


# --------------------------------------------------------------------------------------------
# The test service
# --------------------------------------------------------------------------------------------


class Fatal(BaseException):
    """Not an Exception: stands for KeyboardInterrupt and friends, which must never be caught."""


class Probe:
    """A tiny service built by hand (no jobd proto), and what its handlers did."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.release = trio.Event()
        self.active = 0
        self.max_active = 0
        self.produced = 0
        self.errors: list[str] = []
        self.paths: list[str] = []  # "now" (synchronous answer) or "handler", per Now call

    async def whoami(self, request: StringValue) -> StringValue:
        identity = current_identity.get()
        for _ in range(3):  # let other calls run in between: the identity must not move
            await trio.lowlevel.checkpoint()
            if current_identity.get() is not identity:
                self.errors.append("identity changed within a call")
        return StringValue(value=f"{identity.user}|{','.join(sorted(identity.roles))}")

    async def audited(self, request: StringValue) -> StringValue:
        """Logs an audit line as the service's handlers do, at the call's end however it ends;
        value "block" waits for `release` first."""
        try:
            if request.value == "block":
                self.started.set()
                await self.release.wait()
            return StringValue(value=f"answer-{request.value}")
        except trio.Cancelled:
            self.cancelled.set()
            raise
        finally:
            audit_event("probe", value=request.value)

    async def size(self, request: StringValue) -> StringValue:
        return StringValue(value=str(len(request.value)))

    def now(self, request: StringValue) -> StringValue | None:
        """The synchronous answer of "Now" (`answer_inline`): value "later" is not ready now
        (None); "fail:KIND:TEXT" raises as `fail` does; else an answer and an audit line."""
        if request.value == "later":
            return None
        self.paths.append("now")
        audit_event("probe-now", value=request.value)
        if request.value.startswith("fail:"):
            self._raise(request.value.removeprefix("fail:"))
        return StringValue(value=f"now-{request.value}")

    async def now_handler(self, request: StringValue) -> StringValue:
        """The handler of "Now", for calls the reader does not answer itself."""
        self.paths.append("handler")
        if request.value == "later":
            await trio.lowlevel.checkpoint()
            return StringValue(value="later-answer")
        answer = self.now(request)
        assert answer is not None
        return answer

    async def block(self, request: StringValue) -> StringValue:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        finally:
            self.active -= 1
        return StringValue(value="released")

    async def fail(self, request: StringValue) -> StringValue:
        self._raise(request.value)

    @staticmethod
    def _raise(value: str) -> NoReturn:
        kind, _, text = value.partition(":")
        if kind == "notfound":
            raise NotFoundError(text)
        if kind == "invalid":
            raise InvalidArgumentError(text)
        if kind == "group":
            raise ExceptionGroup("handler nursery", [PermissionDeniedError(text)])
        if kind == "fatal":
            raise Fatal
        raise ValueError(f"secret detail {text}")

    async def stream(self, request: StringValue) -> AsyncIterator[StringValue]:
        """Value "COUNT:SIZE" sends COUNT messages of SIZE bytes; ":block" then waits forever."""
        count, size, then = (request.value.split(":") + [""])[:3]
        if count == "limits":  # "limits:COUNT": each message tells the body limit it was given
            for i in range(int(size)):  # (after the first, once `release` is set)
                if i == 1:
                    await self.release.wait()
                self.produced += 1
                yield StringValue(value=str(message_limit.get()))
            return
        if count == "replay":  # "replay:COUNT:SIZE[:wait]": reports its waits, as Output does;
            _, n, each, *wait = request.value.split(":")  # "wait": then waits for more, said so
            waiting = report_waits()
            assert waiting is not None
            for _ in range(int(n)):
                await trio.lowlevel.checkpoint()  # as OutputReader's replay before each chunk
                self.produced += 1
                yield StringValue(value="x" * int(each))
            if wait:
                waiting(True)
                try:
                    await trio.sleep_forever()
                finally:
                    waiting(False)
            return
        completed = False
        try:
            for _ in range(int(count)):
                self.produced += 1
                yield StringValue(value="x" * int(size))
                self.started.set()
            if then == "block":
                await trio.sleep_forever()
            completed = True
        finally:
            if not completed:
                self.cancelled.set()

    def service(self) -> Service:
        service = Service("test.Echo")
        unary = RPCSignature(Cardinality.UNARY_UNARY, StringValue, StringValue)
        for name, method in [
            ("Whoami", self.whoami),
            ("Size", self.size),
            ("Block", self.block),
            ("Fail", self.fail),
            ("Audited", self.audited),
        ]:
            service.add_method(name, method, unary)
        service.add_method(
            "Stream", self.stream, RPCSignature(Cardinality.UNARY_STREAM, StringValue, StringValue)
        )
        service.add_method("Now", self.now_handler, unary)
        answer_inline(service, "Now", self.now)
        return service


# --------------------------------------------------------------------------------------------
# Server and clients
# --------------------------------------------------------------------------------------------


def server_side_sockets(port: int) -> list[str]:
    """TCP states of this process's sockets whose local port is `port`."""
    return [f[3] for f in tcp_sockets() if int(f[1].rsplit(":", 1)[1], 16) == port]


@dataclass
class Running:
    server: GrpcServer
    stopped: trio.Event  # serve_grpc returned by itself


@asynccontextmanager
async def running(
    pki: Pki,
    probe: Probe,
    limits: TransportLimits | None = None,
    services: list[Service] | None = None,
) -> AsyncIterator[Running]:
    stopped = trio.Event()

    async def serve(task_status: trio.TaskStatus[GrpcServer]) -> None:
        await serve_grpc(
            services or [probe.service()],
            host="127.0.0.1",
            port=0,
            ssl_context=pki.server_context(),
            limits=limits or TransportLimits(),
            task_status=task_status,
        )
        stopped.set()

    async with trio.open_nursery() as nursery:
        server: GrpcServer = await nursery.start(serve)
        with trio.fail_after(TEST_TIMEOUT):  # a regression fails instead of hanging
            yield Running(server, stopped)
        nursery.cancel_scope.cancel()
    # Every server task has ended with the nursery; its sockets must be closed too.
    assert server_side_sockets(server.port) == []
    assert probe.errors == []


class GrpcClient:
    """The official grpcio client on one channel (one connection); calls run in a thread."""

    def __init__(self, port: int, pki: Pki, name: str) -> None:
        who = pki.people[name]
        credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem(), who.key_pem(), who.cert_pem())
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(
            f"/test.Echo/{method}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    def streaming(self, method: str) -> Any:
        return self.channel.unary_stream(
            f"/test.Echo/{method}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    async def call(self, method: str, value: str = "", grpc_timeout: float | None = 10) -> str:
        def run() -> str:
            reply = self.unary(method)(StringValue(value=value), timeout=grpc_timeout)
            return str(reply.value)

        return await trio.to_thread.run_sync(run)

    async def status(
        self, method: str, value: str = "", grpc_timeout: float | None = 10
    ) -> tuple[grpc.StatusCode, str]:
        def run() -> tuple[grpc.StatusCode, str]:
            try:
                self.unary(method)(StringValue(value=value), timeout=grpc_timeout)
            except grpc.RpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, ""

        return await trio.to_thread.run_sync(run)


@contextmanager
def grpc_client(port: int, pki: Pki, name: str = "alice") -> Iterator[GrpcClient]:
    client = GrpcClient(port, pki, name)
    try:
        yield client
    finally:
        client.channel.close()


def grpc_frame(value: str) -> bytes:
    payload: bytes = StringValue(value=value).SerializeToString()
    return struct.pack(">?I", False, len(payload)) + payload


class RawClient:
    """TLS and h2 by hand, for what grpcio will not do: huge windows and no reads, RST_STREAM
    at a chosen moment, raw headers, streams after GOAWAY."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.acknowledge = True  # give received DATA back to the server's flow control

    @classmethod
    @asynccontextmanager
    async def open(
        cls, port: int, pki: Pki, name: str = "alice", settings: dict[int, int] | None = None
    ) -> AsyncIterator[RawClient]:
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=pki.client_context(name)
        )
        client = cls(stream)
        try:
            client.h2.initiate_connection()
            if settings:
                client.h2.update_settings(settings)
            await client.flush()
            yield client
        finally:
            await trio.aclose_forcefully(stream)

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def request(
        self,
        method: str,
        value: str = "",
        extra: list[tuple[str, str]] | None = None,
        *,
        like_grpcio: bool = False,
        payload: bytes | None = None,
        then_reset: bool = False,
    ) -> int:
        """Send a unary request in one write. like_grpcio: with WINDOW_UPDATEs for the stream
        and the connection around its DATA, as grpcio sends them; payload: this message
        instead of `value`'s; then_reset: an RST_STREAM right behind it, in the same write."""
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", method if method.startswith("/") else f"/test.Echo/{method}"),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            *(extra or []),
        ]
        self.h2.send_headers(stream_id, headers)
        if like_grpcio:
            self.h2.increment_flow_control_window(1024, stream_id=stream_id)
        message = grpc_frame(value) if payload is None else payload
        self.h2.send_data(stream_id, message, end_stream=True)
        if like_grpcio:
            self.h2.increment_flow_control_window(1024)
        if then_reset:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self.flush()
        return stream_id

    async def until(self, predicate: Callable[[h2.events.Event], bool]) -> h2.events.Event:
        """The first event so far that matches, reading (and acknowledging data) until one
        does; fail on end of stream."""
        checked = 0
        while True:
            for event in self.events[checked:]:
                if predicate(event):
                    return event
            checked = len(self.events)
            data = await self.stream.receive_some()
            assert data, f"connection closed; events: {self.events}"
            events = self.h2.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.DataReceived) and self.acknowledge:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    # h2 3.2 stops all traffic on GOAWAY; a client finishes its open streams
                    # (RFC 7540 §6.8), and these tests need to, too.
                    self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            self.events.extend(events)
            await self.flush()

    async def trailers(self, stream_id: int) -> dict[str, str]:
        event = await self.until(
            lambda e: (
                isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived)
                and e.stream_id == stream_id
                and e.stream_ended is not None
            )
        )
        return dict(event.headers)

    async def read_to_eof(self) -> None:
        """Read until the server closes; a close without close_notify counts as well."""
        while True:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                return
            if not data:
                return
            self.events.extend(self.h2.receive_data(data))


def of(kind: type, stream_id: int | None = None) -> Callable[[h2.events.Event], bool]:
    return lambda e: isinstance(e, kind) and stream_id in (None, getattr(e, "stream_id", None))


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # trio keeps idle worker threads for reuse ("Trio thread N"); those are not ours.
    left = [t for t in set(threading.enumerate()) - before if not t.name.startswith("Trio thread")]
    assert left == []


# --------------------------------------------------------------------------------------------
# Row 1: own listener, TLS in the connection's task, identity per connection
# --------------------------------------------------------------------------------------------


async def test_identity_is_each_connections_certificate_never_mixed_up(
    pki: Pki, probe: Probe
) -> None:
    async with running(pki, probe) as run:
        port = run.server.port
        with (
            grpc_client(port, pki, "alice") as alice,
            grpc_client(port, pki, "bob") as bob,
            grpc_client(port, pki, "admin") as admin,
        ):

            def many() -> list[tuple[str, str]]:
                calls = []
                for i in range(300):  # interleaved: both connections busy at once
                    for who, client in (("alice", alice), ("bob", bob)):
                        future = client.unary("Whoami").future(StringValue(value=str(i)), 30)
                        calls.append((who, future))
                return [(who, future.result().value) for who, future in calls]

            results = await trio.to_thread.run_sync(many)
            assert len(results) == 600
            assert [r for r in results if r[1] != f"{r[0]}|user"] == []
            # user = CN, roles = every OU
            assert await admin.call("Whoami") == "root|admin,ops"


async def test_listens_on_exactly_the_given_host_and_a_taken_port_is_an_error(
    pki: Pki, probe: Probe
) -> None:
    async with running(pki, probe) as run:
        port = run.server.port
        # 127.0.0.2 is loopback too: a server bound to every interface would answer there.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.2", port)
        # No SO_REUSEPORT: a second server cannot silently share the port. The error comes
        # from nursery.start, unwrapped.
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError) as taken:
                await nursery.start(
                    functools.partial(
                        serve_grpc,
                        [probe.service()],
                        host="127.0.0.1",
                        port=port,
                        ssl_context=pki.server_context(),
                    )
                )
        assert "in use" in str(taken.value)


async def test_silent_peers_do_not_stall_accepting_others(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        silent = [await trio.open_tcp_stream("127.0.0.1", run.server.port) for _ in range(3)]
        try:
            with grpc_client(run.server.port, pki) as client:
                assert await client.call("Whoami") == "alice|user"
            assert run.server.connection_count >= 3
        finally:
            for stream in silent:
                await stream.aclose()


async def test_handshake_timeout_closes_a_silent_peer(
    pki: Pki, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    # Only time is waited on here: the peer never sends a byte.
    async with running(pki, probe, TransportLimits(handshake_timeout=5)) as run:
        silent = await trio.open_tcp_stream("127.0.0.1", run.server.port)
        with trio.fail_after(60):
            assert await silent.receive_some() == b""
        await silent.aclose()


async def test_byte_stream_adapter_speaks_anyio(pki: Pki) -> None:
    """Row 2: trio's errors reach purerpc as anyio's, which it treats as an end of stream; and
    the attributes purerpc asks for are there."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_context = pki.client_context("alice")

    async def pair() -> tuple[TrioByteStream, trio.SSLStream[trio.SocketStream]]:
        client = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_context)
        server = trio.SSLStream(await listeners[0].accept(), pki.server_context(), server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return TrioByteStream(server), client

    try:
        adapter, client = await pair()
        attrs = anyio.abc.SocketAttribute
        assert adapter.extra(attrs.raw_socket).fileno() >= 0
        assert adapter.extra(attrs.remote_address) == client.transport_stream.socket.getsockname()
        assert adapter.extra(attrs.local_port) == port
        await client.send_all(b"ping")
        assert await adapter.receive() == b"ping"
        await trio.aclose_forcefully(client)  # TCP FIN, no TLS close_notify: what clients do
        with pytest.raises(anyio.BrokenResourceError):
            await adapter.receive()
        await adapter.aclose()

        adapter, client = await pair()
        await client.aclose()  # close_notify: a clean end of stream
        with pytest.raises(anyio.EndOfStream):
            await adapter.receive()
        with pytest.raises(anyio.BrokenResourceError):  # send after the peer is gone
            for _ in range(100):
                await adapter.send(b"x" * 65536)
        await adapter.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()


# --------------------------------------------------------------------------------------------
# Row 2 and 6: a client that vanishes
# --------------------------------------------------------------------------------------------


async def test_abrupt_disconnect_cancels_its_calls_and_logs_nothing(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            await raw.request("Block")
            await probe.started.wait()
            await trio.aclose_forcefully(raw.stream)  # no close_notify, no RST_STREAM
        with trio.fail_after(10):
            await probe.cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert run.server.connection_count == 0
        assert server_side_sockets(run.server.port) == ["0A"]  # only the listener (LISTEN)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Got exception in main dispatch loop" not in caplog.text


# --------------------------------------------------------------------------------------------
# Audit lines: written after the response (issue 12), never lost
# --------------------------------------------------------------------------------------------


def _audit_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jobd.audit"]


@contextmanager
def audit_lines_into(order: list[str]) -> Iterator[None]:
    """Append each audit line's message to `order` as it is written."""

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            order.append(record.getMessage())

    seen = Seen()
    logging.getLogger("jobd.audit").addHandler(seen)
    try:
        yield
    finally:
        logging.getLogger("jobd.audit").removeHandler(seen)


def record_sends(monkeypatch: pytest.MonkeyPatch, order: list[str], marker: bytes) -> None:
    """Append to `order` how each send of bytes holding `marker` went: "written by the
    writer" (`TrioByteStream.send`), or "sent by <task>: <taken>" (`send_now`, called by
    the reader or by the call's task when the writer is idle, issue 12; False when it left
    the bytes to the writer)."""
    send, send_now = TrioByteStream.send, TrioByteStream.send_now

    async def recording_send(self: TrioByteStream, item: bytes | memoryview) -> None:
        if marker in bytes(item):
            order.append("written by the writer")
        await send(self, item)

    def recording_send_now(self: TrioByteStream, data: bytes) -> bool:
        sent = send_now(self, data)
        if marker in data:
            order.append(f"sent by {trio.lowlevel.current_task().name.rsplit('.', 1)[-1]}: {sent}")
        return sent

    monkeypatch.setattr(TrioByteStream, "send", recording_send)
    monkeypatch.setattr(TrioByteStream, "send_now", recording_send_now)


async def test_audit_line_is_written_after_the_socket_write_of_its_response(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line is not on the call's path: it is written once the response's bytes have been
    handed to the socket (before this change it was written before they were even queued)."""
    caplog.set_level(logging.INFO, "jobd.audit")
    order: list[str] = []
    record_sends(monkeypatch, order, b"answer-one")
    with audit_lines_into(order):
        async with running(pki, probe) as run:
            async with RawClient.open(run.server.port, pki) as raw:
                # First a call without a line: the SETTINGS exchange is over, so the client
                # sends nothing more until it has read the response.
                stream_id = await raw.request("Whoami")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                stream_id = await raw.request("Audited", "one")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                stream_id = await raw.request("Whoami")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
    # By the writer, or by the reader or the call's task themselves (issue 12): either way
    # the bytes are in the socket before the line is written.
    handed = [
        "in the socket" if e == "written by the writer" or e.endswith(": True") else e
        for e in order
        if not e.endswith(": False")
    ]
    assert handed == ["in the socket", "probe value=one"]


async def test_audit_line_is_written_before_the_connection_reads_on(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response that cannot be written (the peer does not read) does not hold its line back
    past the connection's next read: the next request on the connection is read only after
    the line is written."""
    caplog.set_level(logging.INFO, "jobd.audit")
    send = TrioByteStream.send
    unblock = trio.Event()

    async def stuck_send(self: TrioByteStream, item: bytes | memoryview) -> None:
        if b"answer-one" in bytes(item):
            await unblock.wait()  # as a socket whose peer reads nothing
        await send(self, item)

    monkeypatch.setattr(TrioByteStream, "send", stuck_send)
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Audited", "one")
            await trio.testing.wait_all_tasks_blocked()  # answered; its send is stuck
            await raw.request("Whoami")
            await trio.testing.wait_all_tasks_blocked()  # the server has read it
            assert _audit_messages(caplog) == ["probe value=one"]
            unblock.set()
            assert (await raw.trailers(first))["grpc-status"] == "0"


async def test_audit_line_of_a_call_cut_by_a_vanished_peer_is_written(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    """No line is lost when the connection breaks: the connection's end writes what is
    queued (not left to the server's timer)."""
    caplog.set_level(logging.INFO, "jobd.audit")
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            await raw.request("Audited", "block")
            await probe.started.wait()
            await trio.aclose_forcefully(raw.stream)  # no close_notify, no RST_STREAM
        with trio.fail_after(10):
            await probe.cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert run.server.connection_count == 0
        assert _audit_messages(caplog) == ["probe value=block"]


class _CallSteps(trio.abc.Instrument):
    """Counts the steps of the server's call tasks (each start or resume after a yield)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("request_received"):
            self.steps += 1


async def test_a_quick_unary_call_runs_in_one_step_of_its_task(pki: Pki, probe: Probe) -> None:
    """Issue 12: a call whose request arrived whole and whose handler does not wait is
    answered without a yield (its status is queued without the fairness checkpoint that
    cost a task switch per call)."""
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Size", "warm")  # the SETTINGS exchange is over after it
            assert (await raw.trailers(first))["grpc-status"] == "0"
            steps = _CallSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                stream_id = await raw.request("Size", "abc")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.steps == 1


class _CallTasks(trio.abc.Instrument):
    """Counts the server's call tasks started."""

    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("request_received"):
            self.spawned += 1


@contextmanager
def counting_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_CallTasks, list[int]]]:
    """The call tasks started and the stream objects made (their ids) meanwhile."""
    tasks = _CallTasks()
    streams: list[int] = []
    init = ServerStream.__init__

    def counting_init(self: ServerStream, *args: Any) -> None:
        init(self, *args)
        streams.append(self.stream_id)

    monkeypatch.setattr(ServerStream, "__init__", counting_init)
    trio.lowlevel.add_instrument(tasks)
    try:
        yield tasks, streams
    finally:
        trio.lowlevel.remove_instrument(tasks)
        monkeypatch.setattr(ServerStream, "__init__", init)


NOW_METHOD = "test.Echo/Now"


@pytest.mark.parametrize("like_grpcio", [False, True])
async def test_a_call_answered_now_runs_in_the_reader_without_task_or_stream(
    pki: Pki,
    probe: Probe,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    like_grpcio: bool,
) -> None:
    """Issue 12: a unary call with a synchronous answer (`answer_inline`), whose request
    arrived whole and whose answer fits the windows and the queue, is answered by the
    connection's reader: no call task, no stream object; same answer, audit line and
    statistics as a call task's."""
    caplog.set_level(logging.INFO, "jobd.audit")
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Size", "warm")  # the SETTINGS exchange is over after it
            assert (await raw.trailers(first))["grpc-status"] == "0"
            with counting_calls(monkeypatch) as (tasks, streams):
                stream_id = await raw.request("Now", "abc", like_grpcio=like_grpcio)
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            assert (tasks.spawned, streams) == (0, [])
            data = b"".join(
                e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
            )
            assert data == grpc_frame("now-abc")
            headers = next(e for e in raw.events if of(h2.events.ResponseReceived, stream_id)(e))
            assert dict(headers.headers)["content-type"] == "application/grpc+proto"
            # the connection goes on: calls that are not answered now, then another that is
            stream_id = await raw.request("Size", "abcd")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            stream_id = await raw.request("Now", "def", like_grpcio=like_grpcio)
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
        assert probe.paths == ["now", "now"]
        assert run.server.stats.calls[NOW_METHOD, "OK"] == 2
        assert sum(run.server.stats.latency[NOW_METHOD].counts) == 2
        assert run.server.open_calls == 0
        assert run.server.calls_by_user == {}
    assert _audit_messages(caplog) == ["probe-now value=abc", "probe-now value=def"]


async def test_an_answer_made_by_the_reader_is_sent_by_the_reader(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: while the writer is idle, the reader hands what one read brought about (here
    a call's whole answer) to the socket itself (`TrioByteStream.send_now`): no writer wake,
    the answer leaves before the reader reads on. The call's audit line is still written
    after the answer's bytes are in the socket."""
    caplog.set_level(logging.INFO, "jobd.audit")
    order: list[str] = []
    record_sends(monkeypatch, order, b"now-abc")
    with audit_lines_into(order):
        async with running(pki, probe) as run:
            async with RawClient.open(run.server.port, pki) as raw:
                first = await raw.request("Size", "warm")  # the SETTINGS exchange is over
                assert (await raw.trailers(first))["grpc-status"] == "0"
                stream_id = await raw.request("Now", "abc", like_grpcio=True)
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                data = b"".join(
                    e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
                )
                assert data == grpc_frame("now-abc")
    assert order == ["sent by _read: True", "probe-now value=abc"]  # `_read`: the reader task
    assert run.server.stats.calls[NOW_METHOD, "OK"] == 1


@pytest.mark.parametrize("unacknowledged", [None, 88, 1 << 30])
async def test_an_answer_made_after_a_wait_is_sent_by_its_call_task(
    pki: Pki,
    probe: Probe,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    unacknowledged: int | None,
) -> None:
    """Issue 12: a unary answer made by a handler that waited (a Start waits for its shim) is
    sent by the call's own task when the writer is idle, not by a writer woken for it (a
    wake, two scheduler passes and whatever trio ran in between); the audit line still comes
    after the answer's bytes are in the socket. A few bytes the peer has not acknowledged
    yet in the kernel's queue (`unacknowledged`: the peer's TCP delays its ACK of a window
    update sent just before) do not hold it back; a queue holding half the send buffer
    does: the writer sends it."""
    if unacknowledged is not None:
        queued = struct.pack("i", unacknowledged)
        monkeypatch.setattr(_grpc_stream.fcntl, "ioctl", lambda *args: queued)
    caplog.set_level(logging.INFO, "jobd.audit")
    order: list[str] = []
    record_sends(monkeypatch, order, b"answer-block")
    with audit_lines_into(order):
        async with running(pki, probe) as run:
            async with RawClient.open(run.server.port, pki) as raw:
                first = await raw.request("Size", "warm")  # the SETTINGS exchange is over
                assert (await raw.trailers(first))["grpc-status"] == "0"
                stream_id = await raw.request("Audited", "block", like_grpcio=True)
                await probe.started.wait()
                await trio.testing.wait_all_tasks_blocked()  # the reader has read on
                probe.release.set()
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                data = b"".join(
                    e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
                )
                assert data == grpc_frame("answer-block")
    if unacknowledged == 1 << 30:  # more than any send buffer
        assert order == ["sent by request_received: False", "written by the writer",
                         "probe value=block"]
    else:
        assert order == ["sent by request_received: True", "probe value=block"]


async def test_answers_the_kernel_takes_only_part_of_arrive_whole_and_in_order(
    pki: Pki, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send by the reader that the kernel does not take whole leaves the rest of its TLS
    record first in line, sent by the writer (or the next use of the TLS stream): every
    answer arrives whole, in order, on a TLS stream that stays intact. Made to happen here
    with a send buffer smaller than one answer, the socket's queue hidden from `send_now`
    (it sends only into an empty one), and a client that reads nothing for a while."""
    monkeypatch.setattr(_grpc_stream.fcntl, "ioctl", lambda *args: b"\0\0\0\0")
    flushed: list[int] = []
    flush_unsent = TrioByteStream.flush_unsent

    async def counting_flush(self: TrioByteStream) -> None:
        flushed.append(1)
        await flush_unsent(self)

    monkeypatch.setattr(TrioByteStream, "flush_unsent", counting_flush)
    set_options = _grpc_stream.SocketWrapper._set_socket_options

    def small_send_buffer(stream: anyio.abc.SocketStream) -> None:
        set_options(stream)
        raw_socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    monkeypatch.setattr(
        _grpc_stream.SocketWrapper, "_set_socket_options", staticmethod(small_send_buffer)
    )
    value = "v" * 15000  # an answer's TLS record is bigger than the socket's send buffer
    calls = 100  # as many streams as may be open at once
    window = 16 * 1024 * 1024  # all the answers fit: the client reads without acknowledging
    async with running(pki, probe) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(window)  # the connection's window
            first = await raw.request("Size", "warm")
            assert (await raw.trailers(first))["grpc-status"] == "0"
            ids: list[int] = []

            async def send_all_requests() -> None:
                for i in range(calls):
                    ids.append(await raw.request("Now", f"{i}:{value}"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_requests)
                await trio.testing.wait_all_tasks_blocked()  # the server's sends are stuck
                ended = 0
                while ended < calls:
                    data = await raw.stream.receive_some()
                    assert data, "connection closed"
                    events = raw.h2.receive_data(data)  # nothing to send back: no flush
                    raw.events.extend(events)
                    ended += sum(isinstance(e, h2.events.StreamEnded) for e in events)
            for i, stream_id in enumerate(ids):
                data = b"".join(
                    e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
                )
                assert data == grpc_frame(f"now-{i}:{value}"), i
    assert flushed, "no send was left unfinished"
    assert run.server.stats.calls[NOW_METHOD, "OK"] == calls


def _request_key_update(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Have OpenSSL send a TLS 1.3 KeyUpdate asking the peer to update its keys too, with the
    client's next record (the ssl module has no call for it: SSL_key_update on its SSL*)."""
    libssl = ctypes.CDLL("libssl.so.3")
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    ssl_socket = stream._ssl_object._sslobj  # type: ignore[attr-defined]
    # CPython's PySSLSocket: PyObject_HEAD, the socket's weakref, then the SSL*.
    pointer = ctypes.c_void_p.from_address(id(ssl_socket) + 3 * ctypes.sizeof(ctypes.c_void_p))
    assert libssl.SSL_key_update(pointer.value, 1) == 1  # SSL_KEY_UPDATE_REQUESTED


@pytest.mark.parametrize("like_grpcio", [False, True])
async def test_a_key_update_the_peer_asks_for_is_answered_in_order(
    pki: Pki, probe: Probe, like_grpcio: bool
) -> None:
    """TLS 1.3: a client's KeyUpdate asking for ours, read by the reader's own socket-then-TLS
    read, is answered before the next record under the old keys could follow it: calls
    answered by the reader itself, and by call tasks, go on on that connection."""
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Size", "warm")
            assert (await raw.trailers(first))["grpc-status"] == "0"
            for round_ in range(3):
                _request_key_update(raw.stream)
                stream_id = await raw.request("Now", f"k{round_}", like_grpcio=like_grpcio)
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                stream_id = await raw.request("Size", "abc")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            data = b"".join(e.data for e in raw.events if isinstance(e, h2.events.DataReceived))
            assert grpc_frame("now-k2") in data
    assert run.server.stats.calls[NOW_METHOD, "OK"] == 3


async def test_errors_answered_now_are_the_statuses_a_call_task_sends(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status errors, exception groups, a bug (UNKNOWN, logged, no detail) and a request that
    cannot be parsed, answered by the reader as `_status_for` maps them for call tasks."""
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:
            assert await client.call("Now", "warm") == "now-warm"
            with counting_calls(monkeypatch) as (tasks, streams):
                assert await client.status("Now", "fail:notfound:no job 7") == (
                    grpc.StatusCode.NOT_FOUND,
                    "no job 7",
                )
                assert await client.status("Now", "fail:group:not yours") == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not yours",
                )
                caplog.clear()
                assert await client.status("Now", "fail:bug:password") == (
                    grpc.StatusCode.UNKNOWN,
                    "internal error",
                )
        assert "secret detail password" in caplog.text  # logged for the operator only
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Size", "warm")
            assert (await raw.trailers(first))["grpc-status"] == "0"
            with counting_calls(monkeypatch) as (raw_tasks, raw_streams):
                broken = struct.pack(">?I", False, 2) + b"\x0a\x05"  # a string field cut short
                stream_id = await raw.request("Now", payload=broken)
                trailers = await raw.trailers(stream_id)
            assert trailers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
            assert trailers["grpc-message"] == "request message cannot be parsed"
    # grpcio may split a request over two reads: only the raw client's is sure to be whole
    assert (raw_tasks.spawned, raw_streams) == (0, [])
    assert tasks.spawned <= 3
    assert run.server.stats.calls[NOW_METHOD, "NOT_FOUND"] == 1
    assert run.server.stats.calls[NOW_METHOD, "UNKNOWN"] == 1
    assert run.server.stats.calls[NOW_METHOD, "INVALID_ARGUMENT"] == 1
    assert probe.paths.count("handler") == tasks.spawned


@pytest.mark.parametrize(
    ("settings", "limits", "paths", "tasks"),
    [
        # no window at all: the answer is not even made; the call is today's call task
        ({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}, None, ["handler", "now"], 1),
        # a window smaller than the answer: made now, sent by a call task as the window opens
        ({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8}, None, ["now"], 1),
        # a full outbound queue (here: a queue of a few bytes)
        (None, TransportLimits(max_outbound_queued_bytes=16), ["handler", "now"], 1),
    ],
    ids=["no-window", "small-window", "no-queue-room"],
)
async def test_an_answer_that_cannot_be_sent_at_once_goes_the_call_tasks_way(
    pki: Pki,
    probe: Probe,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[int, int] | None,
    limits: TransportLimits | None,
    paths: list[str],
    tasks: int,
) -> None:
    """The reader never waits for flow control or queue room: such a call gets a call task
    (and the answer, its audit line and its statistics exactly once)."""
    caplog.set_level(logging.INFO, "jobd.audit")
    async with running(pki, probe, limits) as run:
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:

            async def call(method: str, value: str) -> int:
                stream_id = await raw.request(method, value)
                await trio.testing.wait_all_tasks_blocked()  # the server waits for a window
                raw.h2.increment_flow_control_window(1024, stream_id=stream_id)
                await raw.flush()
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
                return stream_id

            await call("Size", "warm")  # the SETTINGS exchange is over after it
            with counting_calls(monkeypatch) as (spawned, streams):
                stream_id = await call("Now", "a-longer-answer")
            data = b"".join(
                e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
            )
            assert data == grpc_frame("now-a-longer-answer")
        assert (spawned.spawned, streams) == (tasks, [stream_id])
        assert probe.paths == paths
        assert run.server.stats.calls[NOW_METHOD, "OK"] == 1
        assert run.server.calls_by_user == {}
    assert _audit_messages(caplog) == ["probe-now value=a-longer-answer"]


async def test_calls_not_answered_now_are_todays_calls(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer not ready now (None), a deadline already past, a request reset in the same
    read, and the calls of a draining connection: each goes the call task's way (or none)."""
    caplog.set_level(logging.INFO, "jobd.audit")
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            first = await raw.request("Size", "warm")
            assert (await raw.trailers(first))["grpc-status"] == "0"
            with counting_calls(monkeypatch) as (tasks, _):
                later = await raw.request("Now", "later")
                assert (await raw.trailers(later))["grpc-status"] == "0"
                assert probe.paths == ["handler"]
                # a deadline already past: DEADLINE_EXCEEDED, the answer never made
                late = await raw.request("Now", "late", extra=[("grpc-timeout", "0n")])
                trailers = await raw.trailers(late)
                assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
                assert probe.paths == ["handler"]
                # reset by the client in the same read: never answered, the connection lives
                reset = await raw.request("Now", "reset", then_reset=True)
                again = await raw.request("Now", "again")
                assert (await raw.trailers(again))["grpc-status"] == "0"
                assert not any(
                    of(h2.events.ResponseReceived, reset)(e) for e in raw.events
                )
            assert tasks.spawned == 3  # later, late and reset
            assert probe.paths == ["handler", "now"]
            assert run.server.stats.calls[NOW_METHOD, "DEADLINE_EXCEEDED"] == 1
            # draining: GOAWAY sent, the call already open is served by a call task
            with counting_calls(monkeypatch) as (tasks, _):
                last = await raw.request("Now", "last")
                run.server.shutdown(grace=5)
                assert (await raw.trailers(last))["grpc-status"] == "0"
            await run.stopped.wait()
    assert _audit_messages(caplog) == ["probe-now value=again", "probe-now value=last"]


async def test_audit_line_of_a_call_ended_by_shutdown_is_written(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "jobd.audit")
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.status, "Audited", "block")
                await probe.started.wait()
                run.server.shutdown(grace=0)
                with trio.fail_after(30):
                    await run.stopped.wait()
            assert _audit_messages(caplog) == ["probe value=block"]


# --------------------------------------------------------------------------------------------
# Row 3 and 4: what handlers raise
# --------------------------------------------------------------------------------------------


async def test_status_errors_reach_the_client_as_raised(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:
            assert await client.status("Fail", "notfound:no such job: 42") == (
                grpc.StatusCode.NOT_FOUND,
                "no such job: 42",
            )
            # a handler's own nursery wraps what it raised
            assert await client.status("Fail", "group:not yours") == (
                grpc.StatusCode.PERMISSION_DENIED,
                "not yours",
            )
            assert (await client.status("Nope"))[0] == grpc.StatusCode.UNIMPLEMENTED


async def test_unexpected_exception_is_logged_and_answered_unknown_without_details(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:
            code, details = await client.status("Fail", "boom:/etc/shadow")
            assert (code, details) == (grpc.StatusCode.UNKNOWN, "internal error")
            assert await client.call("Whoami") == "alice|user"  # the connection is fine
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR and "test.Echo/Fail" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_base_exceptions_from_handlers_are_never_swallowed(pki: Pki, probe: Probe) -> None:
    with pytest.RaisesGroup(Fatal, flatten_subgroups=True):
        async with running(pki, probe) as run:
            with grpc_client(run.server.port, pki) as client:
                code, _ = await client.status("Fail", "fatal")
                # The server died with it instead of answering as if it were an error.
                assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
                await trio.sleep_forever()  # until the server's failure cancels us


# --------------------------------------------------------------------------------------------
# Row 5: grpc-message encoding
# --------------------------------------------------------------------------------------------


def test_percent_encoding_is_exactly_the_specs() -> None:
    assert percent_encode_grpc_message("job 4: not found") == "job 4: not found"
    assert percent_encode_grpc_message("100% ü\n") == "100%25 %C3%BC%0A"
    assert percent_encode_grpc_message("".join(map(chr, range(0x20, 0x7F)))) == "".join(
        "%25" if c == "%" else c for c in map(chr, range(0x20, 0x7F))
    )


async def test_status_message_goes_out_percent_encoded_only_where_required(
    pki: Pki, probe: Probe
) -> None:
    message = "bad: job_id=x/y (100%) ünïcode ✓"
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            stream_id = await raw.request("Fail", f"invalid:{message}")
            trailers = await raw.trailers(stream_id)
            assert trailers["grpc-status"] == "3"
            assert trailers["grpc-message"] == (
                "bad: job_id=x/y (100%25) %C3%BCn%C3%AFcode %E2%9C%93"
            )
        with grpc_client(run.server.port, pki) as client:
            assert await client.status("Fail", f"invalid:{message}") == (
                grpc.StatusCode.INVALID_ARGUMENT,
                message,
            )


# --------------------------------------------------------------------------------------------
# Row 6: client cancellation
# --------------------------------------------------------------------------------------------


async def test_client_cancel_cancels_the_handler_and_the_connection_lives_on(
    pki: Pki, probe: Probe
) -> None:
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:

            def cancel_after_first() -> str:
                call = client.streaming("Stream")(StringValue(value="1:10:block"), timeout=30)
                first = next(call)
                call.cancel()  # RST_STREAM(CANCEL)
                return str(first.value)

            assert await trio.to_thread.run_sync(cancel_after_first) == "x" * 10
            with trio.fail_after(10):
                await probe.cancelled.wait()
            assert await client.call("Whoami") == "alice|user"
            assert run.server.connection_count == 1


async def test_reset_cancels_a_handler_blocked_on_flow_control(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        # A zero stream window: the handler's first message can never be sent, so it is not
        # even asked for (issue 9: an unread stream holds no message).
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            stream_id = await raw.request("Stream", "5:100")
            await raw.until(of(h2.events.ResponseReceived, stream_id))
            await trio.testing.wait_all_tasks_blocked()
            assert probe.produced == 0 and run.server.calls_by_user["alice"] == 1
            raw.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            raw.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
            await raw.flush()
            # same connection, next call: the reset was read before it
            stream_id = await raw.request("Whoami")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            await trio.testing.wait_all_tasks_blocked()
            assert not run.server.calls_by_user  # the handler's task has ended
            assert probe.produced == 0


# --------------------------------------------------------------------------------------------
# Row 7: deadlines
# --------------------------------------------------------------------------------------------


async def test_client_deadline_is_enforced_by_the_server(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        # raw h2, so that nothing but the server can end the call
        async with RawClient.open(run.server.port, pki) as raw:
            stream_id = await raw.request("Block", extra=[("grpc-timeout", "20m")])
            trailers = await raw.trailers(stream_id)
            assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
            assert probe.cancelled.is_set()


async def test_server_maximum_bounds_calls_without_a_deadline(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe, TransportLimits(max_deadline=0.02)) as run:
        with grpc_client(run.server.port, pki) as client:
            code, _ = await client.status("Block", grpc_timeout=None)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert probe.cancelled.is_set()


# --------------------------------------------------------------------------------------------
# Row 8: outbound backpressure
# --------------------------------------------------------------------------------------------


async def test_a_client_that_never_reads_cannot_make_the_server_buffer(
    pki: Pki, probe: Probe
) -> None:
    cap = 256 * 1024
    limits = TransportLimits(max_outbound_queued_bytes=cap)
    count, size = 1000, 64 * 1024  # 64 MiB: far more than socket buffers and the cap
    async with running(pki, probe, limits) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BIG}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(BIG - 65535)
            await raw.request("Stream", f"{count}:{size}")
            # Returns at all only because the handler yields (purerpc's starved the loop).
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < probe.produced < count  # blocked, not finished
            assert run.server.outbound_queued_bytes <= cap + size + 1024
            await trio.aclose_forcefully(raw.stream)
            with trio.fail_after(10):
                await probe.cancelled.wait()


async def test_replays_on_a_connection_that_reads_nothing_hold_its_cap_not_a_message_each(
    pki: Pki, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streaming call whose handler reports its waits (the Output handler) counts the message
    it has reserved against its connection's room while it makes it: 20 replays on a
    connection that reads nothing hold the queue's cap and about a message, in the queue and
    reserved, at any time. Before (issue 12, fan-out), a call was taken to be waiting all the
    while its handler made its message, so the others reserved meanwhile: at first every call
    held a message queued and one reserved (here 2.4 MiB)."""
    peak = 0
    take = OutboundBudget.take

    def take_and_watch(self: OutboundBudget, user: str, size: int) -> None:
        nonlocal peak
        take(self, user, size)
        peak = max(peak, self.used)

    monkeypatch.setattr(OutboundBudget, "take", take_and_watch)
    cap = 256 * 1024
    limits = TransportLimits(max_outbound_queued_bytes=cap)
    async with running(pki, probe, limits) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BIG}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(BIG - 65535)
            flush = raw.flush
            raw.flush = trio.lowlevel.checkpoint  # type: ignore[method-assign]
            for _ in range(20):  # in one write: the calls start together
                await raw.request("Stream", "replay:1000:60000")  # 1.2 GB: more than buffers
            raw.flush = flush  # type: ignore[method-assign]
            await raw.flush()
            await trio.testing.wait_all_tasks_blocked()  # the socket is full, every call waits
            assert 0 < probe.produced < 20 * 1000
            message = SMALL_MESSAGE + MESSAGE_FRAMING
            assert peak <= cap + 2 * message + 16 * 1024, peak  # and frame headers
            await trio.aclose_forcefully(raw.stream)


async def test_a_replay_waiting_for_more_does_not_hold_its_connections_room(
    pki: Pki, probe: Probe
) -> None:
    """While such a handler says it waits (a follow waiting for new output), its reserved
    message does not count against its connection's room: other calls on the connection are
    served. Here the cap is below one message, so a call reserves only on an idle connection:
    without the report, the five waiting calls would keep the connection from ever being
    idle again."""
    limits = TransportLimits(max_outbound_queued_bytes=SMALL_MESSAGE)
    async with running(pki, probe, limits) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            waiting = [await raw.request("Stream", "replay:1:10:wait") for _ in range(5)]
            for stream_id in waiting:
                await raw.until(of(h2.events.DataReceived, stream_id))
            await trio.testing.wait_all_tasks_blocked()
            assert probe.produced == 5
            stream_id = await raw.request("Stream", "3:10")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            assert [m.value for m in grpc_messages(raw, stream_id)] == ["x" * 10] * 3
            await trio.aclose_forcefully(raw.stream)


async def test_a_client_that_floods_pings_and_never_reads_cannot_either(
    pki: Pki, probe: Probe
) -> None:
    cap = 64 * 1024
    limits = TransportLimits(max_outbound_queued_bytes=cap)
    ping = struct.pack(">I", 8)[1:] + bytes([0x6, 0, 0, 0, 0, 0]) + b"12345678"
    async with running(pki, probe, limits) as run:
        async with RawClient.open(run.server.port, pki) as raw, trio.open_nursery() as nursery:

            async def flood() -> None:  # h2 acknowledges every PING: 17 bytes out per 17 in
                for _ in range(500):  # 34 MB: far more than socket buffers hold
                    await raw.stream.send_all(ping * 4096)

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()  # the server stopped reading, so we block
            assert 0 < run.server.outbound_queued_bytes <= 4 * cap + 64 * 1024
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# Row 9: limits
# --------------------------------------------------------------------------------------------


async def test_oversized_request_fails_alone_with_resource_exhausted(
    pki: Pki, probe: Probe
) -> None:
    limit = 64 * 1024
    async with running(pki, probe, TransportLimits(max_message_bytes=limit)) as run:
        with grpc_client(run.server.port, pki) as client:
            blocked = client.unary("Block").future(StringValue(), 30)  # in flight meanwhile
            await probe.started.wait()
            code, details = await client.status("Size", "x" * (limit + 1))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert str(limit) in details
            assert await client.call("Size", "x" * (limit - 16)) == str(limit - 16)
            probe.release.set()
            assert (await trio.to_thread.run_sync(blocked.result)).value == "released"
            assert run.server.connection_count == 1


async def test_settings_cap_concurrent_streams_and_windows(pki: Pki, probe: Probe) -> None:
    limits = TransportLimits(max_concurrent_streams=7, max_message_bytes=100_000)
    async with running(pki, probe, limits) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            event = await raw.until(of(h2.events.RemoteSettingsChanged))
            codes = h2.settings.SettingCodes
            changed = event.changed_settings
            assert changed[codes.MAX_CONCURRENT_STREAMS].new_value == 7
            assert changed[codes.INITIAL_WINDOW_SIZE].new_value == 100_005
            update = await raw.until(of(h2.events.WindowUpdated, 0))
            assert 65535 + update.delta == limits.connection_window_bytes


async def test_concurrent_calls_beyond_the_stream_cap_wait(pki: Pki, probe: Probe) -> None:
    limits = TransportLimits(max_concurrent_streams=2)
    async with running(pki, probe, limits) as run:
        with grpc_client(run.server.port, pki) as client:
            block = client.unary("Block")
            futures = [block.future(StringValue(), 30) for _ in range(5)]
            await probe.started.wait()
            probe.release.set()
            results = await trio.to_thread.run_sync(lambda: [f.result().value for f in futures])
            assert results == ["released"] * 5
            assert probe.max_active <= 2


async def test_connections_beyond_the_cap_are_refused_with_a_status(
    pki: Pki, probe: Probe
) -> None:
    # Established connections past the cap get RESOURCE_EXHAUSTED for their call, then GOAWAY
    # and close: a client sees why, instead of a dropped connection it would retry at once.
    async with running(pki, probe, TransportLimits(max_connections=1)) as run:
        port = run.server.port
        async with RawClient.open(port, pki) as first:
            stream_id = await first.request("Whoami")
            assert (await first.trailers(stream_id))["grpc-status"] == "0"
            async with RawClient.open(port, pki, "bob") as second:
                refused = await second.trailers(await second.request("Whoami"))
                assert refused["grpc-status"] == "8", refused
                assert "connections open" in refused["grpc-message"]
                await second.until(of(h2.events.ConnectionTerminated))
            stream_id = await first.request("Whoami")
            assert (await first.trailers(stream_id))["grpc-status"] == "0"
        await trio.testing.wait_all_tasks_blocked()
        assert run.server.connection_count == 0
        async with RawClient.open(port, pki, "bob") as third:
            stream_id = await third.request("Whoami")
            assert (await third.trailers(stream_id))["grpc-status"] == "0"


async def test_idle_connection_gets_goaway_and_is_closed(
    pki: Pki, probe: Probe, mock_clock: trio.testing.MockClock
) -> None:
    # The clock stands still while real I/O sets up the connection; then only time passes.
    async with running(pki, probe, TransportLimits(idle_timeout=10)) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            stream_id = await raw.request("Whoami")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            await trio.testing.wait_all_tasks_blocked()
            assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in raw.events)
            mock_clock.jump(10)
            goaway = await raw.until(of(h2.events.ConnectionTerminated))
            assert (goaway.error_code, goaway.last_stream_id) == (0, stream_id)
            await raw.read_to_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert run.server.connection_count == 0


# --------------------------------------------------------------------------------------------
# Row 10: graceful shutdown
# --------------------------------------------------------------------------------------------


async def test_shutdown_stops_accepting_and_lets_open_calls_finish(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        port = run.server.port
        async with RawClient.open(port, pki) as raw:
            first = await raw.request("Block")
            await probe.started.wait()
            run.server.shutdown(grace=60)
            goaway = await raw.until(of(h2.events.ConnectionTerminated))
            assert (goaway.error_code, goaway.last_stream_id) == (0, first)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            # a stream opened after the GOAWAY is refused (safe for the client to retry)
            late = await raw.request("Whoami")
            reset = await raw.until(of(h2.events.StreamReset, late))
            assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            probe.release.set()
            trailers = await raw.trailers(first)
            assert trailers["grpc-status"] == "0"
            await raw.read_to_eof()
        with trio.fail_after(10):
            await run.stopped.wait()


async def test_calls_still_open_after_the_grace_period_end_unavailable(
    pki: Pki, probe: Probe
) -> None:
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki) as client:
            async with trio.open_nursery() as nursery:

                async def shut_down_once_blocked() -> None:
                    await probe.started.wait()
                    run.server.shutdown(grace=0)

                nursery.start_soon(shut_down_once_blocked)
                code, details = await client.status("Block", grpc_timeout=30)
            assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            assert probe.cancelled.is_set()
        with trio.fail_after(10):
            await run.stopped.wait()


def grpc_messages(raw: RawClient, stream_id: int) -> list[StringValue]:
    data = b"".join(
        e.data
        for e in raw.events
        if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
    )
    messages, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at + 1 : at + 5], "big")
        messages.append(StringValue.FromString(data[at + 5 : at + 5 + length]))
        at += 5 + length
    return messages


@pytest.mark.parametrize(
    ("reads", "share"),
    [(True, 8 * LARGE_MESSAGE), (False, 8 * LARGE_MESSAGE), (True, LARGE_MESSAGE)],
    ids=["reads", "never acknowledges", "reads, share too small"],
)
async def test_message_size_follows_what_the_peer_reads_and_its_window(
    pki: Pki, probe: Probe, reads: bool, share: int
) -> None:
    """A stream's first message, and every one to a peer that never sent a WINDOW_UPDATE for
    it, may carry SMALL_MESSAGE; once it has, up to LARGE_MESSAGE if the user's share of the
    outbound budget has room for it; never more than the window has room for."""
    window = 8 * LARGE_MESSAGE
    async with running(pki, probe, TransportLimits(max_outbound_bytes_per_user=share)) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(8 * window)  # the connection's window
            await raw.flush()
            stream_id = await raw.request("Stream", "limits:3")
            await raw.until(of(h2.events.DataReceived, stream_id))
            if reads:  # (h2 itself would only once half the window was read)
                raw.h2.increment_flow_control_window(1024, stream_id=stream_id)
                await raw.flush()
            await trio.testing.wait_all_tasks_blocked()  # the server has read what we sent
            probe.release.set()
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            limits = [int(m.value) for m in grpc_messages(raw, stream_id)]
            # (The second was reserved as soon as the first was queued: before the update.)
            large = reads and share >= LARGE_MESSAGE + MESSAGE_FRAMING
            big = LARGE_MESSAGE if large else SMALL_MESSAGE
            assert limits == [SMALL_MESSAGE, SMALL_MESSAGE, big]
            # A window of 10,000 bytes: a message that fits it.
            raw.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10_000})
            await raw.flush()
            stream_id = await raw.request("Stream", "limits:1")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
            assert [int(m.value) for m in grpc_messages(raw, stream_id)] == [
                10_000 - MESSAGE_FRAMING
            ]


async def test_messages_queued_behind_a_busy_socket_go_out_in_one_write(
    pki: Pki, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small messages (under 128 KiB) queued while the socket is busy are joined into one TLS
    write of up to 256 KiB (issue 12, fan-out: each body written alone cost two TLS writes and
    sends per 64 KiB message), and arrive whole and in order. Before, every piece of 16 KiB or
    more (here each 16 KiB DATA frame's payload) was written alone."""
    gate = trio.Event()
    sizes: list[int] = []
    send = TrioByteStream.send
    marker = b"x" * 1000

    async def gated_send(self: TrioByteStream, item: bytes | memoryview) -> None:
        if marker in bytes(item):
            sizes.append(len(item))
            if not gate.is_set():
                await gate.wait()  # the first message's write: the others queue behind it
        await send(self, item)

    async def open_gate_once_all_wait() -> None:
        await trio.testing.wait_all_tasks_blocked()
        gate.set()

    monkeypatch.setattr(TrioByteStream, "send", gated_send)
    window = 1024 * 1024
    async with running(pki, probe) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(window)  # the connection's window
            await raw.flush()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_gate_once_all_wait)
                stream_id = await raw.request("Stream", "5:30000")
                assert (await raw.trailers(stream_id))["grpc-status"] == "0"
    assert [m.value for m in grpc_messages(raw, stream_id)] == ["x" * 30000] * 5
    # The first write holds what was queued when the writer woke (message 1, maybe 2); all
    # that queued behind it went out in one write. Before, every 16 KiB DATA payload went
    # alone: ten writes or more.
    assert len(sizes) == 2 and sum(sizes) > 5 * 30000 and max(sizes) <= 256 * 1024, sizes


async def test_a_large_message_leaves_in_one_socket_send(
    pki: Pki, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message of about 1 MiB to a peer whose frame size and windows take it goes out as one
    DATA frame, its frame header and body encrypted together and handed to the socket in one
    send, the body uncopied (issue 12, round 6: at 256 KiB per turn it took four frames, each
    a TLS write and send of its 9-byte header and another of its body: eight)."""
    writes: list[int] = []
    send = TrioByteStream.send
    send_pair = getattr(TrioByteStream, "send_pair", None)  # (so that it fails, not errs, before)

    async def counted_send(self: TrioByteStream, item: bytes | memoryview) -> None:
        writes.append(len(item))
        await send(self, item)

    async def counted_pair(
        self: TrioByteStream, head: bytes | memoryview, body: bytes | memoryview
    ) -> None:
        writes.append(len(head) + len(body))
        assert send_pair is not None
        await send_pair(self, head, body)

    monkeypatch.setattr(TrioByteStream, "send", counted_send)
    monkeypatch.setattr(TrioByteStream, "send_pair", counted_pair, raising=False)
    size = 1000 * 1024
    window = 8 * 1024 * 1024
    async with running(pki, probe) as run:
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: window,
        }
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.h2.increment_flow_control_window(window)  # the connection's window
            await raw.flush()
            await trio.testing.wait_all_tasks_blocked()
            writes.clear()
            stream_id = await raw.request("Stream", f"1:{size}")
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
    assert [m.value for m in grpc_messages(raw, stream_id)] == ["x" * size]
    # One write holds the message, and its frame header (9 bytes) and gRPC prefix (5) with it.
    [big] = [w for w in writes if w >= size]
    assert big >= size + 9 + 5, writes


async def test_streaming_call_cut_by_shutdown_gets_a_status(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            stream_id = await raw.request("Stream", "2:10:block")
            await raw.until(of(h2.events.DataReceived, stream_id))
            run.server.shutdown(grace=0)
            trailers = await raw.trailers(stream_id)
            assert trailers["grpc-status"] == "14"
            await raw.read_to_eof()
        with trio.fail_after(10):
            await run.stopped.wait()


async def test_call_cut_mid_message_is_reset_not_given_trailers(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}
        async with RawClient.open(run.server.port, pki, settings=settings) as raw:
            raw.acknowledge = False  # the handler stalls after 100 bytes of a 1000-byte message
            stream_id = await raw.request("Stream", "1:1000")
            await raw.until(of(h2.events.DataReceived, stream_id))
            await trio.testing.wait_all_tasks_blocked()
            run.server.shutdown(grace=0)
            reset = await raw.until(of(h2.events.StreamReset, stream_id))
            assert reset.error_code == h2.errors.ErrorCodes.CANCEL
            assert not any(isinstance(e, h2.events.TrailersReceived) for e in raw.events)
            await raw.read_to_eof()
        with trio.fail_after(10):
            await run.stopped.wait()


def test_goaway_frame_is_what_h2_parses() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    [event] = [e for e in client.receive_data(goaway_frame(7, 0)) if isinstance(e, h2.events.Event)]
    assert isinstance(event, h2.events.ConnectionTerminated)
    assert (event.last_stream_id, event.error_code) == (7, 0)


# --------------------------------------------------------------------------------------------
# TLS and identity refusals
# --------------------------------------------------------------------------------------------


def test_server_context_is_tls13_mutual_h2(pki: Pki) -> None:
    context = pki.server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED


async def refused(port: int, context: ssl.SSLContext) -> None:
    """The server must not speak h2 to this client: the handshake or the first read fails."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
            await stream.send_all(PREFACE)
            assert await stream.receive_some() == b""  # TLS 1.3: the alert may come late
            raise trio.BrokenResourceError
    finally:
        await trio.aclose_forcefully(stream)


async def test_tls12_client_is_refused(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        await refused(
            run.server.port, pki.client_context("alice", maximum_version=ssl.TLSVersion.TLSv1_2)
        )


async def test_client_without_certificate_is_refused(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        await refused(run.server.port, pki.client_context(None))


async def test_certificate_from_another_ca_is_refused(pki: Pki, probe: Probe) -> None:
    async with running(pki, probe) as run:
        await refused(run.server.port, pki.client_context("stranger"))
        assert not probe.started.is_set()


async def test_plaintext_client_is_dropped(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(pki, probe) as run:
        stream = await trio.open_tcp_stream("127.0.0.1", run.server.port)
        try:
            await stream.send_all(PREFACE)
            received = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some():
                    received += chunk
            assert not received.startswith(b"\x00")  # no h2 frame, at most a TLS alert
        finally:
            await stream.aclose()
        with grpc_client(run.server.port, pki) as client:
            assert await client.call("Whoami") == "alice|user"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_certificate_without_cn_is_unauthenticated_not_dropped(
    pki: Pki, probe: Probe
) -> None:
    async with running(pki, probe) as run:
        with grpc_client(run.server.port, pki, "nocn") as client:
            expected = (grpc.StatusCode.UNAUTHENTICATED, "client certificate has no subject CN")
            assert await client.status("Whoami") == expected
            assert await client.status("Block") == expected
            assert run.server.connection_count == 1
            assert not probe.started.is_set()


def subject(*pairs: tuple[str, str]) -> dict[str, Any]:
    """A certificate as `SSLObject.getpeercert()` gives it, one RDN per pair."""
    return {"subject": tuple(((key, value),) for key, value in pairs)}


OU, CN = "organizationalUnitName", "commonName"


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        (subject((CN, "alice")), Identity("alice", frozenset())),
        (
            subject((OU, "admin"), (OU, "ops"), (CN, "root")),
            Identity("root", frozenset({"admin", "ops"})),
        ),
        (subject((OU, "user"), (CN, "")), "client certificate has no subject CN"),
        (subject((OU, "admin")), "client certificate has no subject CN"),
        (subject((CN, "a"), (CN, "b")), "client certificate has more than one subject CN"),
    ],
)
def test_identity_from_certificate_subject(cert: dict[str, Any], expected: Any) -> None:
    if isinstance(expected, Identity):
        assert _identity_from_peer_cert(cert) == expected
    else:
        with pytest.raises(UnauthenticatedError) as refused:
            _identity_from_peer_cert(cert)
        assert refused.value.status.status_message == expected


def test_identity_is_a_frozen_value() -> None:
    identity = Identity("alice", frozenset({"user"}))
    with pytest.raises(AttributeError):
        identity.user = "bob"  # type: ignore[misc]
    assert identity == Identity("alice", frozenset({"user"}))


def test_a_repeated_block_of_indexed_fields_is_decoded_as_the_table_says() -> None:
    """The decoder remembers blocks of indexed fields only (issue 12), and forgets them as soon
    as a block may have changed the dynamic table: the same bytes then decode as the table
    now says."""
    decoder = _Decoder()
    reference = hpack.Decoder()
    encoder = hpack.Encoder()
    blocks = [
        encoder.encode([("x-a", "1")]),  # a literal: now dynamic index 62
        b"\xbe",  # index 62: x-a: 1
        b"\xbe",  # the same, remembered
        encoder.encode([("x-b", "2")]),  # now x-b is 62, x-a 63
        b"\xbe",  # x-b: 2, not what was remembered
        b"\xbf",
    ]
    assert [decoder.decode(b, raw=True) for b in blocks] == [
        reference.decode(b, raw=True) for b in blocks
    ]
    assert decoder.decode(b"\xbe", raw=True) == [(b"x-b", b"2")]
    assert len(decoder._blocks) == 2


class _EndedJobs:
    """JobService's engine for Status: one ended job of alice's."""

    def __init__(self) -> None:
        self.job = engine.JobInfo(
            id="5e1c2d9a-7c6f-4a3e-9a52-0d3f1b2c4e6a",
            owner="alice",
            command=("true",),
            state=engine.State.EXITED,
            started_at=1_700_000_000.0,
            ended_at=1_700_000_001.5,
            reason=engine.EndReason.EXIT,
        )

    def status(self, job_id: str) -> engine.JobInfo:
        if job_id != self.job.id:
            raise engine.NotFound(f"no job {job_id}")
        return self.job


async def test_status_of_an_ended_job_is_answered_by_the_reader(
    pki: Pki, probe: Probe, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JobService.Status is answered without a call task, with its authorization (the owner
    and an admin see the job, anyone else NOT_FOUND as for a missing job), its cached message
    and its audit lines."""
    caplog.set_level(logging.INFO, "jobd.audit")
    jobs = _EndedJobs()
    service = JobService(jobs)  # type: ignore[arg-type]  # only status() is called
    path = "/jobd.v1.JobService/Status"
    request = pb.JobRequest(id=jobs.job.id).SerializeToString()
    framed = struct.pack(">?I", False, len(request)) + request
    answers: dict[str, tuple[dict[str, str], bytes]] = {}
    async with running(pki, probe, services=[service.service]) as run:
        for who in ("alice", "bob", "admin"):
            async with RawClient.open(run.server.port, pki, who) as raw:
                first = await raw.request(path, payload=framed)  # after it, no more SETTINGS
                await raw.trailers(first)
                with counting_calls(monkeypatch) as (tasks, streams):
                    stream_id = await raw.request(path, payload=framed, like_grpcio=True)
                    trailers = await raw.trailers(stream_id)
                assert (tasks.spawned, streams) == (0, []), who
                data = b"".join(
                    e.data for e in raw.events if of(h2.events.DataReceived, stream_id)(e)
                )
                answers[who] = trailers, data
    for who in ("alice", "admin"):
        trailers, data = answers[who]
        assert trailers["grpc-status"] == "0"
        job = pb.Job.FromString(data[5:])
        assert (job.id, job.owner, job.state, job.exit_code) == (
            jobs.job.id, "alice", pb.State.EXITED, 0
        )  # fmt: skip
    trailers, data = answers["bob"]
    assert data == b""
    assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert trailers["grpc-message"] == f"no job {jobs.job.id}"
    lines = [line.rsplit(" duration_ms=", 1)[0] for line in _audit_messages(caplog)]
    ok = f"rpc user=alice method=Status job={jobs.job.id} code=OK"
    denied = f"rpc user=bob method=Status job={jobs.job.id} code=NOT_FOUND"
    admin = f"rpc user=root method=Status job={jobs.job.id} code=OK"
    assert lines == [ok, ok, denied, denied, admin, admin]
    assert all('denied="not the owner"' in m for m in _audit_messages(caplog) if "bob" in m)
    assert run.server.stats.calls["jobd.v1.JobService/Status", "OK"] == 4
    assert run.server.stats.calls["jobd.v1.JobService/Status", "NOT_FOUND"] == 2


class _FollowedJob(_EndedJobs):
    """JobService's engine for Output: the ended job's one chunk, and what it was given."""

    on_wait: Callable[[bool], None] | None = None

    def read_output(
        self, job_id: str, offset: int = 0, **options: Any
    ) -> AsyncIterator[engine.Chunk]:
        self.on_wait = options["on_wait"]

        async def chunks() -> AsyncIterator[engine.Chunk]:
            yield engine.Chunk(engine.Stream.STDOUT, 0, 1_700_000_000.0, b"hi\n")

        return chunks()


async def test_output_tells_the_transport_when_it_waits_for_new_output(
    pki: Pki, probe: Probe
) -> None:
    """JobService.Output hands the engine's reader the call's `report_waits` function, so
    that its messages count against their connection's room while they are made (issue 12,
    fan-out); the transport honours it (the two tests above)."""
    jobs = _FollowedJob()
    service = JobService(jobs)  # type: ignore[arg-type]  # only status() and read_output()
    request = pb.OutputRequest(id=jobs.job.id, follow=True).SerializeToString()
    framed = struct.pack(">?I", False, len(request)) + request
    async with running(pki, probe, services=[service.service]) as run:
        async with RawClient.open(run.server.port, pki) as raw:
            stream_id = await raw.request("/jobd.v1.JobService/Output", payload=framed)
            assert (await raw.trailers(stream_id))["grpc-status"] == "0"
    assert jobs.on_wait is not None
    assert getattr(jobs.on_wait, "__func__", None) is ServerStream.waiting_for_input
