"""A raw HTTP/2 gRPC client over TLS for the hostile-client tests: it sends what grpcio never
would (compressed bombs, malformed headers, thousands of streams it never reads)."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

from .harness import ServerProcess, raw_tls

SERVICE = "/jobd.v1.JobService/"


@dataclass
class Answer:
    headers: dict[str, str] = field(default_factory=dict)
    data: int = 0
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False


class RawH2:
    """One TLS connection speaking h2 by hand. `window`: the stream and connection windows it
    grants the server (None: the RFC default 65,535, which it never replenishes)."""

    def __init__(self, server: ServerProcess, user: str = "alice", window: int | None = None):
        self.tls: ssl.SSLSocket = raw_tls(server, user)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.answers: dict[int, Answer] = {}
        self.terminated = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass

    def request(self, method: str, body: bytes = b"", *, headers: Iterable[tuple[str, str]] = (),
                compressed: bool = False, send: bool = True) -> int:
        """Open a stream calling `method` with one message `body`; the stream id."""
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "https"), (":path", SERVICE + method),
            (":authority", "localhost"), ("te", "trailers"),
            ("content-type", "application/grpc"), *headers,
        ])
        self.answers[stream_id] = Answer()
        self.send_body(stream_id, struct.pack(">?I", compressed, len(body)) + body)
        if send:
            self.flush()
        return stream_id

    def send_body(self, stream_id: int, payload: bytes) -> None:
        """All of `payload`, then END_STREAM, waiting for the server's windows as needed."""
        view = memoryview(payload)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self.flush()
                self.read_once()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
        self.conn.end_stream(stream_id)

    def read_once(self, timeout: float = 30.0, ack: bool = True) -> None:
        self.tls.settimeout(timeout)
        try:
            data = self.tls.recv(65536)
        except (ConnectionError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.terminated = True
            raise EOFError("the server closed the connection")
        for event in self.conn.receive_data(data):
            stream_id = getattr(event, "stream_id", 0)
            answer = self.answers.get(stream_id)
            if isinstance(event, h2.events.DataReceived):
                if ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if answer is not None:
                    answer.data += len(event.data)
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                if answer is not None:
                    answer.headers.update(dict(event.headers))
            elif isinstance(event, h2.events.StreamEnded) and answer is not None:
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = event.error_code
                answer.ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = True
        self.flush()

    def until(self, condition: Callable[[], bool], timeout: float = 30.0, ack: bool = True
              ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting on the server"
            self.read_once(max(deadline - time.monotonic(), 0.01), ack=ack)

    def answer(self, stream_id: int, timeout: float = 30.0) -> Answer:
        """Read until the stream has ended (status or reset); its answer."""
        self.until(lambda: self.answers[stream_id].ended, timeout)
        return self.answers[stream_id]


def silent_tcp(port: int) -> socket.socket:
    """A TCP connection that never sends a byte (no TLS, no certificate)."""
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def server_sockets_read_everything(server: ServerProcess) -> bool:
    """No bytes wait unread in any of the server's TCP sockets (rx_queue 0): it has taken in
    every request the test sent."""
    from ..e2e import tcp_sockets

    return all(int(fields[4].split(":")[1], 16) == 0 for fields in tcp_sockets(server.pid))


def status_of(answer: Answer) -> str | None:
    return answer.headers.get("grpc-status")


def grpc_message(answer: Answer) -> str:
    from urllib.parse import unquote

    return unquote(answer.headers.get("grpc-message", ""))
