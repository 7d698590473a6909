"""The audit log and the server's log format: one line per event, built from structured fields
that no client-chosen value can break (ids, names, commands, certificate names are quoted
and escaped, long ones cut with a marker), timestamps in UTC ISO 8601, and a rate limit for
what a peer without a certificate can make us log. Imports only the standard library.

    audit_event("rpc", user="alice", method="Stop", job=job_id, code="OK")
    # 2026-12-01T09:10:11.123Z INFO jobd.audit: rpc user=alice method=Stop job=... code=OK

Each record also carries the fields themselves (`record.audit_event`, `record.audit_fields`),
so that another formatter (JSON) writes the same facts without parsing the line.
"""

from __future__ import annotations

import atexit
import collections
import datetime as dt
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TextIO

__all__ = [
    "MAX_VALUE_CHARS",
    "AuditLine",
    "RateLimitedLog",
    "UtcFormatter",
    "audit_event",
    "configure_logging",
    "defer_audit",
    "format_fields",
    "quote",
    "write_deferred",
]

audit = logging.getLogger("jobd.audit")

# A longer value is cut here, with a marker saying how much was left out.
MAX_VALUE_CHARS = 256
# The whole of a list value (a command line) is cut at this many characters.
MAX_LIST_CHARS = 1024
# Printed bare: nothing a reader could take for a separator, a quote or another field.
_BARE = re.compile(r"[A-Za-z0-9_.,:/@+%-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# Strings quoted before (users, methods, job ids, codes repeat line after line): at most
# _QUOTED_MAX of at most _QUOTED_CHARS characters each; when full it starts again empty.
_QUOTED: dict[str, str] = {}
_QUOTED_MAX = 4096
_QUOTED_CHARS = 64


def quote(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`value` as one token of a log line: bare if it is plainly safe, else double-quoted
    with `"`, `\\` and every control or non-printable character escaped (`\\n`, `\\x1b`,
    `\\u2028`), so it can never end the line or look like another field. Longer than
    `limit` characters: cut, with `...(+N chars)` inside the quotes."""
    if type(value) is str and len(value) <= _QUOTED_CHARS and limit == MAX_VALUE_CHARS:
        quoted = _QUOTED.get(value)
        if quoted is None:
            if len(_QUOTED) >= _QUOTED_MAX:
                _QUOTED.clear()
            quoted = _QUOTED[value] = _quote(value, limit)
        return quoted
    return _quote(value, limit)


def _quote(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    if cut <= 0 and _BARE.fullmatch(text):
        return text
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable() and char != "\x7f":
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    if cut > 0:
        out.append(f"...(+{cut} chars)")
    out.append('"')
    return "".join(out)


def quote_list(values: Iterable[object], limit: int = MAX_LIST_CHARS) -> str:
    """A list (a command's argv) as `[a,"b c",...]`, each item quoted; cut after `limit`
    characters with a marker saying how many items were left out."""
    items = list(values)
    out: list[str] = []
    size = 0
    for i, item in enumerate(items):
        token = quote(item)
        if size + len(token) > limit and out:
            out.append(f"...(+{len(items) - i} args)")
            break
        out.append(token)
        size += len(token) + 1
    return "[" + ",".join(out) + "]"


def _token(value: object) -> str:
    if isinstance(value, list | tuple):
        return quote_list(value)
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    return quote(value)


def format_fields(event: str, fields: Mapping[str, object]) -> str:
    """`event key=value ...`, every value quoted as `quote` does (None is written `-`)."""
    parts = [quote(event)]
    for key, value in fields.items():
        parts.append(f"{key}={'-' if value is None else _token(value)}")
    return " ".join(parts)


class AuditLine:
    """A log message formatted only if a handler writes it (`str()`)."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: Mapping[str, object]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        return format_fields(self.event, self.fields)


# Where audit_event is called with this set (the transport sets it for its connections' tasks:
# an RPC's own line), the event is queued, stamped with its time, and written by the next
# `write_deferred()`: after the response's socket write, not before it (issue 12: formatting
# and writing the line was 8% of a unary call). Lines are written in the order of their events
# whatever the mix: an event logged at once first writes every queued one.
defer_audit: ContextVar[bool] = ContextVar("jobd_defer_audit", default=False)
_deferred: collections.deque[tuple[float, str, Mapping[str, object]]] = collections.deque()


def audit_event(event: str, /, **fields: object) -> None:
    """Log one audit event at INFO on "jobd.audit": the line, and the fields as
    `record.audit_event` / `record.audit_fields` for structured formatters. Under
    `defer_audit` the line is queued for `write_deferred`, with the time of this call."""
    if audit.isEnabledFor(logging.INFO):
        if defer_audit.get():
            _deferred.append((time.time(), event, fields))
            return
        if _deferred:
            write_deferred()
        audit.info(
            "%s",
            AuditLine(event, fields),
            extra={"audit_event": event, "audit_fields": fields},
        )


def write_deferred() -> None:
    """Write every queued audit line, oldest first, each with the time of its event. Cheap when
    none is queued; safe to call from anywhere, any number of times."""
    while _deferred:
        try:
            created, event, fields = _deferred.popleft()
        except IndexError:  # another thread took the last one
            return
        record = _record(event, fields)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        audit.handle(record)


# What `audit.makeRecord` gives for every audit line but its message, fields and time, and the
# settings it was made under; a record is a copy of it (issue 12: LogRecord's own making,
# path splitting and all, was ~5% of a unary call's CPU).
_template: tuple[tuple[object, ...], dict[str, object], float, float] | None = None


def _make_record(args: tuple[object, ...], extra: dict[str, object]) -> logging.LogRecord:
    return audit.makeRecord(audit.name, logging.INFO, __file__, 0, "%s", args, None, extra=extra)


def _record(event: str, fields: Mapping[str, object]) -> logging.LogRecord:
    """The record `audit.makeRecord` would make for this line (its time set by the caller).
    Made by makeRecord itself whenever logging could make it differently: another record
    factory or logger class, other thread or process settings, another thread."""
    global _template
    args = (AuditLine(event, fields),)
    extra: dict[str, object] = {"audit_event": event, "audit_fields": fields}
    if logging.getLogRecordFactory() is not logging.LogRecord or (
        type(audit).makeRecord is not logging.Logger.makeRecord
    ):
        return _make_record(args, extra)
    key = (
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
        threading.get_ident(),
        audit.name,
    )
    if _template is None or _template[0] != key:
        made = _make_record(args, extra)
        _template = (key, dict(made.__dict__), made.created, made.relativeCreated)
        return made
    record: logging.LogRecord = logging.LogRecord.__new__(logging.LogRecord)
    _, attributes, made_created, made_relative = _template
    record.__dict__.update(attributes)
    record.args = args
    record.__dict__.update(extra)
    # As makeRecord would have it now (the caller sets the event's time).
    record.relativeCreated = made_relative + (time.time() - made_created) * 1000
    return record


atexit.register(write_deferred)  # before logging's own atexit flush (handlers run LIFO)


class RateLimitedLog:
    """At most `burst` lines, refilled at `per_second`, for events a peer can cause at will
    (refused TLS handshakes); what is dropped is counted in the next line written."""

    def __init__(
        self, per_second: float = 1.0, burst: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = per_second
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()
        self._suppressed = 0
        self._lock = threading.Lock()

    def event(self, event: str, **fields: object) -> bool:
        """Log it if the budget allows; True if it was logged."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                self._suppressed += 1
                return False
            self._tokens -= 1
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            fields["suppressed"] = suppressed  # events not logged since the last line
        audit_event(event, **fields)
        return True


class UtcFormatter(logging.Formatter):
    """The server's line format with UTC ISO 8601 timestamps (`2026-12-01T09:10:11.123Z`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1  # the whole second `_prefix` is for: strftime once a second
        self._prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        millis = int(record.created * 1000)
        second, milli = divmod(millis, 1000)
        if second != self._second:
            stamp = dt.datetime.fromtimestamp(second, dt.UTC)
            self._prefix, self._second = stamp.strftime("%Y-%m-%dT%H:%M:%S."), second
        return f"{self._prefix}{milli:03d}Z"


# Chatty libraries: at DEBUG, h2 and hpack log every frame and header. They stay at WARNING
# unless the operator asks for them.
LIBRARY_LOGGERS = ("h2", "hpack", "purerpc", "anyio", "trio", "asyncio")


def configure_logging(
    level: str, *, library_level: str = "warning", stream: TextIO = sys.stderr
) -> None:
    """The root handler with `UtcFormatter` on `stream`, jobd at `level`, the libraries of
    LIBRARY_LOGGERS at `library_level`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(UtcFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level.upper())
