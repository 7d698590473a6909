"""What the engine has done and holds, as counters the manager keeps up to date (a few integer
additions on its own paths) and a frozen snapshot that metrics read at scrape time: reading
never walks the jobs. Standard library only.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._types import EndReason, State


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot. Counters (`*_total` in metrics) only grow while the server runs."""

    jobs: Mapping[State, int]  # jobs the server holds now, by state
    starts: int  # jobs started
    ends: Mapping[EndReason, int]  # jobs ended, by why
    output_bytes_written: int  # bytes jobs wrote (combined streams), kept or not
    output_bytes_dropped: int  # of those, bytes no longer kept
    output_bytes_stored: int  # bytes of output kept in the data dir now
    outputs_blocked: int  # running jobs whose output is not being stored right now


@dataclass(slots=True)
class Counters:
    """Kept by the manager; `snapshot()` is all anyone else sees."""

    running: int = 0
    ended: collections.Counter[State] = field(default_factory=collections.Counter)
    starts: int = 0
    ends: collections.Counter[EndReason] = field(default_factory=collections.Counter)
    output_written: int = 0
    output_dropped: int = 0
    output_stored: int = 0
    outputs_blocked: int = 0

    def started(self) -> None:
        self.starts += 1
        self.running += 1

    def job_ended(self, state: State, reason: EndReason) -> None:
        self.running -= 1
        self.ended[state] += 1
        self.ends[reason] += 1

    def output(self, size: int) -> None:
        self.output_written += size
        self.output_stored += size

    def snapshot(self) -> EngineStatistics:
        jobs: dict[State, int] = {state: self.ended[state] for state in State}
        jobs[State.RUNNING] = self.running
        return EngineStatistics(
            jobs=jobs,
            starts=self.starts,
            ends={reason: self.ends[reason] for reason in EndReason if reason},
            output_bytes_written=self.output_written,
            output_bytes_dropped=self.output_dropped,
            output_bytes_stored=self.output_stored,
            outputs_blocked=self.outputs_blocked,
        )
