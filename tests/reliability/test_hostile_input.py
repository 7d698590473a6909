"""Hostile input against a real `jobd serve`: property-based fuzzing (hypothesis) of every field
of every request and of raw request bytes, garbage on the socket before and after the TLS
handshake, malformed HTTP/2 frames and gRPC framing, oversized messages and slow handshakes.
The server must answer only what a client may cause (never INTERNAL or UNKNOWN), keep serving,
log no bug, and close every connection it was given (no leaked connection or call task).

Transport-level regressions with a test service (oversized message fails alone, resets,
flow control, silent peers, plaintext, TLS 1.2) are in tests/test_transport.py."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jobd.engine._manager import DEFAULT_PATH
from jobd.v1 import jobd_pb2 as pb

from .harness import (
    CLIENT_CODES,
    ServerProcess,
    channel,
    code_of,
    raw_tls,
    scale,
)

pytestmark = pytest.mark.cgroups

EXAMPLES = scale(200, 2000)
RAW_EXAMPLES = scale(100, 1000)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
RAW = settings(FUZZ, max_examples=RAW_EXAMPLES)
TIMEOUT = 30
# A bound, not a threshold: a request the server never answers (nor resets) is a hang.
ANSWER_TIMEOUT = 20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What each fuzz test tried, for docs/RELIABILITY.md (printed with -s).
TRIED: dict[str, int] = {}


def count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture(scope="module")
def jobs(shared_server: ServerProcess) -> dict[str, str]:
    """Ids to aim at: alice's finished job, alice's running job, bob's job."""
    with channel(shared_server, "alice") as (_, alice), channel(shared_server, "bob") as (_, bob):
        done = alice.Start(pb.StartRequest(command=["echo", "done"]), timeout=TIMEOUT)
        list(alice.Output(pb.OutputRequest(id=done.id, follow=True), timeout=TIMEOUT))
        running = alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT)
        bobs = bob.Start(pb.StartRequest(command=["echo", "bob"]), timeout=TIMEOUT)
        return {"done": done.id, "running": running.id, "bob": bobs.id}


@pytest.fixture(scope="module")
def alice(shared_server: ServerProcess) -> Iterator[Any]:
    with channel(shared_server, "alice") as (_, stub):
        yield stub


@pytest.fixture(scope="module")
def alice_channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with channel(shared_server, "alice") as (ch, _):
        yield ch


def check(code: grpc.StatusCode, what: object) -> None:
    assert code in CLIENT_CODES, (code, what)


# ----------------------------------------------------------------- every field of every request

# Programs that are harmless whatever their arguments; anything else must not resolve.
SAFE_PROGRAMS = ["true", "false", "echo", "/bin/true", "uname"]
BAD_PROGRAMS = ["", "/nonexistent/x", "/etc/passwd", "/tmp", "/dev/null", "a\0b", "./nope",
                "no-such-program-xyz", " ", "\n"]


def not_a_program(text: str) -> bool:
    return "/" not in text and "." not in text and shutil.which(text, path=DEFAULT_PATH) is None


programs = st.one_of(
    st.sampled_from(SAFE_PROGRAMS + BAD_PROGRAMS), st.text(max_size=40).filter(not_a_program)
)
texts = st.text(max_size=200)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
limits = st.builds(
    pb.Limits,
    cpus=st.one_of(doubles, st.floats(0.05, 4)),
    memory_bytes=st.one_of(int64, st.integers(0, 1 << 34)),
    pids=st.one_of(int64, st.integers(0, 40000)),
    io_read_bps=st.one_of(int64, st.integers(0, 1 << 40)),
    io_write_bps=st.one_of(int64, st.integers(0, 1 << 40)),
)
env_keys = st.text(max_size=20).filter(lambda k: k.upper() != "PATH")
starts = st.builds(
    pb.StartRequest,
    command=st.builds(lambda p, a: [p, *a], programs, st.lists(texts, max_size=4)) | st.just([]),
    env=st.dictionaries(env_keys, texts, max_size=4),
    working_dir=st.one_of(
        st.sampled_from(["", "/", "/tmp", "/nonexistent", "relative", "/etc/passwd", "/root",
                         "a\0b", "/" + "x" * 5000]),
        texts,
    ),
    limits=st.one_of(st.none(), limits),
)


