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

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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


def configure_logging(level: str, fmt: str) -> None:
    """Root logging to stderr at `level` ("debug" ... "error") in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
