"""A purerpc client connection to jobd over TLS, with two of purerpc's gaps filled: the
caller bounds the connect, and a connection that ends fails the calls on it (purerpc alone
leaves them waiting forever). The only client module that touches purerpc internals.

    async with open_job_service("127.0.0.1", 9090, ssl_context, connect_timeout=10) as stub:
        job = await stub.Status(pb.JobRequest(id=job_id))
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import purerpc
import trio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from jobd.v1.jobd_grpc import JobServiceStub

__all__ = ["ConnectionLost", "NotGrpcError", "open_job_service"]


class NotGrpcError(Exception):
    """The peer completed TLS but did not agree to speak HTTP/2 (ALPN h2): not a gRPC server."""


class ConnectionLost(Exception):
    """The server closed or reset the connection; answered tells whether it ever sent data
    (if not, it most likely rejected our certificate: TLS 1.3 decides that after the
    handshake, and a trio server sends no alert)."""

    def __init__(self, *, answered: bool, reset: bool, in_handshake: bool = False) -> None:
        super().__init__("connection reset" if reset else "connection closed")
        self.answered = answered
        self.reset = reset
        self.in_handshake = in_handshake


class _Watched:
    """The TLS stream as purerpc reads it, except that its end raises ConnectionLost.

    purerpc's reader task treats the end of the stream as a normal return and the calls
    waiting on the connection wait forever; an exception instead fails the reader's task
    group, which cancels those calls and reports it.
    """

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._answered = False

    def extra(self, attribute: Any, *default: Any) -> Any:
        return self._stream.extra(attribute, *default)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            data = await self._stream.receive(max_bytes)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise self._lost(exc) from exc
        self._answered = True
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self._stream.send(item)
        except anyio.BrokenResourceError as exc:
            raise self._lost(exc) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _lost(self, exc: BaseException) -> ConnectionLost:
        reset = isinstance(exc.__cause__, ConnectionResetError)
        return ConnectionLost(answered=self._answered, reset=reset)


class _H2Connection(h2.connection.H2Connection):  # type: ignore[misc]  # h2 is untyped
    """h2 3.2 closes the whole connection when a GOAWAY arrives, and then refuses the frames
    that follow on the streams the GOAWAY let finish: a call in flight during a server's
    graceful shutdown failed with "Invalid input ConnectionInputs.RECV_DATA in state
    ConnectionState.CLOSED" instead of the status the server sent (UNAVAILABLE "server is
    shutting down"). RFC 7540 6.8: streams up to the GOAWAY's last stream id go on; so the
    state machine stays open, and no new stream is started (`_ClientSocket`)."""

    goaway_received = False

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        self.goaway_received = True
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _ClientSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's client socket on `_H2Connection`."""

    def __init__(self, config: GRPCConfiguration, sock: Any) -> None:
        super().__init__(config, sock)
        connection = self._grpc_connection
        connection.h2_connection = _H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        connection.h2_connection.clear_outbound_data_buffer()
        connection._set_h2_connection_local_settings()

    async def start_request(self, *args: Any, **kwargs: Any) -> Any:
        if self._grpc_connection.h2_connection.goaway_received:
            raise purerpc.UnavailableError("the server is shutting down (it sent GOAWAY)")
        return await super().start_request(*args, **kwargs)


class _Channel:
    """What `purerpc.Client` reads from a channel: the connection and the authority."""

    def __init__(self, host: str, port: int, grpc_socket: Any) -> None:
        self._host = host
        self._port = port
        self._grpc_socket = grpc_socket


@asynccontextmanager
async def open_job_service(
    host: str, port: int, ssl_context: ssl.SSLContext, *, connect_timeout: float
) -> AsyncIterator[JobServiceStub]:
    """Connect (TCP, then the TLS handshake; at most connect_timeout seconds, else
    `trio.TooSlowError`) and yield a JobService stub on the connection.

    The server's certificate is checked against host (anyio passes it as server_hostname).
    """
    try:
        with trio.fail_after(connect_timeout):
            stream = await anyio.connect_tcp(
                host, port, ssl_context=ssl_context, tls=True, tls_standard_compatible=False
            )
    except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        reset = isinstance(exc.__cause__, ConnectionResetError)
        raise ConnectionLost(answered=False, reset=reset, in_handshake=True) from exc
    try:
        if stream.extra(TLSAttribute.alpn_protocol, None) != "h2":
            raise NotGrpcError("it does not speak HTTP/2 (no ALPN h2): is it a jobd server?")
        grpc_socket = _ClientSocket(GRPCConfiguration(client_side=True), _Watched(stream))
        async with grpc_socket:
            yield JobServiceStub(_Channel(host, port, grpc_socket))  # type: ignore[no-untyped-call]
    finally:
        await anyio.aclose_forcefully(stream)
