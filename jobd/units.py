"""Human units for the command lines: sizes ("512M", "1.5GiB") and durations ("5s", "500ms").
Standard library only; used by `jobd serve` (the client has its own copy of what it needs)."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from "4096", "512M", "512MiB", "1.5G" (binary multiples: M = MiB)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size: use bytes or a suffix like 512M or 2G")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** _POWERS[unit])


def parse_duration(text: str) -> float:
    """Seconds from "5", "5s", "500ms", "1.5m", "1h"."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use e.g. 5s, 500ms, 1m or 0")
    seconds = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a finite duration")
    return seconds
