"""The server's fast paths produce exactly what the slow ones did: hand-framed OutputChunk
messages, HPACK blocks encoded once, and cached Job messages of ended jobs (issue 12). The
end-to-end tests (real grpcio and purerpc clients) cover them on the wire; these pin the bytes."""

from __future__ import annotations

import dataclasses

import hpack  # type: ignore[import-untyped]  # h2's own HPACK library
import pytest

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
    ]
    assert decoder.decode(_grpc_stream._OK_TRAILERS_BLOCK) == [("grpc-status", "0")]
    # Nothing was added to the peer's dynamic table: the blocks can be sent on every call.
    assert len(decoder.header_table.dynamic_entries) == 0


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
