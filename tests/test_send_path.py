"""The server's fast paths produce exactly what the slow ones did: hand-framed OutputChunk
messages, HPACK blocks encoded once, and cached Job messages of ended jobs (issue 12). The
end-to-end tests (real grpcio and purerpc clients) cover them on the wire; these pin the bytes."""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys

import h2.config
import h2.connection
import h2.exceptions
import h2.stream
import hpack  # type: ignore[import-untyped]  # h2's own HPACK library
import pytest
from purerpc.grpclib.connection import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.headers import HeaderDict
from purerpc.grpclib.status import Status, StatusCode

from jobd import engine
from jobd.server import _grpc_stream
from jobd.server._grpc_stream import FramedMessage
from jobd.server._service import _EndedJobMessages, _output_message, job_to_pb
from jobd.v1 import jobd_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 65536, 1024 * 1024, 3 * 1024 * 1024 + 7])
def test_framed_output_chunk_parses_as_the_protobuf_message(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunk = engine.Chunk(engine.Stream.STDERR, 12345678901, 1764582000.25, data)
    framed = _output_message(chunk)
    assert framed.body is data  # sent as it is, never copied into the message
    parsed = pb.OutputChunk.FromString(framed.SerializeToString())
    expected = pb.OutputChunk(data=data, stream=pb.STDERR, offset=12345678901)
    expected.time.FromNanoseconds(int(1764582000.25 * 1e9))
    assert parsed == expected


def test_constant_header_blocks_decode_to_our_headers_and_leave_hpack_state_alone() -> None:
    decoder = hpack.Decoder()
    assert decoder.decode(_grpc_stream._RESPONSE_START_BLOCK) == [
        (":status", "200"),
        ("content-type", "application/grpc+proto"),
        ("grpc-accept-encoding", _grpc_stream.ACCEPT_ENCODING),
    ]
    assert decoder.decode(_grpc_stream._OK_TRAILERS_BLOCK) == [("grpc-status", "0")]
    # Nothing was added to the peer's dynamic table: the blocks can be sent on every call.
    assert len(decoder.header_table.dynamic_entries) == 0


def _jobd_server(max_concurrent_streams: int) -> _grpc_stream._ServerConnection:
    """jobd's server connection as the transport configures it, its preamble queued."""
    config = GRPCConfiguration(
        client_side=False,
        max_message_length=4 * 1024 * 1024,
        message_accept_encoding=[_grpc_stream.ACCEPT_ENCODING],
    )
    server = _grpc_stream._ServerConnection(
        config, max_concurrent_streams=max_concurrent_streams,
        connection_window=16 * 1024 * 1024,
    )
    server.initiate_connection()
    return server


def _server_with_open_stream() -> tuple[_grpc_stream._ServerConnection, int]:
    """jobd's server connection, configured as the transport configures it, with one call
    opened by an h2 client."""
    server = _jobd_server(max_concurrent_streams=10)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [
        (":method", "POST"), (":scheme", "https"), (":path", "/jobd.v1.JobService/Status"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
    ])  # fmt: skip
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server, 1


def test_responses_use_the_constant_header_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the configuration the server runs with (it advertises grpc-accept-encoding), a
    protobuf response's headers and OK trailers are the blocks encoded once, never h2's
    encoder (the fast path was once skipped because the block lacked that header)."""
    server, stream_id = _server_with_open_stream()

    def encoded_by_h2(*args: object, **kwargs: object) -> None:
        raise AssertionError("h2 encoded our constant headers")

    monkeypatch.setattr(server.h2_connection, "send_headers", encoded_by_h2)
    server.start_response(stream_id, "+proto")
    server.end_response(stream_id, Status(StatusCode.OK))
    block = _grpc_stream._RESPONSE_START_BLOCK
    trailers = _grpc_stream._OK_TRAILERS_BLOCK
    assert server.data_to_send() == (
        _grpc_stream._FRAME_HEADER.pack(0, len(block), 0x1, 0x4, stream_id) + block
        + _grpc_stream._FRAME_HEADER.pack(0, len(trailers), 0x1, 0x5, stream_id) + trailers
    )  # fmt: skip


def _ended(job_id: str = "j1", **changes: object) -> engine.JobInfo:
    job = engine.JobInfo(
        id=job_id, owner="alice", command=("true",), state=engine.State.EXITED,
        started_at=1.0, ended_at=2.0,
    )  # fmt: skip
    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]


def _bytes(message: pb.Job | FramedMessage) -> bytes:
    return message.SerializeToString()


def test_ended_job_messages_are_cached_only_for_the_same_job_info() -> None:
    cache = _EndedJobMessages(size=2)
    first = cache.message(_ended())
    assert cache.message(_ended()) is first  # equal info: the cached bytes
    assert _bytes(first) == job_to_pb(_ended()).SerializeToString()
    # Anything different (here a changed exit code) is never answered from the cache.
    changed = cache.message(_ended(exit_code=3))
    assert changed is not first
    assert pb.Job.FromString(_bytes(changed)).exit_code == 3
    # A running job is never cached: its usage changes.
    running = _ended(state=engine.State.RUNNING, ended_at=0.0)
    assert isinstance(cache.message(running), pb.Job)


def test_ended_job_messages_are_bounded() -> None:
    cache = _EndedJobMessages(size=2)
    for i in range(10):
        cache.message(_ended(f"j{i}"))
    assert len(cache._entries) == 2
    assert list(cache._entries) == ["j8", "j9"]


def _request_headers(timeout: str | None, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"), (":scheme", "https"), (":path", "/jobd.v1.JobService/Status"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("user-agent", "grpc-python/1.85"), *extra,
    ]  # fmt: skip
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def _new_server() -> tuple[_grpc_stream._ServerConnection, h2.connection.H2Connection]:
    """jobd's server connection and an h2 client that sends whatever headers it is given."""
    server = _jobd_server(max_concurrent_streams=100)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return server, client


@pytest.mark.parametrize(
    "extra",
    [(), (("x-trace", "abc"), ("x-trace", "def")), (("trace-bin", "AAEC"),)],
)
def test_inbound_headers_seen_before_give_what_h2_and_purerpc_give(
    monkeypatch: pytest.MonkeyPatch, extra: tuple[tuple[str, str], ...]
) -> None:
    """A header list seen before but for its deadline's digits is checked and parsed once: the
    call's event is what h2's validation and purerpc's parse make of it."""
    monkeypatch.setattr(_grpc_stream, "_H2_HEADERS", _grpc_stream._Memo())
    monkeypatch.setattr(_grpc_stream, "_REQUESTS", _grpc_stream._Memo())
    validated = []
    real_validate = h2.stream.validate_headers

    def counting(headers: object, flags: object) -> object:
        validated.append(1)
        return real_validate(headers, flags)

    monkeypatch.setattr(h2.stream, "validate_headers", counting)
    server, client = _new_server()
    events = []
    for stream_id, timeout in [(1, "100m"), (3, "29999953u"), (5, "5S"), (7, "2H"), (9, "7n"),
                               (11, None), (13, None)]:  # fmt: skip
        client.send_headers(stream_id, _request_headers(timeout, *extra))
        [event] = server.receive_data(client.data_to_send())
        expected = RequestReceived.parse_from_stream_id_and_headers_destructive(
            stream_id, HeaderDict(_request_headers(timeout, *extra))
        )
        assert vars(event) == vars(expected), timeout
        assert stream_id in server.message_read_buffers
        events.append(event)
    assert len(validated) == 2  # once with a deadline, once without
    assert events[0].timeout == datetime.timedelta(milliseconds=100)
    assert events[1].timeout == datetime.timedelta(microseconds=29999953)
    assert all(e.timeout is None for e in events[5:])


def test_inbound_headers_unlike_those_seen_are_checked_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_grpc_stream, "_H2_HEADERS", _grpc_stream._Memo())
    monkeypatch.setattr(_grpc_stream, "_REQUESTS", _grpc_stream._Memo())
    server, client = _new_server()
    client.send_headers(1, _request_headers("5S"))
    assert len(server.receive_data(client.data_to_send())) == 1
    # A deadline purerpc cannot read: that stream is reset, as before.
    client.send_headers(3, _request_headers("5X"))
    assert server.receive_data(client.data_to_send()) == []
    assert server.malformed_requests == 1
    client.send_headers(5, _request_headers(" 5S"))  # h2: surrounding whitespace
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(client.data_to_send())
    server, client = _new_server()
    client.send_headers(1, _request_headers(None))
    assert len(server.receive_data(client.data_to_send())) == 1
    client.send_headers(3, [*_request_headers(None), ("X-Upper", "1")])  # h2: uppercase name
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(client.data_to_send())


