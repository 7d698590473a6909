"""How jobd's log lines look: `text` for people, `json` (one object per line) for log
pipelines. The audit log passes its event and fields as logging `extra` (`audit_event`,
`audit_fields`: the structured facts its text line is made of); the JSON formatter writes
them as keys of their own (names in README "Logs"), as it does any other `extra`. Standard
library only.

    configure_logging("info", "json")
    logging.getLogger("jobd.audit").info(
        "rpc user=alice ...", extra={"audit_event": "rpc", "audit_fields": {"user": "alice"}}
    )
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from . import _audit

__all__ = ["JsonFormatter", "configure_logging"]

# Everything a LogRecord has by itself; any other attribute came in through `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "audit_event",
    "audit_fields",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, milliseconds), level, logger, event
    (the audit event, else "log"), message, then the audit fields and any other `extra` as
    given, and `exception` with the traceback text when there is one. Never raises on odd
    values: what JSON cannot hold is written as its str(). The five keys above are never
    overwritten by a field of the same name."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": str(getattr(record, "audit_event", "log")),
            "message": record.getMessage(),
        }
        fields = getattr(record, "audit_fields", None)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        for key, value in [*(fields.items() if isinstance(fields, dict) else ()), *extra.items()]:
            if key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str, fmt: str, *, library_level: str = "warning") -> None:
    """Root logging to stderr as `_audit.configure_logging` sets it up (jobd at `level`, the
    chatty libraries at `library_level`, UTC text lines), in `fmt`: "text" or "json"."""
    _audit.configure_logging(level, library_level=library_level, stream=sys.stderr)
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
