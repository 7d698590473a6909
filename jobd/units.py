"""Parse the sizes (`512M`, `1.5GiB`, `10M/s`) and durations (`500ms`, `5s`, `1m`) of both
command lines, `jobd serve` and `jobd-client`, so they read them alike. Pure functions;
imports only the standard library.
"""

from __future__ import annotations

import re

__all__ = ["parse_duration", "parse_rate", "parse_size"]

# K, M, G, T alone or with "iB" are powers of 1024, as Docker and systemd read them; the SI
# spellings kB, MB, GB, TB are powers of 1000. Letters are case-insensitive except that
# "MB" style (with a B but no i) is SI.
_BINARY = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SI = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h|d)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in text: `4096`, `512K`, `512M`, `1G`, `1.5GiB`, `2MB` (SI: 2,000,000).

    Raises ValueError with a message that shows the accepted forms.
    """
    match = _SIZE.fullmatch(text.strip())
    unit = match["unit"].lower() if match else ""
    if unit.endswith("ib") and len(unit) == 3:
        unit = unit[0]
    factor = _BINARY.get(unit) or _SI.get(unit)
    if match is None or factor is None:
        raise ValueError(f"{text!r} is not a size: use bytes or a suffix, e.g. 512M, 1G, 1.5GiB")
    return int(float(match["number"]) * factor)


def parse_rate(text: str) -> int:
    """Bytes per second in text: a size with an optional `/s`, e.g. `10M/s` or `10M`."""
    stripped = text.strip()
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    try:
        return parse_size(stripped)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate: use bytes per second, e.g. 10M/s") from None


def parse_duration(text: str) -> float:
    """Seconds in text: `0`, `500ms`, `5s`, `1.5s`, `1m`, `1h`, `7d`; a bare number is seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use e.g. 0, 500ms, 5s, 1m, 2h, 7d")
    return float(match["number"]) * _DURATION_UNITS[(match["unit"] or "s").lower()]