@FUZZ
@given(request=starts)
def test_fuzz_start(alice: Any, request: pb.StartRequest) -> None:
    count("Start")
    code = code_of(lambda: alice.Start(request, timeout=TIMEOUT))
    check(code, request)


@st.composite
def job_ids(draw: st.DrawFn, jobs: dict[str, str]) -> str:
    kind = draw(st.sampled_from(["done", "bob", "uuid", "text", "spelling"]))
    if kind in ("done", "bob"):
        return jobs[kind]
    if kind == "uuid":
        return str(draw(st.uuids()))
    if kind == "spelling":
        return draw(st.sampled_from([jobs["bob"].upper(), "urn:uuid:" + jobs["bob"],
                                     jobs["done"].replace("-", ""), jobs["done"] + "\0"]))
    return draw(texts)


@FUZZ
@given(data=st.data())
def test_fuzz_status_and_output(alice: Any, jobs: dict[str, str], data: st.DataObject) -> None:
    job_id = data.draw(job_ids(jobs))
    count("Status")
    check(code_of(lambda: alice.Status(pb.JobRequest(id=job_id), timeout=TIMEOUT)), job_id)
    request = pb.OutputRequest(id=job_id, follow=data.draw(st.booleans()),
                               offset=data.draw(st.one_of(int64, st.integers(-2, 10))))
    count("Output")
    check(code_of(lambda: alice.Output(request, timeout=TIMEOUT)), request)
    count("List")
    check(code_of(lambda: alice.List(pb.ListRequest(), timeout=TIMEOUT)), "List")


graces = st.one_of(
    st.none(),
    st.builds(Duration, seconds=int64, nanos=int32),
    st.builds(Duration, seconds=st.integers(-2, 2), nanos=st.integers(-(10**9), 10**9)),
)


@FUZZ
@given(data=st.data(), grace=graces)
def test_fuzz_stop(
    alice: Any, jobs: dict[str, str], data: st.DataObject, grace: Duration | None
) -> None:
    fresh = data.draw(st.booleans())
    if fresh:  # a fresh running job (sleep ends on SIGTERM at once)
        job_id = alice.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT).id
    else:
        job_id = data.draw(job_ids(jobs))
    request = pb.StopRequest(id=job_id, grace=grace)
    count("Stop")
    code = code_of(lambda: alice.Stop(request, timeout=TIMEOUT))
    check(code, request)
    if code is not grpc.StatusCode.OK and fresh:
        # A refused stop (e.g. a bad grace) must leave the job running: stop it properly.
        alice.Stop(pb.StopRequest(id=job_id, grace={"seconds": 0}), timeout=TIMEOUT)


# ----------------------------------------------------------------- raw request bytes per method

METHODS = ["Start", "Stop", "Status", "Output", "List"]


def _harmless(method: str, body: bytes) -> bool:
    """Random bytes may parse as a StartRequest; never run what they name."""
    if method != "Start":
        return True
    try:
        parsed = pb.StartRequest.FromString(body)
    except Exception:
        return True
    return not parsed.command or parsed.command[0] in SAFE_PROGRAMS or not_a_program(
        parsed.command[0]
    )


