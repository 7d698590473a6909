"""Counts of the calls and connections the transport handled: plain numbers the transport adds
to as calls end, read by the metrics exporter at scrape time. No I/O, no imports beyond the
standard library.

    stats = TransportStatistics(known_methods={"jobd.v1.JobService/Start", ...})
    stats.call_ended("jobd.v1.JobService/Start", "OK", 0.004)
    stats.refused("handshake_timeout")
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "UNKNOWN_METHOD", "MethodLatency", "TransportStatistics"]

# Upper bounds (seconds) of the call-duration histogram; the last bucket is +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
)  # fmt: skip
# Calls of methods the server does not have are counted under this one name: a client must
# not be able to create a label value (a new time series) per made-up method name.
UNKNOWN_METHOD = "unknown"


@dataclass(slots=True)
class MethodLatency:
    """One method's histogram: counts[i] calls took at most LATENCY_BUCKETS[i] (not cumulative;
    the last is for longer calls), and their total duration."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total_seconds: float = 0.0


class TransportStatistics:
    """Calls by method and status code, their durations, and refused connections."""

    def __init__(self, known_methods: Iterable[str]) -> None:
        self._known = frozenset(known_methods)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency: dict[str, MethodLatency] = {}
        self.refusals: collections.Counter[str] = collections.Counter()

    def method_label(self, service: str, method: str) -> str:
        name = f"{service}/{method}"
        return name if name in self._known else UNKNOWN_METHOD

    def call_ended(self, method: str, code: str, seconds: float) -> None:
        self.calls[method, code] += 1
        latency = self.latency.get(method)
        if latency is None:
            latency = self.latency[method] = MethodLatency()
        latency.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.total_seconds += seconds

    def refused(self, reason: str) -> None:
        """A connection closed before any call: `reason` is one of a few fixed words."""
        self.refusals[reason] += 1
