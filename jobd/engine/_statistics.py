"""What the engine has done and holds, for metrics: counters the manager adds to on its own
paths (a few integer additions), and a frozen snapshot read at scrape time that never walks
the jobs (the records keep their count by state, the output space its totals). Standard
library only.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._types import EndReason, State


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot. Counters (`*_total` in metrics) only grow while the server runs."""

    jobs: Mapping[State, int]  # kept jobs by state (records loaded at start-up included)
    starts: int  # jobs started by this server
    ends: Mapping[EndReason, int]  # jobs ended, by why (SERVER_LOST: found at start-up)
    output_bytes_written: int  # bytes jobs wrote (combined streams), kept or not
    output_bytes_dropped: int  # bytes no longer kept: caps, the data budget, removed jobs
    output_bytes_stored: int  # disk bytes of output kept in the data dir now
    outputs_blocked: int  # running jobs whose output is not being stored right now


@dataclass(slots=True)
class Counters:
    """Kept by the manager."""

    starts: int = 0
    ends: collections.Counter[EndReason] = field(default_factory=collections.Counter)
    output_written: int = 0

    def snapshot(
        self, jobs: Mapping[State, int], *, dropped: int, stored: int, blocked: int
    ) -> EngineStatistics:
        return EngineStatistics(
            jobs={state: jobs.get(state, 0) for state in State},
            starts=self.starts,
            ends={reason: self.ends[reason] for reason in EndReason if reason},
            output_bytes_written=self.output_written,
            output_bytes_dropped=dropped,
            output_bytes_stored=stored,
            outputs_blocked=blocked,
        )
