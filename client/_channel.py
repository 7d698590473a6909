"""A purerpc client connection to jobd over TLS, with two of purerpc's gaps filled: the
caller bounds the connect, and calls waiting on a connection that ended fail instead of
waiting forever. The only client module that touches purerpc internals.

    async with open_job_service("127.0.0.1", 9090, ssl_context, connect_timeout=10) as stub:
        job = await stub.Status(pb.JobRequest(id=job_id))
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import trio
from anyio.streams.tls import TLSAttribute
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from jobd.v1.jobd_grpc import JobServiceStub

__all__ = ["NotGrpcError", "open_job_service"]


class NotGrpcError(Exception):
    """The peer completed TLS but did not agree to speak HTTP/2 (ALPN h2): not a gRPC server."""


class _Socket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's client connection, except that when its reader stops (the peer closed the
    connection, reset it or broke the protocol) every open call ends: each waiting
    `receive_message` raises `anyio.EndOfStream` instead of waiting forever.
    """

    _ended = False

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        finally:
            self._ended = True
            for stream in list(self._streams.values()):
                stream._incoming_events[0].close()

    def _allocate_stream(self, stream_id: int) -> Any:
        stream = super()._allocate_stream(stream_id)
        if self._ended:
            stream._incoming_events[0].close()
        return stream


class _Channel:
    """What `purerpc.Client` reads from a channel: the connection and the authority."""

    def __init__(self, host: str, port: int, grpc_socket: _Socket) -> None:
        self._host = host
        self._port = port
        self._grpc_socket = grpc_socket


@asynccontextmanager
async def open_job_service(
    host: str, port: int, ssl_context: Any, *, connect_timeout: float
) -> AsyncIterator[JobServiceStub]:
    """Connect (TCP, then the TLS handshake; at most connect_timeout seconds, else
    `trio.TooSlowError`) and yield a JobService stub on the connection.

    The server's certificate is checked against host (anyio passes it as server_hostname).
    """
    with trio.fail_after(connect_timeout):
        stream = await anyio.connect_tcp(
            host, port, ssl_context=ssl_context, tls=True, tls_standard_compatible=False
        )
    try:
        if stream.extra(TLSAttribute.alpn_protocol, None) != "h2":
            raise NotGrpcError("it does not speak HTTP/2 (no ALPN h2): is it a jobd server?")
        async with _Socket(GRPCConfiguration(client_side=True), stream) as grpc_socket:
            yield JobServiceStub(_Channel(host, port, grpc_socket))  # type: ignore[no-untyped-call]
    finally:
        await anyio.aclose_forcefully(stream)