@RAW
@given(method=st.sampled_from(METHODS), body=st.binary(max_size=300))
def test_fuzz_raw_request_bytes(alice_channel: grpc.Channel, method: str, body: bytes) -> None:
    assume(_harmless(method, body))
    path = f"/jobd.v1.JobService/{method}"
    identity = lambda b: b  # noqa: E731
    count("raw message")
    if method == "Output":
        call = alice_channel.unary_stream(path, identity, identity)
        code = code_of(lambda: call(body, timeout=5))
        # A valid follow of a job that runs on may legitimately wait out its deadline.
    else:
        call = alice_channel.unary_unary(path, identity, identity)
        code = code_of(lambda: call(body, timeout=TIMEOUT))
    check(code, (method, body))


# ----------------------------------------------------------------- the socket itself


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except (OSError, ssl.SSLError):
        pass


@RAW
@given(garbage=st.binary(max_size=2048))
def test_fuzz_bytes_before_tls(shared_server: ServerProcess, garbage: bytes) -> None:
    """Random bytes, and truncated TLS records, instead of a ClientHello."""
    count("pre-TLS bytes")
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        _drain(sock)


@RAW
@given(garbage=st.binary(max_size=4096), preface=st.booleans())
def test_fuzz_bytes_after_tls(shared_server: ServerProcess, garbage: bytes, preface: bool) -> None:
    """Random bytes after the handshake, with or without the HTTP/2 preface first. (A peer
    that then goes silent is closed by the idle timeout; this one closes, and the server must
    close its side: the module's last test counts the server's sockets.)"""
    count("post-TLS bytes")
    with raw_tls(shared_server) as tls:
        tls.sendall((PREFACE if preface else b"") + garbage)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    header = struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id)
    return header + payload


@RAW
@given(
    frames=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 2**31 - 1)
                  | st.sampled_from([0, 1, 3]), st.binary(max_size=64)),
        min_size=1, max_size=6,
    )
)
def test_fuzz_http2_frames(
    shared_server: ServerProcess, frames: list[tuple[int, int, int, bytes]]
) -> None:
    """Valid preface and SETTINGS, then frames of any type, flags, stream and payload."""
    count("HTTP/2 frames")
    with raw_tls(shared_server) as tls:
        tls.sendall(PREFACE + _frame(4, 0, 0, b"") + b"".join(_frame(*f) for f in frames))


header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@RAW
@given(
    path=st.one_of(st.sampled_from([f"/jobd.v1.JobService/{m}" for m in METHODS]), header_values),
    content_type=st.sampled_from(["application/grpc", "application/grpc+proto", "text/html",
                                  "application/grpc+json", ""]),
    timeout=st.one_of(st.none(), header_values,
                      st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**12),
                                st.sampled_from("HMSmunx"))),
    extra=st.lists(st.tuples(header_values.map(lambda s: s.lower() or "x"), header_values),
                   max_size=3),
    body=st.one_of(st.just(b""), st.binary(max_size=64),
                   st.builds(lambda flag, n, b: struct.pack(">BI", flag, n) + b,
                             st.integers(0, 255), st.integers(0, 2**32 - 1),
                             st.binary(max_size=32))),
)
def test_fuzz_grpc_headers_and_framing(
    shared_server: ServerProcess,
    path: str,
    content_type: str,
    timeout: str | None,
    extra: list[tuple[str, str]],
    body: bytes,
) -> None:
    """Well-formed HTTP/2 carrying odd gRPC: any path, content type, grpc-timeout, extra
    headers; a body with any compressed flag and declared length (up to 4 GiB), or cut short.
    The answer, if any, must carry a status a client may cause."""
    count("gRPC requests")
    with raw_tls(shared_server) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
        conn.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "https"), (":path", path),
                   (":authority", "localhost"), ("te", "trailers")]
        if content_type:
            headers.append(("content-type", content_type))
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        headers += [h for h in extra if not h[0].startswith(":")]
        try:
            conn.send_headers(1, headers)
            conn.send_data(1, body, end_stream=True)
        except Exception:  # h2 refuses to send it: nothing to test
            return
        tls.sendall(conn.data_to_send())
        tls.settimeout(ANSWER_TIMEOUT)
        status = _read_grpc_status(tls, conn)
    assert status not in ("2", "13"), (status, path, timeout, body)  # UNKNOWN, INTERNAL