def test_header_memos_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    memo = _grpc_stream._Memo(size=3)
    monkeypatch.setattr(_grpc_stream, "_REQUESTS", memo)
    server, client = _new_server()
    for i in range(10):
        stream_id = 1 + 2 * i
        client.send_headers(stream_id, _request_headers(None, ("x-n", str(i))))
        [event] = server.receive_data(client.data_to_send())
        assert event.custom_metadata == (("x-n", str(i)),)
    assert len(memo.entries) <= 3
    big = _request_headers(None, ("x-big", "y" * 4096))
    raw = [hpack.HeaderTuple(k.encode(), v.encode()) for k, v in big]
    assert _grpc_stream._memo_key(raw) is None  # too large to keep


_BUFFER_CYCLES = """
import resource, sys
from jobd.cli import keep_large_buffers
if not keep_large_buffers():
    print("no mallopt")
    sys.exit()
def cycle():  # what a 1 MiB Output message makes and frees: its chunk and its TLS bytes
    chunk = b"x" * (1 << 20)
    record = b"y" * ((1 << 20) + 2000)
    del chunk, record
for _ in range(5):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_serve_reuses_freed_message_buffers_instead_of_faulting_in_fresh_pages() -> None:
    # `jobd serve` tunes glibc's malloc so that two 1 MiB buffers made and freed per message
    # reuse the same heap pages: without it glibc gives the heap's top back at every free and
    # faults it in again, zeroed (~512 page faults per cycle, 24,000 for these 50).
    out = subprocess.run(
        [sys.executable, "-c", _BUFFER_CYCLES], capture_output=True, text=True, check=True
    ).stdout.strip()
    if out == "no mallopt":
        pytest.skip("not glibc: no mallopt")
    assert int(out) < 50 * 256 // 10
