"""Admission of a Start: how many jobs may run in all and per user (DESIGN.md "Quotas and
admission"). Counts jobs from admission (before their process exists, so concurrent Starts
cannot overshoot) until they end. Imports only the standard library and the engine's errors.

    quota = Quota(max_jobs=1000, max_jobs_per_user=100)
    quota.admit("alice")        # raises ResourceExhausted naming the limit
    ...                         # the job runs
    quota.release("alice")      # it ended, or its start failed
"""

from __future__ import annotations

import collections

from ._errors import ResourceExhausted

__all__ = ["Quota"]


class Quota:
    """Running-job counts against `max_jobs` (in all) and `max_jobs_per_user`; 0 = no limit."""

    def __init__(self, max_jobs: int, max_jobs_per_user: int) -> None:
        self.max_jobs = max_jobs
        self.max_jobs_per_user = max_jobs_per_user
        self.running = 0
        self._by_user: collections.Counter[str] = collections.Counter()

    def running_of(self, user: str) -> int:
        return self._by_user[user]

    def admit(self, user: str) -> None:
        """Count one more job of `user`, or raise ResourceExhausted if it would pass a limit."""
        mine = self._by_user[user]
        if self.max_jobs_per_user and mine >= self.max_jobs_per_user:
            raise ResourceExhausted(
                f"{user} has {mine} jobs running, the server's limit per user "
                f"(--max-jobs-per-user {self.max_jobs_per_user}): wait for some to end or "
                "stop them"
            )
        if self.max_jobs and self.running >= self.max_jobs:
            raise ResourceExhausted(
                f"the server has {self.running} jobs running, its limit "
                f"(--max-jobs {self.max_jobs}): try again when some have ended"
            )
        self.running += 1
        self._by_user[user] += 1

    def release(self, user: str) -> None:
        """One job of `user` has ended (or never started)."""
        self.running -= 1
        self._by_user[user] -= 1
        if self._by_user[user] <= 0:
            del self._by_user[user]
