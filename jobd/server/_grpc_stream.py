"""purerpc's per-connection machinery (h2 connection, socket, streams), fixed for jobd: the one
module that touches purerpc's and h2's private internals (docs/DESIGN.md, purerpc rows 2, 5, 6,
8, 9, 10), and trio's SSLStream's (its buffers, locks and state: the reader's own TLS read and
send, `TrioByteStream`; trio is pinned exactly as purerpc and h2 are). Knows nothing of
services, identity or TLS setup; must not import jobd.engine.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import datetime
import enum
import fcntl
import logging
import math
import re
import socket
import ssl
import struct
import termios
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack  # type: ignore[import-untyped]  # h2's HPACK library: its header tuples
import trio
import trio._ssl  # SSLStream's state and buffers: `TrioByteStream.send_now`
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.connection import GRPCConfiguration, GRPCConnection
from purerpc.grpclib.events import (
    Event,
    MessageReceived,
    RequestEnded,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.grpclib.headers import sanitize_headers
from purerpc.grpclib.status import Status, StatusCode

from jobd.server._audit import write_deferred

__all__ = [
    "FramedMessage",
    "ACCEPT_ENCODING",
    "OutboundBudget",
    "ReaderEnd",
    "ServerSocket",
    "ServerStream",
    "TrioByteStream",
    "goaway_frame",
    "percent_encode_grpc_message",
]

log = logging.getLogger(__name__)

# Bytes asked of the TLS stream per read. purerpc asks for 1 MiB, which makes the ssl module
# allocate a 1 MiB buffer on every read however little arrived.
_RECEIVE_SIZE = 65536
# The writer joins queued pieces (frame headers, h2's own frames, small message bodies) into one
# TLS write up to this size (fewer records and syscalls); a piece this big or bigger (a large
# message's body) is written as it is, without being copied into a joined buffer. With many
# streams of 64 KiB messages (fan-out: 100 followers), writing each body alone took two TLS
# writes and sends per message; joined, the copy costs less than the writes it saves.
_WRITE_BATCH = 256 * 1024
_WRITE_ALONE = 128 * 1024
# h2 opens every connection window at the RFC 7540 default.
_H2_DEFAULT_WINDOW = 65535
# gRPC frames each message with a 1-byte compressed flag and a 4-byte length.
_GRPC_FRAME_HEADER = 5
# A stream hands at most this much to the socket per turn, then flushes (and waits if the
# outbound cap is reached): a whole large message (LARGE_MESSAGE and its framing, below), as
# one DATA frame when the peer's frame size and the windows allow (grpcio's is 8 MiB). At
# 256 KiB per turn a 1 MiB message took four frames, each two TLS writes and socket sends
# (its 9-byte header, then its body) and a pass of the writer (issue 12, round 6).
_SEND_BATCH = 1024 * 1024 + 1024
# HTTP/2 frame header: 24-bit length (as 16 + 8 bits here), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">HBBBI")
_GRPC_PREFIX = struct.Struct(">?I")  # compressed flag, message length
_CONN_SEND_DATA = h2.connection.ConnectionInputs.SEND_DATA
_STREAM_SEND_DATA = h2.stream.StreamInputs.SEND_DATA
_CONN_SEND_HEADERS = h2.connection.ConnectionInputs.SEND_HEADERS
_STREAM_SEND_HEADERS = h2.stream.StreamInputs.SEND_HEADERS
_STREAM_SEND_END_STREAM = h2.stream.StreamInputs.SEND_END_STREAM
_HEADERS, _END_STREAM, _END_HEADERS = 0x1, 0x1, 0x4  # frame type, flags (RFC 7540 6.2)


def _literal_never_indexed(name: bytes | int, value: bytes) -> bytes:
    """One HPACK field "literal without indexing" (RFC 7541 6.2.2), no Huffman coding: it
    leaves the decoder's and our encoder's dynamic tables as they are, so the encoded block can
    be sent again and again. `name` is a static-table index (< 127) or the name itself; values
    and names here are shorter than 127 bytes."""
    if isinstance(name, int):
        assert 15 <= name < 15 + 127
        head = bytes([0x0F, name - 15])
    else:
        head = bytes([0x00, len(name)]) + name
    assert len(value) < 127
    return head + bytes([len(value)]) + value


# Our own response headers for a call answered with protobuf, and its OK trailers, HPACK-encoded
# once: ":status: 200" (static index 8), "content-type: application/grpc+proto" (name: static
# index 31), "grpc-accept-encoding: identity" (what the server's configuration advertises: see
# ACCEPT_ENCODING), "grpc-status: 0". h2 would encode and validate them on every call.
_RESPONSE_START_BLOCK = (
    bytes([0x88])
    + _literal_never_indexed(31, b"application/grpc+proto")
    + _literal_never_indexed(b"grpc-accept-encoding", b"identity")
)
_OK_TRAILERS_BLOCK = _literal_never_indexed(b"grpc-status", b"0")
# Room an answer made by the reader (`ServerSocket.answer_unary`) needs in the outbound queue
# besides its message: its header and trailer frames.
_ANSWER_HEADROOM = 1024
_H2_CLOSED = h2.connection.ConnectionState.CLOSED
_HALF_CLOSED_REMOTE = h2.stream.StreamState.HALF_CLOSED_REMOTE
# The reader stops reading once this many times the outbound cap is queued: h2 answers PINGs
# and SETTINGS by itself, so a peer that sends those and reads nothing would grow the queue.
_READER_QUEUE_FACTOR = 4
# A call ended by the server (shutdown) first finishes the message it is sending, so that its
# status can follow. It is cut (reset) once the connection has taken nothing for this long; while
# the peer reads on, it gets this long again after every socket write (up to 1 MiB messages on
# many busy streams of a loaded host take longer than a fixed second), up to _MESSAGE_END_LIMIT.
_MESSAGE_END_GRACE = 1.0
_MESSAGE_END_LIMIT = 10.0
# How big a streaming call's next message may be (its body: `message_limit` tells the handler),
# and what it reserves of the outbound budgets and its connection's room before the handler
# makes it. A stream whose peer has never acknowledged data gets SMALL_MESSAGE: many quiet
# follows fit in the budget, and one who reads nothing holds little. One whose peer reads gets
# up to LARGE_MESSAGE (fewer, larger messages cost less per byte: issue 12) while the budgets
# have room for it, else SMALL_MESSAGE (so a peer that acknowledges once and then plays with
# its windows holds large messages only within its share); and never more than its
# flow-control window has room for now, so that a message is never made only to wait for a
# window that a peer who stopped reading will not open (MIN_MESSAGE when it is tiny).
SMALL_MESSAGE = 64 * 1024
LARGE_MESSAGE = 1024 * 1024
MIN_MESSAGE = 1024
MESSAGE_FRAMING = 64  # gRPC prefix and the message's own fields besides its body
PRODUCE_RESERVE = SMALL_MESSAGE + MESSAGE_FRAMING
message_limit: contextvars.ContextVar[int] = contextvars.ContextVar(
    "message_limit", default=SMALL_MESSAGE
)
# The streaming call whose task this is (set by its `reserve`), for `report_waits`.
_calling: contextvars.ContextVar[ServerStream | None] = contextvars.ContextVar(
    "_calling", default=None
)


def report_waits() -> Callable[[bool], None] | None:
    """For a streaming handler, in its call's task, that can say when it waits for something
    other than its connection (a follow waiting for new output): the function to call with
    True before such a wait and False after it; None outside a streaming call. From then on
    the message the call has reserved counts against its connection's room while the handler
    makes it (a replay's chunks, its yields to other tasks), except during those waits. A
    handler that does not report is taken to be waiting all the while it makes a message
    (`ServerStream.set_waiting`): so did every handler before (issue 12, fan-out: 100 replays
    of one job on 4 connections each reserved a message while the others made theirs, which
    over-filled the user's share with 64 KiB messages)."""
    stream = _calling.get()
    if stream is None:
        return None
    stream.reports_waits = True
    stream.hold_room(True)  # it is making its message now
    return stream.waiting_for_input


def _message_body_limit(window: int, large: bool) -> int:
    cap = LARGE_MESSAGE if large else SMALL_MESSAGE
    return max(MIN_MESSAGE, min(cap, window - MESSAGE_FRAMING))


class OutboundBudget:
    """Bytes waiting to be sent, server-wide and per user: every connection's socket queue
    plus what streaming calls have reserved for their next message, sent or stalled on flow
    control (issue 9: 10,000 unread Output streams held 1.94 GB). A stream whose peer has
    never acknowledged its data produces a message only while both budgets have room; one
    whose peer has (it reads) only needs room in its own connection's queue. So those who
    read nothing hold a bounded amount in all, and can starve neither readers nor, past
    their own user's share, other users' new calls."""

    def __init__(self, limit: int, per_user: int) -> None:
        self.limit = limit
        self.per_user = per_user
        self.used = 0
        self._by_user: collections.Counter[str] = collections.Counter()
        self._waiting = trio.lowlevel.ParkingLot()

    def has_room(self, user: str, size: int) -> bool:
        return self.used + size <= self.limit and self._by_user[user] + size <= self.per_user

    def take(self, user: str, size: int) -> None:
        self.used += size
        self._by_user[user] += size

    def give(self, user: str, size: int) -> None:
        self.used -= size
        left = self._by_user[user] - size
        if left > 0:
            self._by_user[user] = left
        else:
            del self._by_user[user]
        if self._waiting and self.used + PRODUCE_RESERVE <= self.limit:
            # FIFO, a few at a time: thousands of unread streams may be waiting here.
            self._waiting.unpark(count=size // PRODUCE_RESERVE + 1)

    async def wait(self) -> None:
        await self._waiting.park()




# --------------------------------------------------------------------------------------------
# The byte stream purerpc reads and writes
# --------------------------------------------------------------------------------------------


def _as_anyio_error(exc: BaseException) -> BaseException:
    """Translate trio's stream errors into anyio's, the only ones purerpc treats as a normal
    end of connection (row 2: a client that drops TCP without close_notify made trio raise its
    own BrokenResourceError and purerpc log "Got exception in main dispatch loop"). A plain
    try/except at each use: a generator context manager per read and write cost more."""
    if isinstance(exc, trio.ClosedResourceError):
        return anyio.ClosedResourceError()
    return anyio.BrokenResourceError()


# trio's, and the raw ones it wraps (the same thing if one ever comes through).
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


# `TrioByteStream.send_now` takes at most this much (the reader's answers and h2's own frames).
_SEND_NOW_MAX = 16 * 1024
_TLS_OK = trio._ssl._State.OK
_TLS_BROKEN = trio._ssl._State.BROKEN
_OUTQ = struct.Struct("i")
# Room `send_now` leaves for a TLS record's overhead beyond its data.
_SEND_NOW_SLACK = 1024


def _no_tls_write() -> None:
    """What `TrioByteStream.flush_unsent` has trio's SSLStream do: nothing, but send what its
    outgoing buffer holds."""


class TrioByteStream(anyio.abc.ByteStream):
    """A handshaken `trio.SSLStream` as the anyio `ByteStream` purerpc's `SocketWrapper` expects,
    with the extra attributes it asks for (`SocketAttribute.raw_socket` for its socket options)
    and the TLS ones a handler may want; and `send_now`, a send that never waits."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:  # over a SocketStream
        self._stream = stream
        # TLS bytes `send_now` made and the kernel did not take, left at the head of the
        # SSLStream's outgoing buffer: whoever uses the stream next sends them first.
        self.unsent = False

    def send_now(self, data: bytes) -> bool:
        """Encrypt and send `data` (at most _SEND_NOW_MAX bytes) at once, without waiting, if
        nobody else is sending on the TLS stream and the kernel's send queue holds at most a
        little (so it takes the whole record: a TCP socket takes a small write while its send
        buffer has room; half of it free, with room for TLS's overhead, here). False,
        with nothing done, if not. The TLS record is made and handed to the socket exactly as
        `trio.SSLStream.send_all` does, minus its scheduling: its outgoing buffer must be
        empty and its send lock free (no record may overtake another). Should the kernel
        still take only part, the rest is left at the head of that buffer (`unsent`), to be
        sent first by whoever uses the stream next (`flush_unsent`, the writer). A broken
        socket raises anyio.BrokenResourceError, as `send` does."""
        ssl_stream = self._stream
        if (
            ssl_stream._state is not _TLS_OK
            or self.unsent
            or len(data) > _SEND_NOW_MAX
            or ssl_stream._delayed_outgoing is not None
            or ssl_stream._outgoing.pending
            or ssl_stream._inner_send_lock.locked()
            or ssl_stream._outer_send_conflict_detector._held
            or not ssl_stream._handshook.done
        ):
            return False
        sock = ssl_stream.transport_stream.socket._sock
        try:
            outq = _OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            # Bytes not yet acknowledged take room in the send buffer: with more than a little
            # of it held, it may not take the whole record. A little is the common case: the
            # peer's TCP delays its ACK of a window update or ping ack sent just before (up to
            # 40 ms; 9 of 35 spaced Starts' answers were left to the writer for 88 such bytes).
            if outq and outq + len(data) + _SEND_NOW_SLACK > sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF
            ) // 2:
                return False
            ssl_stream._ssl_object.write(data)
        except (OSError, ssl.SSLError) as exc:  # as trio's SSLStream: broken for good
            ssl_stream._state = _TLS_BROKEN
            raise anyio.BrokenResourceError() from exc
        record = ssl_stream._outgoing.read()
        try:
            sent = sock.send(record)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            ssl_stream._state = _TLS_BROKEN
            raise anyio.BrokenResourceError() from exc
        if sent < len(record):
            ssl_stream._outgoing.write(record[sent:])  # the buffer was empty: first out
            self.unsent = True
        return True

    async def flush_unsent(self) -> None:
        """Send what `send_now` left unsent (and anything after it), as `send` would."""
        self.unsent = False
        ssl_stream = self._stream
        try:
            ssl_stream._check_status()
            with ssl_stream._outer_send_conflict_detector:
                await ssl_stream._retry(_no_tls_write)
        except _STREAM_ERRORS as exc:
            raise _as_anyio_error(exc) from exc

    async def receive(self, max_bytes: int = _RECEIVE_SIZE) -> bytes:
        ssl_stream = self._stream
        if (
            ssl_stream._state is _TLS_OK
            and ssl_stream._handshook.done
            and not ssl_stream._incoming.pending
            and not ssl_stream._ssl_object.pending()
            and not ssl_stream._inner_recv_lock.locked()
            and not ssl_stream._outer_recv_conflict_detector._held
        ):
            data: bytes | bytearray = await self._receive_direct(max_bytes)
        else:
            try:
                data = await ssl_stream.receive_some(max_bytes)
            except _STREAM_ERRORS as exc:
                raise _as_anyio_error(exc) from exc
        if not data:
            raise anyio.EndOfStream
        return bytes(data)

    async def _receive_direct(self, max_bytes: int) -> bytes:
        """`trio.SSLStream.receive_some` when nothing is buffered: the socket read first, then
        the TLS read (trio tries the TLS read first, fails, takes its receive lock, reads the
        socket, tries again: two scheduler passes per read, one exception). One yield per read
        as trio's, a wait for the socket when it has nothing; cancelled only before anything
        is read. TLS bytes the read makes us owe the peer (a KeyUpdate's answer) are left in
        the outgoing buffer, first in line, for the writer (`unsent`), never sent here."""
        ssl_stream = self._stream
        sock = ssl_stream.transport_stream.socket._sock
        incoming = ssl_stream._incoming
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with ssl_stream._outer_recv_conflict_detector:
            while True:
                try:
                    received = sock.recv(_RECEIVE_SIZE)
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:
                    ssl_stream._state = _TLS_BROKEN
                    raise anyio.BrokenResourceError() from exc
                if received:
                    incoming.write(received)
                else:
                    incoming.write_eof()
                ssl_stream._inner_recv_count += 1
                try:
                    data = ssl_stream._ssl_object.read(max_bytes)
                except ssl.SSLWantReadError:
                    if received:
                        continue  # the rest of a record is on its way
                    ssl_stream._state = _TLS_BROKEN
                    raise anyio.BrokenResourceError() from None
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    ssl_stream._state = _TLS_BROKEN
                    raise anyio.BrokenResourceError() from exc
                finally:
                    if ssl_stream._outgoing.pending:
                        self.unsent = True
                break
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send(self, item: bytes | memoryview) -> None:
        try:
            await self._stream.send_all(item)
        except _STREAM_ERRORS as exc:
            raise _as_anyio_error(exc) from exc

    async def send_pair(self, head: bytes | memoryview, body: bytes | memoryview) -> None:
        """`send(head + body)` without joining them: both are encrypted into the TLS stream's
        outgoing buffer (head first), which then goes to the socket in one send, exactly as
        `trio.SSLStream.send_all` sends one piece (its checks, its lock, its retry). So a
        large message's body is never copied and its small frame header costs no socket send
        of its own."""
        ssl_stream = self._stream
        ssl_object = ssl_stream._ssl_object
        head_written = False

        def write_both() -> None:
            nonlocal head_written
            # `_retry` calls this again after a want-read: the head must go in only once.
            if not head_written:
                if head:  # (an empty write would be read as an EOF)
                    ssl_object.write(head)
                head_written = True
            ssl_object.write(body)

        try:
            with ssl_stream._outer_send_conflict_detector:
                ssl_stream._check_status()
                await ssl_stream._handshook.ensure(checkpoint=False)
                await ssl_stream._retry(write_both)
        except _STREAM_ERRORS as exc:
            raise _as_anyio_error(exc) from exc

    async def send_eof(self) -> None:
        raise NotImplementedError("a TLS stream cannot be half-closed")

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        except _STREAM_ERRORS as exc:
            raise _as_anyio_error(exc) from exc

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        # purerpc only calls setsockopt on raw_socket, which trio's socket wrapper provides.
        sock = self._stream.transport_stream.socket
        ssl_stream = self._stream
        socket_attribute = anyio.abc.SocketAttribute
        tls_attribute = anyio.streams.tls.TLSAttribute
        return {
            socket_attribute.raw_socket: lambda: sock,
            socket_attribute.family: lambda: sock.family,
            socket_attribute.local_address: lambda: sock.getsockname(),
            socket_attribute.local_port: lambda: sock.getsockname()[1],
            socket_attribute.remote_address: lambda: sock.getpeername(),
            socket_attribute.remote_port: lambda: sock.getpeername()[1],
            tls_attribute.peer_certificate: lambda: ssl_stream.getpeercert(False),
            tls_attribute.peer_certificate_binary: lambda: ssl_stream.getpeercert(True),
            tls_attribute.alpn_protocol: lambda: ssl_stream.selected_alpn_protocol(),
            tls_attribute.tls_version: lambda: ssl_stream.version(),
        }


# --------------------------------------------------------------------------------------------
# The sans-IO gRPC connection
# --------------------------------------------------------------------------------------------


def percent_encode_grpc_message(message: str) -> str:
    """Encode a status message as the gRPC HTTP/2 spec requires and no more: UTF-8 bytes
    outside 0x20-0x7E, and '%', become %XX (row 5: purerpc encoded ':' and ' ' too)."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message.encode()
    )


def _data_frame_header(stream_id: int, length: int) -> bytes:
    """The 9-byte header of an HTTP/2 DATA frame without flags (RFC 7540 §6.1)."""
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, 0x0, 0, stream_id & 0x7FFFFFFF)


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """An HTTP/2 GOAWAY frame (RFC 7540 §6.8). Built here because h2 3.2 moves the connection to
    CLOSED when it sends one itself, after which it refuses to send anything on the streams
    still in flight; a graceful drain has to keep answering them."""
    payload = struct.pack(">II", last_stream_id & 0x7FFFFFFF, error_code)
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", 0x7, 0, 0) + payload


class FramedMessage:
    """A message already serialized, in two parts: `head` (small) and `body`, which is sent as
    it is: no copy into a protobuf field, a serialized string or a frame. Made by a handler that
    knows its message's wire format (an OutputChunk's data field, written last; protobuf
    parsers accept fields in any order)."""

    __slots__ = ("body", "head")

    def __init__(self, head: bytes, body: bytes | memoryview) -> None:
        self.head = head
        self.body = body

    def SerializeToString(self) -> bytes:  # noqa: N802  (protobuf's name)
        return self.head + bytes(self.body)


def _debit_data_frame(h2c: Any, stream_id: int, size: int) -> None:
    """What h2's `send_data` checks and counts for a DATA frame of `size` bytes (the caller has
    checked it fits the windows and the peer's frame size), without building the frame: the
    connection and the stream must still be open for sending (h2's ProtocolError or
    StreamClosedError otherwise, as from send_data), and both windows are debited."""
    h2c.state_machine.process_input(_CONN_SEND_DATA)
    stream = h2c.streams[stream_id]
    stream.state_machine.process_input(_STREAM_SEND_DATA)
    stream.outbound_flow_control_window -= size
    h2c.outbound_flow_control_window -= size


class StreamReset(Event):  # type: ignore[misc]  # purerpc is untyped
    """The peer reset a stream (RST_STREAM); purerpc dropped this event (row 6)."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class MessageTooLarge(Event):  # type: ignore[misc]
    """A request message on this stream is over the limit; purerpc raised out of the reader
    instead, which dropped the whole connection (row 9)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class MessageCompressed(Event):  # type: ignore[misc]
    """A request message on this stream has the compressed flag set. purerpc inflated it with
    no bound (issue 9: 1 MiB of gzip became 1 GiB and froze the event loop for 9 s, before
    the caller's identity was checked); jobd refuses it uninflated, as the gRPC spec says for
    an encoding the server does not support: UNIMPLEMENTED, with grpc-accept-encoding."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


# The only message encoding jobd reads; advertised in every response's headers.
ACCEPT_ENCODING = "identity"


class _Compressed(Exception):
    pass


class _UncompressedReadBuffer(MessageReadBuffer):  # type: ignore[misc]
    """purerpc's request message parser, which never inflates a message."""

    def decompress(self, data: bytes) -> bytes:
        raise _Compressed


class PeerGoAway(Event):  # type: ignore[misc]
    """The peer sent GOAWAY: it is leaving, and h2 will send nothing more."""

    def __init__(self, error_code: int) -> None:
        self.error_code = error_code


# A gRPC deadline as the spec writes it (at most 8 digits and a unit): such a value passes every
# check h2 and purerpc make, whatever its digits, so header lists that differ only there are
# checked once.
_GRPC_TIMEOUT = re.compile(rb"[0-9]{1,8}[HMSmun]")
_TIMEOUT_UNITS = {"H": "hours", "M": "minutes", "S": "seconds", "m": "milliseconds"}


def _grpc_timeout(value: str) -> datetime.timedelta:
    """A grpc-timeout value of _GRPC_TIMEOUT's form, as purerpc's RequestReceived has it."""
    number, unit = int(value[:-1]), value[-1]
    if unit == "u":
        return datetime.timedelta(microseconds=number)
    if unit == "n":
        return datetime.timedelta(microseconds=number / 1000)
    return datetime.timedelta(**{_TIMEOUT_UNITS[unit]: number})
# Header lists larger than this (names and values) are always checked in full, never kept.
_MEMO_MAX_LIST_BYTES = 2048


class _MemoFull(Exception):
    pass


class _Memo:
    """A bounded map from a header list already seen to what processing it gave (inbound
    header lists repeat call after call: a client sends the same headers but for its
    deadline). Server-wide: at most `size` entries of at most _MEMO_MAX_LIST_BYTES each; when
    full it starts again empty. Only lists that passed every check are kept."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.entries: dict[Any, Any] = {}

    def put(self, key: Any, value: Any) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = value


def _memo_key(headers: list[Any], decoded: bool = False) -> tuple[tuple[Any, ...], int] | None:
    """The header list (h2's raw one, or `decoded`) as a key, its grpc-timeout value blanked,
    and where that header is (-1: none); None if it may not be kept (too large, a
    never-indexed header, a cookie, a deadline not in the spec's form, or two of them)."""
    cookie, timeout, pattern = _DECODED_NAMES if decoded else _RAW_NAMES
    key = []
    timeout_at = -1
    size = 0
    for i, header in enumerate(headers):
        if type(header) is not hpack.HeaderTuple:  # NeverIndexedHeaderTuple: as it comes
            return None
        name, value = header
        size += len(name) + len(value)
        if name == cookie:  # h2 moves and joins these: positions would change
            return None
        if name == timeout:
            if timeout_at >= 0 or not pattern.fullmatch(value):
                return None
            timeout_at = i
            value = value[:0]
        key.append((name, value))
    if size > _MEMO_MAX_LIST_BYTES:
        return None
    return tuple(key), timeout_at


_RAW_NAMES = (b"cookie", b"grpc-timeout", _GRPC_TIMEOUT)
_DECODED_NAMES = ("cookie", "grpc-timeout", re.compile(_GRPC_TIMEOUT.pattern.decode()))


# What h2 made of inbound header lists (normalized, validated, decoded), by list and the
# flags h2 checked them with; and the calls purerpc parsed from the decoded lists.
_H2_HEADERS = _Memo()
_REQUESTS = _Memo()


# Header blocks of indexed fields only, at most this long, are remembered per connection, at
# most _DECODED_BLOCKS of them (the issue-9 bounds: a few KiB per connection).
_DECODED_BLOCK_BYTES = 64
_DECODED_BLOCKS = 4
_INDEXED_FIELD_BYTES = bytes(range(0x80, 0x100))  # first bytes of an indexed field (RFC 7541 6.1)


class _Decoder(hpack.Decoder):  # type: ignore[misc]
    """hpack's decoder, remembering what a header block made only of indexed fields (one byte
    each) decoded to. Such a block changes nothing of the decoder's state, so it decodes to
    the same list until a block that may change the dynamic table arrives (any other kind of
    field, or a table size update), which forgets them all. A client sends the same block for
    each call once its headers are in the table (grpcio does, for calls without a deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[tuple[bytes, bool, int, int], list[Any]] = {}

    def decode(self, data: bytes | memoryview, raw: bool = False) -> list[Any]:
        data = bytes(data)
        key = (data, raw, self.max_header_list_size, self.max_allowed_table_size)
        blocks = self._blocks
        seen = blocks.get(key)
        if seen is not None:
            return list(seen)
        headers: list[Any] = super().decode(data, raw)
        if data.translate(None, _INDEXED_FIELD_BYTES):  # not indexed fields only
            blocks.clear()
        elif len(data) <= _DECODED_BLOCK_BYTES:
            if len(blocks) >= _DECODED_BLOCKS:
                blocks.clear()
            blocks[key] = list(headers)
        return headers


class _H2Connection(h2.connection.H2Connection):  # type: ignore[misc]  # h2 is untyped
    """h2 3.2's connection, ignoring a WINDOW_UPDATE on a stream it has closed and already
    forgotten. RFC 7540 §5.1 says such frames MUST be ignored; h2 3.2 made them a connection
    error, so a busy grpcio connection (which acknowledges data after the trailers arrive)
    lost every call on it. purerpc's monkeypatch covers only streams h2 still remembers.

    Its streams check an inbound header list they have seen before (but for the deadline's
    digits) once: h2's own pipeline ran on it the first time and passed (`_H2_HEADERS`); and
    its decoder decodes a repeated block of indexed fields once (`_Decoder`)."""

    decoder: Any  # h2's, replaced by ours

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        decoder = _Decoder()
        decoder.max_header_list_size = self.decoder.max_header_list_size
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        self.decoder = decoder

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        full = stream._process_received_headers

        def process_received_headers(headers: Any, flags: Any, encoding: Any) -> list[Any]:
            found = _memo_key(headers) if encoding == "utf-8" else None
            if found is None:
                result: list[Any] = full(headers, flags, encoding)
                return result
            key, timeout_at = found
            memo_key = (flags, key)
            done = _H2_HEADERS.entries.get(memo_key)
            if done is None:
                done = full(headers, flags, encoding)
                _H2_HEADERS.put(memo_key, done)
            out = list(done)
            if timeout_at >= 0:  # the one value that may differ, and passes what it passed
                out[timeout_at] = hpack.HeaderTuple("grpc-timeout", headers[timeout_at][1].decode())
            return out

        stream._process_received_headers = process_received_headers
        return stream

    def _receive_window_update_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            frames_events: tuple[list[Any], list[Any]] = super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:  # closed; NoSuchStreamError (idle) propagates
            return [], []
        return frames_events


class _ServerConnection(GRPCConnection):  # type: ignore[misc]
    """purerpc's sans-IO gRPC-over-h2 connection with jobd's limits, per-stream handling of
    resets and oversized messages, exact flow-control accounting, and spec-conform status
    messages."""

    def __init__(
        self, config: GRPCConfiguration, *, max_concurrent_streams: int, connection_window: int
    ) -> None:
        # Read by _set_h2_connection_local_settings, which purerpc's __init__ calls.
        self._max_concurrent_streams = max_concurrent_streams
        # A stream's window must hold one whole message: its bytes are acknowledged only once the
        # message is complete and its handler takes it. purerpc grants twice its 32 MiB limit.
        self._stream_window = config.max_message_length + _GRPC_FRAME_HEADER
        self._connection_window = max(connection_window, self._stream_window)
        # Flow-controlled bytes received per stream and not yet given back to the peer.
        self._unacked: dict[int, int] = {}
        super().__init__(config)
        self.malformed_requests = 0  # streams reset for malformed request headers
        # purerpc's __init__ made a plain H2Connection; redo its setup on ours.
        self.h2_connection = _H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    def _set_h2_connection_local_settings(self) -> None:
        # purerpc advertises 65,536 concurrent streams and 16 MiB frames; keep h2's frame default.
        codes = h2.settings.SettingCodes
        self.h2_connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self._max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: self._stream_window,
                codes.MAX_HEADER_LIST_SIZE: self.MAX_HEADER_LIST_SIZE,
            },
        )

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        # purerpc opens the connection window by 1 GiB; open it only as far as the limits say.
        self.h2_connection.increment_flow_control_window(
            self._connection_window - _H2_DEFAULT_WINDOW
        )

    def _request_received(self, event: h2.events.RequestReceived) -> list[Event]:
        """purerpc's, but a malformed request (bad path, content type, grpc-timeout, END_STREAM
        on the headers) resets that stream only: purerpc's ProtocolError closed the caller's
        whole connection, with every other call on it."""
        found = None if event.stream_ended else _memo_key(event.headers, decoded=True)
        if found is not None:
            request = _REQUESTS.entries.get(found[0])
            if request is not None:  # parsed before, and accepted: a copy for this stream
                copy = RequestReceived.__new__(RequestReceived)
                copy.__dict__.update(request.__dict__)
                copy.stream_id = event.stream_id
                if found[1] >= 0:
                    copy.timeout = _grpc_timeout(event.headers[found[1]][1])
                self.message_read_buffers[event.stream_id] = _UncompressedReadBuffer(
                    None, self.config.max_message_length
                )
                return [copy]
        try:
            events: list[Event] = super()._request_received(event)
        except Exception as exc:  # purerpc's ProtocolError, or e.g. int() of a bad grpc-timeout
            log.debug("stream %d: malformed request: %s", event.stream_id, exc)
            self.malformed_requests += 1
            self.message_read_buffers.pop(event.stream_id, None)
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2_connection.reset_stream(
                    event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR
                )
            return []
        self.message_read_buffers[event.stream_id] = _UncompressedReadBuffer(
            None, self.config.max_message_length
        )
        if found is not None and len(events) == 1:
            kept = RequestReceived.__new__(RequestReceived)
            kept.__dict__.update(events[0].__dict__)
            _REQUESTS.put(found[0], kept)
        return events

    def _data_received(self, event: h2.events.DataReceived) -> list[Event]:
        stream_id = event.stream_id
        if stream_id not in self.message_read_buffers:
            # A call that was refused, rejected or has finished: nobody will read these bytes,
            # so give them back now or the connection window would shrink for good.
            if event.flow_controlled_length:
                self.h2_connection.acknowledge_received_data(
                    event.flow_controlled_length, stream_id
                )
            return []
        self._unacked[stream_id] = self._unacked.get(stream_id, 0) + event.flow_controlled_length
        try:
            events: list[Event] = super()._data_received(event)
        except MessageTooLargeError:
            del self.message_read_buffers[stream_id]  # drop what is buffered and what follows
            return [MessageTooLarge(stream_id)]
        except _Compressed:
            del self.message_read_buffers[stream_id]
            return [MessageCompressed(stream_id)]
        return events

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        left = self._unacked.get(stream_id, 0) - flow_controlled_length
        if left > 0:
            self._unacked[stream_id] = left
        else:
            self._unacked.pop(stream_id, None)
        super().acknowledge_received_data(stream_id, flow_controlled_length)

    def release_stream(self, stream_id: int) -> None:
        """Forget a stream's buffers and give back every byte it received but nobody read."""
        self.message_read_buffers.pop(stream_id, None)
        unacked = self._unacked.pop(stream_id, 0)
        if unacked:
            self.h2_connection.acknowledge_received_data(unacked, stream_id)

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Event]:
        return [StreamReset(event.stream_id, event.error_code)]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Event]:
        return [PeerGoAway(event.error_code)]

    def respond_status(
        self,
        stream_id: int,
        status: Status,
        content_type_suffix: str = "",
        custom_metadata: Any = (),
    ) -> None:
        # purerpc's own, but with the gRPC percent-encoding (row 5).
        headers = [
            (":status", "200"),
            ("content-type", "application/grpc" + content_type_suffix),
            ("grpc-accept-encoding", ACCEPT_ENCODING),
            *self._status_headers(status),
            *sanitize_headers(custom_metadata),
        ]
        self.h2_connection.send_headers(stream_id, headers, end_stream=True)

    def start_response(
        self, stream_id: int, content_type_suffix: str = "", custom_metadata: Any = ()
    ) -> None:
        if content_type_suffix == "+proto" and not custom_metadata and self._plain_responses():
            self._send_constant_headers(stream_id, _RESPONSE_START_BLOCK, end_stream=False)
        else:
            super().start_response(stream_id, content_type_suffix, custom_metadata)

    def end_response(self, stream_id: int, status: Status, custom_metadata: Any = ()) -> None:
        plain_ok = status.status_code is StatusCode.OK and not status.status_message
        if plain_ok and not custom_metadata:
            self._send_constant_headers(stream_id, _OK_TRAILERS_BLOCK, end_stream=True)
            return
        headers = [*self._status_headers(status), *sanitize_headers(custom_metadata)]
        self.h2_connection.send_headers(stream_id, headers, end_stream=True)

    def _plain_responses(self) -> bool:
        # purerpc adds grpc-encoding headers only when configured with an encoding; the block
        # carries the accept-encoding the server is configured with (`_Dispatcher`).
        return self.config._message_encoding is None and (
            self.config._message_accept_encoding == ACCEPT_ENCODING
        )

    def _send_constant_headers(self, stream_id: int, block: bytes, *, end_stream: bool) -> None:
        """What h2's send_headers does for a header block we encoded once (state checks, the
        same errors), minus the encoding and the validation of our own constant headers."""
        h2c = self.h2_connection
        h2c.state_machine.process_input(_CONN_SEND_HEADERS)
        stream = h2c.streams[stream_id]  # the client opened it: it exists
        stream.state_machine.process_input(_STREAM_SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(_STREAM_SEND_END_STREAM)
            flags |= _END_STREAM
        frame = _FRAME_HEADER.pack(len(block) >> 8, len(block) & 0xFF, _HEADERS, flags, stream_id)
        h2c._data_to_send += frame + block

    @staticmethod
    def _status_headers(status: Status) -> list[tuple[str, str]]:
        headers = [("grpc-status", str(status.int_value))]
        if status.status_message:
            headers.append(("grpc-message", percent_encode_grpc_message(status.status_message)))
        return headers


# --------------------------------------------------------------------------------------------
# The socket: outbound queue, reader, streams
# --------------------------------------------------------------------------------------------


class _BoundedSocket(SocketWrapper):  # type: ignore[misc]
    """purerpc's SocketWrapper (socket options, reads, one writer task) with a bounded outbound
    queue. purerpc's flush() only woke the writer: a handler producing faster than the peer
    reads queued without limit and never yielded (row 8). Here bytes move from h2 into our own
    queue, and flush() yields, then waits while more than `max_queued` bytes await the socket."""

    _flush_event: trio.Event  # purerpc's: set to wake the writer

    def __init__(
        self,
        connection: _ServerConnection,
        stream: anyio.abc.ByteStream,
        *,
        max_queued: int,
        on_broken: Callable[[], None],
        budget: OutboundBudget,
        user: str,
    ) -> None:
        super().__init__(connection, stream)
        self._budget = budget
        self._user = user  # whose budget share this connection's bytes count against
        # Reserved by this connection's streaming calls and not stalled on flow control: what
        # may still reach the queue soon.
        self.active = 0
        # trio's own Event: anyio's looks up the running backend on every creation.
        self._flush_event = trio.Event()
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self.queued = 0  # bytes not yet handed to the TLS stream
        self._max_queued = max_queued
        self._drained = trio.lowlevel.ParkingLot()  # `wait_queued_at_most`'s waiters
        # Streams waiting for room to reserve their next message: woken one at a time (by each
        # write, unreserve or stall, and by one that reserved and left room), since each takes
        # up to a message of room; 25 woken per write cost more than the write (issue 12).
        self._room = trio.lowlevel.ParkingLot()
        self._on_broken = on_broken
        self.broken = False
        # Streams ended by the server that are finishing their message (ServerStream.abort).
        self.finishing: set[ServerStream] = set()
        # The writer waits for something to write: nothing of ours is in the TLS stream.
        self._writer_idle = False
        # The reader is queueing what one read brought about: it wakes the writer (or sends
        # it itself) once done (`hold`, `release`).
        self._holding = False

    def _append(self, data: bytes | memoryview) -> None:
        self._chunks.append(data)
        self.queued += len(data)
        self._budget.take(self._user, len(data))
        if not self._holding:
            self._flush_event.set()

    def hold(self) -> None:
        """The reader is about to queue what a read brought about (answers, h2's acks): the
        writer is not woken for them until `release`."""
        self._holding = True

    def release(self) -> None:
        """What the reader queued since `hold` goes out: sent by the reader itself when the
        writer is idle and it is small (one call back to back: issue 12, a writer wake and
        two scheduler passes less per call, and the answer leaves before the reader reads
        on); else the writer is woken for it. Never waits: a send that the kernel could not
        take whole is left to the writer (`TrioByteStream.send_now`)."""
        self._holding = False
        if getattr(self._stream, "unsent", False):  # the TLS stream owes the peer bytes
            self._flush_event.set()
        if not self._chunks:
            return
        send_now = getattr(self._stream, "send_now", None)
        size = self.queued
        if self._writer_idle and size <= _SEND_NOW_MAX and not self.broken and send_now:
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                sent = send_now(bytes(data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._lose()
                return
            if sent:
                chunks.clear()
                self._written(size)
                if self._stream.unsent:
                    self._flush_event.set()
                return
        self._flush_event.set()

    def _lose(self) -> None:
        self.broken = True
        self._drained.unpark_all()
        self._room.unpark_all()
        self._on_broken()
        write_deferred()

    def _written(self, size: int) -> None:
        """`size` queued bytes are in the socket."""
        # The audit lines of the calls just answered: after their response, not before it.
        write_deferred()
        self.queued -= size
        self._budget.give(self._user, size)
        if self.queued <= self._max_queued:
            self._drained.unpark_all()
            self._room.unpark()
        for stream in self.finishing:
            stream.extend_grace()

    async def reserve(self, stream: ServerStream) -> int:
        """Wait until `stream` may produce its next message, then reserve it (its body limit,
        returned, and MESSAGE_FRAMING) of the budgets until it is sent (`unreserve`): its
        window is open; this connection's queue has room (or holds nothing at all); and,
        unless its peer has acknowledged its data before, the server's and the user's budgets
        have room. So a call whose peer reads nothing holds at most one small message, and
        only within budget."""
        budget = self._budget
        body = SMALL_MESSAGE
        size = body + MESSAGE_FRAMING
        _calling.set(stream)
        woken = False  # by `_room`: a wake-up to pass on if this stream does not use it
        try:
            while not self.broken:  # broken: the connection's scope is cancelled already
                window = stream.send_window
                if window <= 0:
                    woken = self._pass_room(woken)
                    await stream._wait_flow_control_update()
                    continue
                large = stream.peer_acknowledged and budget.has_room(
                    self._user, LARGE_MESSAGE + MESSAGE_FRAMING
                )
                body = _message_body_limit(window, large)
                size = body + MESSAGE_FRAMING
                idle = self.queued == 0 and self.active == 0
                if not idle and self.queued + self.active + size > self._max_queued:
                    woken = False
                    await self._room.park()
                    woken = True
                    continue
                if not stream.peer_acknowledged and not budget.has_room(self._user, size):
                    woken = self._pass_room(woken)
                    await budget.wait()
                    continue
                break
        finally:
            self._pass_room(woken)
        self.active += size
        budget.take(self._user, size)
        stream.reserved = size
        stream.room_held = True
        if self.queued + self.active < self._max_queued:
            self._room.unpark()  # room left: the next waiter may fit
        return body

    def _pass_room(self, woken: bool) -> bool:
        """A stream woken to reserve that does not (it waits for something else, or leaves)
        wakes the next in its place."""
        if woken:
            self._room.unpark()
        return False

    def stalled(self, stalled: bool, size: int) -> None:
        """A stream holding a reservation of `size` waits on flow control (or resumes): while
        it waits, it cannot fill the queue, so it does not count against the connection's
        room; it still counts against the budgets (it holds the message)."""
        self.active += -size if stalled else size
        if stalled:
            self._room.unpark()

    def unreserve(self, stream: ServerStream) -> None:
        if stream.reserved:
            size, stream.reserved = stream.reserved, 0
            if stream.room_held:
                self.active -= size
                stream.room_held = False
            self._budget.give(self._user, size)
            self._room.unpark()

    async def __aexit__(self, *exc_info: object) -> bool | None:
        try:
            result: bool | None = await super().__aexit__(*exc_info)
        finally:
            if self.queued:
                self._budget.give(self._user, self.queued)  # never to be sent
            self.queued = 0
            self._chunks.clear()
        return result

    def kick(self) -> None:
        """Queue whatever h2 has produced and wake the writer; never blocks (the reader uses it:
        a peer that does not read must not stop us reading its resets and window updates)."""
        data = self._grpc_connection.data_to_send()
        if data:
            self._append(data)

    def append_frame(self, header: bytes, *payload: bytes | memoryview) -> None:
        """Queue a frame built outside h2 (the caller has flushed h2's own bytes first)."""
        self._append(header)
        for piece in payload:
            self._append(piece)

    def send_raw(self, frame: bytes) -> None:
        """Queue a frame built outside h2, after everything h2 has produced so far."""
        self.kick()
        self._append(frame)

    async def flush(self) -> None:
        self.kick()
        await trio.lowlevel.checkpoint()  # a cancellation point, and fairness for a busy handler
        await self.wait_queued_at_most(self._max_queued)

    async def flush_at_end(self) -> None:
        """`flush` for a call's last bytes (its status): a cancellation point, but no yield
        while the queue has room. The call's task ends next, so a yield for fairness would only
        cost a task switch per call. A small end (a unary answer: headers, message, trailers)
        is sent by the call's own task when the writer is idle, as the reader sends what it
        answers (`release`): the writer's wake and its two scheduler passes came between a
        Start's handler and its answer's send, with whatever tasks trio ran in between (the
        ended job's, the pool's: 0.8-2.5 ms of a spaced Start, issue 12). Nothing yields
        between `hold` and `release`, so the reader cannot be holding meanwhile."""
        self.hold()
        try:
            self.kick()
        finally:
            self.release()
        if self.queued > self._max_queued:
            await self.wait_queued_at_most(self._max_queued)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def wait_queued_at_most(self, limit: int) -> None:
        while self.queued > limit and not self.broken:
            await self._drained.park()
        # If broken, the connection's scope is already cancelled: the caller's next checkpoint
        # ends it, so there is nothing to raise here.

    async def _writer_thread(self) -> None:  # purerpc's name; started by SocketWrapper.__aenter__
        while True:
            if getattr(self._stream, "unsent", False):  # left by the reader's `release`
                try:
                    await self._stream.flush_unsent()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._lose()
                    return
            elif self._chunks:
                size, data, body = self._next_write()
                try:
                    if body is None:
                        await self._stream.send(data)
                    elif (send_pair := getattr(self._stream, "send_pair", None)) is not None:
                        await send_pair(data, body)
                    else:
                        await self._stream.send(data)
                        await self._stream.send(body)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._lose()
                    return
                self._written(size)
            elif self._running:
                self._writer_idle = True
                try:
                    await self._flush_event.wait()
                finally:
                    self._writer_idle = False
                self._flush_event = trio.Event()
            else:
                return

    def _next_write(self) -> tuple[int, bytes | memoryview, bytes | memoryview | None]:
        """The next socket write: a big piece (a large message's body) as it is, or smaller
        pieces joined up to _WRITE_BATCH; and when those are followed by a big piece, that piece
        too, separately (the stream encrypts both and sends them at once: `send_pair`). Never
        copies a big piece: TLS encrypts straight from it. Returns (bytes in all, the piece,
        the big piece after it or None)."""
        chunks = self._chunks
        first = chunks.popleft()
        if len(first) >= _WRITE_ALONE:
            return len(first), first, None
        batch = [first]
        size = len(first)
        while chunks and len(chunks[0]) < _WRITE_ALONE and size + len(chunks[0]) <= _WRITE_BATCH:
            batch.append(chunks.popleft())
            size += len(batch[-1])
        joined = first if len(batch) == 1 else b"".join(batch)
        if chunks and len(chunks[0]) >= _WRITE_ALONE:
            body = chunks.popleft()
            return size + len(body), joined, body
        return size, joined, None


class ServerStream(GRPCProtoStream):  # type: ignore[misc]
    """One call. Its handler task runs inside `cancel_scope`; the reader cancels that when the
    peer resets the stream (row 6), the connection when the call must end early (`abort`)."""

    _start_stream_event: Event | None  # purerpc's: the call's RequestReceived
    _end_stream_event: Event | None  # purerpc's: its RequestEnded

    def __init__(
        self,
        grpc_connection: _ServerConnection,
        stream_id: int,
        socket: _BoundedSocket,
        grpc_socket: ServerSocket,
    ) -> None:
        # purerpc's GRPCStream.__init__ without its per-call anyio objects (an Event, which
        # looks the backend up, and a memory channel pair): the reader's events wait in a
        # deque, and a waiter or a window wait makes its trio.Event only when it must wait.
        self._stream_id = stream_id
        self._grpc_connection = grpc_connection
        self._grpc_socket = grpc_socket
        self._socket = socket
        self._response_started = False
        self._state = GRPCStreamState.OPEN
        self._start_stream_event = None
        self._end_stream_event = None
        self._incoming: collections.deque[Event] = collections.deque()
        self._incoming_waiter: trio.Event | None = None
        self._window_waiter: trio.Event | None = None
        self.cancel_scope = trio.CancelScope()
        # What to answer once cancelled; None when nothing can be (the peer reset the stream).
        self.abort_status: Status | None = None
        self.reset_by_peer = False
        self.mid_message = False
        self._abort_at_boundary = False
        self._abort_limit = math.inf
        self.reserved = 0  # bytes of the outbound budgets reserved (`reserve`), or 0
        # Whether `reserved` counts against the connection's room now (not while the call
        # waits for its handler or for flow control).
        self.room_held = False
        self.reports_waits = False  # its handler says when it waits (`report_waits`)
        # The peer has sent a WINDOW_UPDATE for this stream: it reads what it is sent.
        self.peer_acknowledged = False

    def abort(self, status: Status) -> None:
        if self.abort_status is None and not self.reset_by_peer:
            self.abort_status = status
        if self.mid_message:
            # Cut now, the client would get half a message and a reset, which it reports as
            # CANCELLED (as if it had cancelled itself): end at the message's end instead, so
            # that the status follows. A peer that does not read is cut after a short bound.
            if not self._abort_at_boundary:
                self._abort_at_boundary = True
                self._abort_limit = trio.current_time() + _MESSAGE_END_LIMIT
                self._socket.finishing.add(self)
            self.extend_grace()
        else:
            self.cancel_scope.cancel()

    def extend_grace(self) -> None:
        """The peer is reading: the message being finished gets _MESSAGE_END_GRACE again."""
        self.cancel_scope.deadline = min(
            trio.current_time() + _MESSAGE_END_GRACE, self._abort_limit
        )

    def peer_reset(self) -> None:
        self.reset_by_peer = True
        self.abort_status = None
        self.cancel_scope.cancel()

    @property
    def can_respond(self) -> bool:
        """True while a status can still be sent: not reset, not closed by us, not cut off in
        the middle of a message."""
        return (
            not self.reset_by_peer
            and not self.mid_message
            and self.state
            in (
                GRPCStreamState.OPEN,
                GRPCStreamState.HALF_CLOSED_REMOTE,
            )
        )

    @property
    def send_window(self) -> int:
        """Bytes the peer's flow-control windows let this stream send now."""
        try:
            window: int = self._grpc_connection.h2_connection.local_flow_control_window(
                self._stream_id
            )
        except (h2.exceptions.NoSuchStreamError, KeyError):  # StreamClosedError too
            return 0  # reset or closed: the call's cancellation is on its way
        return window

    async def reserve(self) -> int:
        """Wait until this call may produce its next message (see `_BoundedSocket.reserve`);
        returns how many bytes of body it may carry."""
        body: int = await self._socket.reserve(self)
        return body

    def unreserve(self) -> None:
        self._socket.unreserve(self)

    def set_waiting(self, waiting: bool) -> None:
        """The call waits for its handler's next message (a follow, for new output), holding
        its reservation: it cannot fill the queue meanwhile. A handler that reports its own
        waits (`report_waits`) is taken at its word instead."""
        if not (waiting and self.reports_waits):
            self.hold_room(not waiting)

    def waiting_for_input(self, waiting: bool) -> None:
        """`report_waits`'s function: the handler waits (True) for something other than its
        connection, or is done waiting (False)."""
        self.hold_room(not waiting)

    def hold_room(self, hold: bool) -> None:
        """Count the reservation against the connection's room (True), or not (False)."""
        if self.reserved and self.room_held != hold:
            self.room_held = hold
            self._socket.stalled(not hold, self.reserved)

    async def _wait_flow_control_update(self) -> None:
        """Until the peer's next WINDOW_UPDATE for this stream or the connection. Its callers
        look at the window first, with no yield in between: an update can never come between
        that look and this wait. A wait in the middle of a message while holding a
        reservation is a stall."""
        held = self.room_held and self.reserved
        if held:
            self.hold_room(False)
        try:
            self._window_waiter = waiter = trio.Event()
            await waiter.wait()
        finally:
            self._window_waiter = None
            if held:
                self.hold_room(True)

    def wake_for_window(self) -> None:
        if self._window_waiter is not None:
            self._window_waiter.set()

    def deliver(self, event: Event) -> None:
        self._incoming.append(event)
        if self._incoming_waiter is not None:
            self._incoming_waiter.set()

    async def receive_event(self) -> Event:
        """purerpc's (GRPCProtoStream's, which calls GRPCStream._receive by name), without its
        two yields per event: an event the reader has queued already (a unary request's
        headers, message and end arrive together) is taken at once, still a cancellation point
        (a reset stream's handler stops here as before); and the window acknowledgement is
        handed to the writer without a flush (h2 only produces a WINDOW_UPDATE once half a
        window is used)."""
        event = await self._receive_queued()
        message_type = getattr(self, "_incoming_message_type", None)
        if isinstance(event, MessageReceived) and message_type is not None:
            binary_data = event.data
            event.data = message_type()
            event.data.ParseFromString(binary_data)
        return event

    async def _receive_queued(self) -> Event:
        incoming = self._incoming
        if incoming:
            await trio.lowlevel.checkpoint_if_cancelled()
        while not incoming:
            self._incoming_waiter = waiter = trio.Event()
            try:
                await waiter.wait()
            finally:
                self._incoming_waiter = None
        event = incoming.popleft()
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(
                self._stream_id, event.flow_controlled_length
            )
            self._socket.kick()
        elif isinstance(event, RequestEnded):
            assert self._end_stream_event is None
            self._end_stream_event = event
        else:
            assert self._start_stream_event is None
            self._start_stream_event = event
        return event

    async def close(
        self, status: Status, content_type_suffix: str = "", custom_metadata: Any = ()
    ) -> None:
        """purerpc's GRPCStream.close (server side): the trailers, or the status alone if no
        response was started; its flush yields only when the queue is full (`flush_at_end`)."""
        if self._state in (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED):
            raise TypeError("Closing already closed stream")
        self._close_local()
        if self._response_started:
            self._grpc_connection.end_response(self._stream_id, status, custom_metadata)
        else:
            self._grpc_connection.respond_status(
                self._stream_id, status, content_type_suffix, custom_metadata
            )
        await self._socket.flush_at_end()

    def queue_response_start(self) -> None:
        """`start_response` without its flush: the headers leave with the first message (or the
        trailers), in the same socket write."""
        self._grpc_connection.start_response(self._stream_id, "+proto")
        self._response_started = True

    async def send_message(self, message: Any, *, flush: bool = True) -> None:
        """Send one message (a protobuf message or a `FramedMessage`). flush=False leaves its
        last bytes queued for the caller's next flush (a unary response's `close`), so headers,
        message and trailers go out at once."""
        # Remembered so that a call cut short mid-message is reset rather than given trailers
        # after half a message.
        self.mid_message = True
        # Not super().send_message: it calls GRPCStream._send by name, past our _send.
        if isinstance(message, FramedMessage):
            await self._send_parts(message.head, message.body, flush_last=flush)
        else:
            await self._send_parts(message.SerializeToString(), b"", flush_last=flush)
        self.mid_message = False
        if self._abort_at_boundary:
            self._socket.finishing.discard(self)
            self.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()  # raises Cancelled here, before another message

    async def _send(self, message: bytes, compress: bool = False, flush_last: bool = True) -> None:
        if compress:
            await super()._send(message, compress)
        else:
            await self._send_parts(message, b"", flush_last=flush_last)

    async def _send_parts(
        self, head: bytes, body: bytes | memoryview, *, flush_last: bool = True
    ) -> None:
        """Send the message `head + body` without copying `body`. purerpc handed h2 one DATA frame
        (16 KiB by default) at a time and yielded to the writer after each, which capped a
        stream at ~100 MB/s; and h2 copies each frame three times. Here each turn frames as
        much as the flow-control windows allow, up to _SEND_BATCH, as frames of the peer's
        maximum size whose payloads are slices of the message (h2's state checks and window
        accounting done as its send_data does), then flushes once (which applies the outbound
        cap; the last flush is left to the caller if not flush_last)."""
        conn = self._grpc_connection
        total = len(head) + len(body)
        if total > conn.config.max_message_length:
            raise MessageTooLargeError(
                f"message of {total} bytes is over the limit of {conn.config.max_message_length}"
            )
        h2c = conn.h2_connection
        stream_id = self._stream_id
        # The gRPC message prefix and the head are small: one piece; the body is never copied.
        parts = [memoryview(_GRPC_PREFIX.pack(False, total) + head)]
        if body:
            parts.append(memoryview(body).cast("B"))
        left = _GRPC_FRAME_HEADER + total
        index = 0  # parts[index][offset:] is what is left to send
        offset = 0
        while left:
            window = h2c.local_flow_control_window(stream_id)
            if window <= 0:
                await self._wait_flow_control_update()
                continue
            budget = min(window, _SEND_BATCH, left)
            max_frame = h2c.max_outbound_frame_size
            self._socket.kick()  # h2's own frames (the response headers) go first
            while budget:
                size = min(budget, max_frame)
                _debit_data_frame(h2c, stream_id, size)
                pieces = []
                need = size
                while need:
                    part = parts[index]
                    take = min(need, len(part) - offset)
                    pieces.append(part[offset : offset + take])
                    need -= take
                    offset += take
                    if offset == len(part):
                        index += 1
                        offset = 0
                self._socket.append_frame(_data_frame_header(stream_id, size), *pieces)
                budget -= size
                left -= size
            if flush_last or left:
                await self._socket.flush()

    def close_channels(self) -> None:
        """Drop what the reader queued and nobody read (the call has ended)."""
        self._incoming.clear()


def _whole_request(events: list[Event], i: int) -> tuple[int, int] | None:
    """Where the message and the end of the request that events[i] starts are, if they follow
    it in `events` with nothing but window updates in between (grpcio sends WINDOW_UPDATEs
    between a request's HEADERS and DATA): a unary request that arrived whole."""
    stream_id = events[i].stream_id
    found = []
    count = len(events)
    for kind in (MessageReceived, RequestEnded):
        i += 1
        while i < count and type(events[i]) is WindowUpdated:
            i += 1
        if i == count or type(events[i]) is not kind or events[i].stream_id != stream_id:
            return None
        found.append(i)
    return found[0], found[1]


class ReaderEnd(enum.Enum):
    """Why `ServerSocket.run_reader` returned."""

    PEER_GONE = "peer closed or broke the connection"
    PEER_GOAWAY = "peer sent GOAWAY"
    PROTOCOL_ERROR = "peer broke the protocol"


class ServerSocket(GRPCProtoSocket):  # type: ignore[misc]
    """One server-side HTTP/2 connection: purerpc's GRPCSocket with jobd's connection and
    socket wrapper, and a reader that routes resets, oversized messages and streams refused
    after GOAWAY instead of purerpc's `listen()`.

        async with ServerSocket(config, byte_stream, ...) as sock:   # writer runs, SETTINGS sent
            await sock.run_reader(start_call)                          # until the peer is done
    """

    StreamClass = ServerStream

    def __init__(
        self,
        config: GRPCConfiguration,
        stream: anyio.abc.ByteStream,
        *,
        max_concurrent_streams: int,
        connection_window: int,
        max_queued: int,
        on_broken: Callable[[], None],
        budget: OutboundBudget,
        user: str = "",
    ) -> None:
        super().__init__(config, stream, receive_buffer_size=_RECEIVE_SIZE)
        # purerpc's __init__ builds its own connection and socket wrapper; use jobd's.
        self._grpc_connection = _ServerConnection(
            config,
            max_concurrent_streams=max_concurrent_streams,
            connection_window=connection_window,
        )
        self._socket = _BoundedSocket(
            self._grpc_connection,
            stream,
            max_queued=max_queued,
            on_broken=on_broken,
            budget=budget,
            user=user,
        )
        self._max_queued = max_queued
        self._streams: dict[int, ServerStream]
        self._goaway_last_stream_id: int | None = None

    @property
    def queued_bytes(self) -> int:
        """Outbound bytes not yet handed to the TLS stream (row 8's cap applies to this)."""
        return self._socket.queued

    @property
    def h2(self) -> Any:
        return self._grpc_connection.h2_connection

    async def run_reader(
        self,
        start_call: Callable[[ServerStream], None],
        answer_now: Callable[[RequestReceived, MessageReceived], bool] | None = None,
    ) -> ReaderEnd:
        """Read and route frames until the peer is gone, leaves, or breaks the protocol.
        `start_call(stream)` must start the call's handler; it is called synchronously. A
        request that arrived whole in one read (its headers, one message and its end, with
        only window updates in between) is first offered to `answer_now(request, message)`,
        also synchronous: True if it has taken the call (answered it, or started it), False
        to have it routed as any other."""
        while True:
            await self._socket.wait_queued_at_most(_READER_QUEUE_FACTOR * self._max_queued)
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return ReaderEnd.PEER_GONE
            # Calls answered so far have their audit lines written before the next is read,
            # whether or not their responses could be written yet.
            write_deferred()
            self._socket.hold()
            try:
                end = self._receive(data, start_call, answer_now)
            finally:
                self._socket.kick()  # refusals and resets _route produced, answers made here
                self._socket.release()
            if end is not None:
                return end

    def _receive(
        self,
        data: bytes,
        start_call: Callable[[ServerStream], None],
        answer_now: Callable[[RequestReceived, MessageReceived], bool] | None,
    ) -> ReaderEnd | None:
        """Route what one read brought; why the reader must stop, or None."""
        try:
            events = self._grpc_connection.receive_data(data)
        except Exception as exc:  # h2's or purerpc's ProtocolError, a malformed header
            log.debug("closing connection: %s: %s", type(exc).__name__, exc)
            # h2 has queued a GOAWAY for its own errors; purerpc's need one.
            if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self.h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return ReaderEnd.PROTOCOL_ERROR
        self._socket.kick()  # SETTINGS/PING acks, window updates
        taken: set[int] = set()  # a message and end `answer_now` has dealt with
        for i, event in enumerate(events):
            if isinstance(event, PeerGoAway):
                return ReaderEnd.PEER_GOAWAY
            if i in taken:
                continue
            if (
                answer_now is not None
                and type(event) is RequestReceived
                and self._goaway_last_stream_id is None
            ):
                found = _whole_request(events, i)
                if found is not None and answer_now(event, events[found[0]]):
                    taken.update(found)
                    continue
            self._route(event, start_call)
        return None

    def _route(self, event: Event, start_call: Callable[[ServerStream], None]) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for each in self._streams.values():
                    each.wake_for_window()
            elif stream is not None:
                stream.peer_acknowledged = True
                stream.wake_for_window()
        elif isinstance(event, RequestReceived):
            last = self._goaway_last_stream_id
            if last is not None and event.stream_id > last:
                # Opened after our GOAWAY: refused, so the client may safely retry it elsewhere.
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                self._grpc_connection.release_stream(event.stream_id)
                return
            new = self._allocate_stream(event.stream_id)
            new.deliver(event)
            start_call(new)
        elif isinstance(event, (MessageReceived, RequestEnded)):
            if stream is None:  # finished or reset meanwhile; keep the window accounting whole
                self._grpc_connection.release_stream(event.stream_id)
                return
            stream.deliver(event)
            if isinstance(event, RequestEnded):
                stream._close_remote()
        elif isinstance(event, StreamReset):
            if stream is not None:
                del self._streams[event.stream_id]
                stream.peer_reset()
        elif isinstance(event, MessageCompressed):
            if stream is not None:
                stream.abort(
                    Status(
                        StatusCode.UNIMPLEMENTED,
                        "compressed request messages are not supported: send them "
                        f"uncompressed (grpc-accept-encoding: {ACCEPT_ENCODING})",
                    )
                )
        elif isinstance(event, MessageTooLarge):
            if stream is not None:
                limit = self._grpc_connection.config.max_message_length
                stream.abort(
                    Status(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"request message is larger than the server's limit of {limit} bytes",
                    )
                )

    def can_answer(self, stream_id: int) -> bool:
        """Whether a unary call on `stream_id`, whose request has arrived whole, may be
        answered at once (`answer_unary`) if its answer is small: the connection and the
        stream are open for sending (not reset, no GOAWAY either way), the windows are open
        and the outbound queue has room. Cheap; `answer_unary` checks the exact sizes."""
        h2c = self.h2
        if h2c.state_machine.state is _H2_CLOSED:
            return False
        stream = h2c.streams.get(stream_id)
        return (
            stream is not None
            and stream.state_machine.state is _HALF_CLOSED_REMOTE
            and h2c.local_flow_control_window(stream_id) > _GRPC_FRAME_HEADER
            and self._socket.queued + _ANSWER_HEADROOM <= self._max_queued
        )

    def answer_unary(self, stream_id: int, body: bytes | None, status: Status) -> bool:
        """Queue the whole answer of a unary call whose request has arrived whole, without a
        stream object and without waiting: the response headers, the message `body` (if not
        None) in one DATA frame, the trailers with `status`, as the call's task would send
        them. False, with nothing done, when that cannot be done without waiting (or not at
        all): the stream or the connection is no longer open for sending, the message does
        not fit the flow-control windows, the peer's frame size or the message limit, or the
        outbound queue has no room for it (the memory bound: this never passes it)."""
        if not self.can_answer(stream_id):
            return False
        conn = self._grpc_connection
        h2c = conn.h2_connection
        size = 0
        if body is not None:
            size = _GRPC_FRAME_HEADER + len(body)
            if (
                len(body) > conn.config.max_message_length
                or size > h2c.local_flow_control_window(stream_id)
                or size > h2c.max_outbound_frame_size
                or self._socket.queued + size + _ANSWER_HEADROOM > self._max_queued
            ):
                return False
        conn.start_response(stream_id, "+proto")
        if body is not None:
            self._socket.kick()  # the headers first
            _debit_data_frame(h2c, stream_id, size)
            self._socket.append_frame(
                _data_frame_header(stream_id, size), _GRPC_PREFIX.pack(False, len(body)) + body
            )
        conn.end_response(stream_id, status)
        # Both sides have ended the stream: forget it, give back the request's window.
        conn.release_stream(stream_id)
        self._socket.kick()
        return True

    def open_stream(self, request: RequestReceived) -> ServerStream:
        """The stream object of a call whose request has arrived whole, as the reader makes it
        for a call it routes; its message is not delivered (the caller has read it)."""
        stream: ServerStream = self._allocate_stream(request.stream_id)
        stream.deliver(request)
        stream._close_remote()
        return stream

    def send_goaway(self) -> None:
        """Announce a graceful close: GOAWAY(NO_ERROR) naming the last stream we will serve.
        Calls already open go on; streams opened later are refused (`_route`)."""
        if self._goaway_last_stream_id is None:
            self._goaway_last_stream_id = self.h2.highest_inbound_stream_id
            self._socket.send_raw(goaway_frame(self._goaway_last_stream_id, 0))

    def release(self, stream: ServerStream) -> None:
        """Forget a finished call. A client still sending after our status is told to stop
        (RST_STREAM NO_ERROR, RFC 7540 §8.1); a call that ended without a status (cut short
        mid-message, or the connection is closing) is reset with CANCEL."""
        self._streams.pop(stream.stream_id, None)
        self._socket.finishing.discard(stream)
        if not stream.reset_by_peer and stream.state is not GRPCStreamState.CLOSED:
            code = h2.errors.ErrorCodes.CANCEL
            if stream.state is GRPCStreamState.HALF_CLOSED_LOCAL:
                code = h2.errors.ErrorCodes.NO_ERROR
            with contextlib.suppress(Exception):  # h2 may have closed the stream or connection
                self.h2.reset_stream(stream.stream_id, code)
        self._grpc_connection.release_stream(stream.stream_id)
        stream.close_channels()
        self._socket.kick()
