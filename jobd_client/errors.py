"""The client's one error type and the one place foreign errors become it: purerpc statuses,
socket and TLS errors, found even inside the exception groups purerpc raises on anyio 4.

    with map_errors("127.0.0.1:9090", timeout=10):
        ...  # any ClientError raised here carries one line for the user and an exit code
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import h2.exceptions
import purerpc
import trio

from ._channel import ConnectionLost, NotGrpcError

__all__ = ["ClientError", "OutputClosed", "describe", "find_cause", "map_errors"]


class ClientError(Exception):
    """A failure the user can act on: printed as one line `jobd-client: <message>`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class OutputClosed(ClientError):
    """Our stdout or stderr was closed (e.g. `jobd-client logs ID | head`): leave quietly."""

    def __init__(self) -> None:
        super().__init__("output closed", exit_code=141)  # as if killed by SIGPIPE


# Most telling first: what the server said beats how the connection failed, which beats the
# connection merely ending (a side effect of the others).
_PRIORITY: tuple[type[BaseException], ...] = (
    ClientError,
    purerpc.RpcFailedError,
    NotGrpcError,
    ssl.SSLError,
    socket.gaierror,
    ConnectionRefusedError,
    h2.exceptions.ProtocolError,
    purerpc.ProtocolError,
    trio.TooSlowError,
    ConnectionLost,
    OSError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every non-group exception in exc, with the causes of each (anyio raises a generic
    OSError "All connection attempts failed" from the real one)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
        return
    yield exc
    if exc.__cause__ is not None:
        yield from _leaves(exc.__cause__)


def find_cause(exc: BaseException) -> BaseException | None:
    """The exception in exc (a group, or one with causes) that best explains the failure;
    None when it holds nothing we know how to explain (a bug: let it surface)."""
    leaves = list(_leaves(exc))
    for kind in _PRIORITY:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return None


_TLS_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the server does not speak TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "the server does not speak TLS 1.3",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS (wrong version number)",
}


def describe(exc: BaseException, server: str, timeout: float) -> str:
    """One line that says what went wrong with the call to server."""
    if isinstance(exc, ClientError):
        return exc.message
    if isinstance(exc, purerpc.RpcFailedError):
        status = exc.status
        name = status.status_code.name
        return f"{name}: {status.status_message}" if status.status_message else name
    if isinstance(exc, NotGrpcError):
        return f"the server at {server}: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: cannot verify the server at {server}: certificate verify failed: "
            f"{exc.verify_message} (is --ca the CA that signed the server's certificate?)"
        )
    if isinstance(exc, ssl.SSLError):
        reason = _TLS_REASONS.get(exc.reason or "", (exc.reason or str(exc)).lower())
        return f"TLS with the server at {server} failed: {reason}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the server's host name in {server}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"cannot connect to the server at {server}: connection refused "
            "(is `just serve` running?)"
        )
    if isinstance(exc, h2.exceptions.ProtocolError | purerpc.ProtocolError):
        return f"the server at {server} broke the gRPC protocol ({exc}): is it a jobd server?"
    if isinstance(exc, ConnectionLost):
        how = "reset" if exc.reset else "closed"
        if exc.in_handshake:
            return (
                f"the server at {server} {how} the connection during the TLS handshake: "
                "does it speak TLS 1.3?"
            )
        if exc.answered:
            return f"the server at {server} {how} the connection"
        return (
            f"the server at {server} {how} the connection without answering: "
            "did it reject our certificate (--cert/--key, --user)?"
        )
    if isinstance(exc, trio.TooSlowError):
        return f"the server at {server} did not answer within {timeout:g} s"
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc) or errno.errorcode.get(exc.errno or 0, "error")
        return f"cannot talk to the server at {server}: {detail.lower()}"
    return f"the server at {server} closed the connection"


@contextmanager
def map_errors(server: str, timeout: float) -> Iterator[None]:
    """Turn the errors of a conversation with server into one ClientError.

    Only Exception is caught: Cancelled (Ctrl-C) and groups that hold it pass through.
    """
    try:
        yield
    except Exception as exc:
        cause = find_cause(exc)
        if cause is None:
            raise
        if isinstance(cause, ClientError):
            raise cause from None
        raise ClientError(describe(cause, server, timeout)) from exc
