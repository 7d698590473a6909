"""How jobd's log lines look: `text` for people, `json` (one object per line) for log
pipelines. Handlers and the audit log pass their fields as logging `extra`; the JSON formatter
writes them as keys of their own (names in README "Logs"), the text formatter leaves them in
the message. Standard library only.

    configure_logging("info", "json")
    logging.getLogger("jobd.audit").info("rpc ...", extra={"event": "rpc", "user": "alice"})
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
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, milliseconds), level, logger, event
    (the record's `event` extra, else "log"), message, then every `extra` field as given, and
    `exception` with the traceback text when there is one. Never raises on odd values: what
    JSON cannot hold is written as its str()."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str, fmt: str) -> None:
    """Root logging to stderr at `level` ("debug" ... "error") in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