def _read_grpc_status(tls: ssl.SSLSocket, conn: h2.connection.H2Connection) -> str | None:
    """The grpc-status the server answers on stream 1, or None if it closes or resets."""
    while True:
        try:
            data = tls.recv(65536)
        except TimeoutError:
            raise AssertionError("the server neither answered nor closed") from None
        except (OSError, ssl.SSLError):
            return None
        if not data:
            return None
        try:
            events = conn.receive_data(data)
        except Exception:
            return None
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                found = dict(event.headers).get("grpc-status")
                if found is not None:
                    return str(found)
            if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                return None
        out = conn.data_to_send()
        if out:
            tls.sendall(out)


# ----------------------------------------------------------------- size and slowness


def test_oversized_messages_fail_alone(alice_channel: grpc.Channel, alice: Any) -> None:
    """A 5 MiB request and one 200 KiB argument (over the kernel's 128 KiB per-argument limit):
    RESOURCE_EXHAUSTED and INVALID_ARGUMENT; the same connection then works."""
    huge = pb.StartRequest(command=["echo", "x" * (5 << 20)])
    assert code_of(lambda: alice.Start(huge, timeout=TIMEOUT)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    long_arg = pb.StartRequest(command=["echo", "x" * 200_000])
    assert code_of(lambda: alice.Start(long_arg, timeout=TIMEOUT)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    long_env = pb.StartRequest(command=["true"], env={"BIG": "x" * 200_000})
    assert code_of(lambda: alice.Start(long_env, timeout=TIMEOUT)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    many = pb.StartRequest(command=["echo", *(["x" * 100_000] * 30)])  # 3 MB of arguments
    assert code_of(lambda: alice.Start(many, timeout=TIMEOUT)) == grpc.StatusCode.INVALID_ARGUMENT
    assert alice.List(pb.ListRequest(), timeout=TIMEOUT) is not None


def test_slow_and_stalled_handshakes_block_no_one(shared_server: ServerProcess, alice: Any) -> None:
    """50 connections that stop half-way through their ClientHello, and one that sends it a
    byte at a time: meanwhile other clients connect and are served."""
    hello = _client_hello(shared_server)
    stalled = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", shared_server.port), timeout=TIMEOUT)
            sock.sendall(hello[: len(hello) // 2])
            stalled.append(sock)
        dribbler = socket.create_connection(("127.0.0.1", shared_server.port), timeout=TIMEOUT)
        stalled.append(dribbler)
        stop = threading.Event()

        def dribble() -> None:
            for byte in hello:
                if stop.wait(0.05):
                    return
                try:
                    dribbler.sendall(bytes([byte]))
                except OSError:
                    return

        thread = threading.Thread(target=dribble)
        thread.start()
        try:
            for _ in range(5):  # new connections each time
                with channel(shared_server, "bob") as (_, bob):
                    bob.List(pb.ListRequest(), timeout=TIMEOUT)
        finally:
            stop.set()
            thread.join()
    finally:
        for sock in stalled:
            sock.close()


def _client_hello(server: ServerProcess) -> bytes:
    """The first bytes a real TLS client sends."""
    ctx = ssl.create_default_context(cafile=str(server.pki.dir / "ca.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_every_connection_was_closed_and_nothing_logged(shared_server: ServerProcess) -> None:
    """After all of the above (this module's last test): no connection left on the server's
    side, the server healthy, and the count of what was tried."""
    shared_server.wait_connections_closed(baseline=_baseline(shared_server))
    shared_server.check_healthy()
    print("fuzz cases tried:", TRIED, "total", sum(TRIED.values()))


def _baseline(server: ServerProcess) -> int:
    # The module fixtures' own channels (alice and alice_channel: one connection each).
    del server
    return 2
