"""Every kept job's record in memory, indexed for List, written behind to the durable store;
and the owner -> uid assignments. Imports the standard library, trio, trio-util and the
engine's `_store` and `_types` (no gRPC, TLS or CLI; nothing of processes or cgroups).

An ended job costs one frozen `JobInfo` here (plus two 8-byte slots in the List indexes) and
its row in SQLite: no task, event, cgroup or file descriptor. A running job's record here is
its start snapshot; the manager overlays the live state.

Writes are queued from the trio thread (`write`, a list append) and carried out by one task
(`run`), a batch per transaction; `write_durably` also waits until its batch has committed (a
Start is answered only then), and commits it at once itself when no commit is under way. A
small batch commits on the trio thread: SQLite in WAL mode with synchronous=NORMAL appends
it to the WAL in the page cache (no fsync), ~0.1-0.3 ms, where a worker thread's round trip
cost a Start 1.5-8 ms (the thread and the event loop hand the GIL to each other, each
hand-off up to the 5 ms switch interval while the other runs Python). What may sync or wait
runs in a worker thread: a large batch, a commit retried after a failure or one that found
the database locked by another process (`StoreBusy`), and the WAL's checkpoint every
CHECKPOINT_OPS written ops (after a commit, off the Start's path).

    records = await Records.open(data_dir / "jobs.sqlite3", uid_range=(1_000_000, 1_999_999))
    await nursery.start(records.run)
    ...
    await records.aclose()     # shielded: commits what is queued, closes the database
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio
from trio_util import AsyncValue

from ._errors import InvalidArgument, ResourceExhausted
from ._store import AssignUid, Delete, Op, Put, Store, StoreBusy, StoreError
from ._types import JobInfo, State

log = logging.getLogger(__name__)
# A failed commit (disk full, I/O error) is retried this often; the operator log says so once.
RETRY_INTERVAL = 1.0
# Bound on committing what is queued at shutdown.
CLOSE_TIMEOUT = 30.0
# A batch of at most this many ops commits on the trio thread (microseconds each); a larger
# one (the start-up's lost jobs, an expiry of thousands) in a worker thread.
INLINE_OPS = 64
# The WAL is checkpointed (synced, copied into the database file, started over) in a worker
# thread after this many ops were written since the last checkpoint: a few pages each, so
# the WAL stays within ~10 MiB.
CHECKPOINT_OPS = 1000


class _Order:
    """Job seqs in ascending order with their ids: newest-first iteration from any seq in
    O(log n), removal in O(n) memmove (microseconds at 100,000 jobs). 16 bytes per job."""

    __slots__ = ("_seqs", "_ids")

    def __init__(self) -> None:
        self._seqs = array("q")
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, seq: int, job_id: str) -> None:
        i = bisect.bisect_left(self._seqs, seq)
        self._seqs.insert(i, seq)
        self._ids.insert(i, job_id)

    def remove(self, seq: int) -> None:
        i = bisect.bisect_left(self._seqs, seq)
        if i < len(self._seqs) and self._seqs[i] == seq:
            del self._seqs[i]
            del self._ids[i]

    def newest_before(self, before: int) -> Iterator[str]:
        """Ids with seq < `before`, newest first. Do not change the order while iterating."""
        i = bisect.bisect_left(self._seqs, before)
        for j in range(i - 1, -1, -1):
            yield self._ids[j]


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of List: `jobs` newest first; `more`: further jobs may match (ask again with
    `before` = the last job's seq)."""

    jobs: list[JobInfo]
    more: bool


class _Batch:
    __slots__ = ("ops", "durable", "done", "error")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.durable: set[int] = set()  # indexes of ops whose writer waits for the commit
        self.done = trio.Event()
        self.error: StoreError | None = None


class Records:
    """Kept jobs by id, in creation order overall and per owner; names; uids. Call from the
    trio thread."""

    def __init__(
        self, store: Store, jobs: list[JobInfo], uids: dict[int, str],
        uid_range: tuple[int, int] | None,
    ) -> None:  # fmt: skip
        self._store = store
        self._limiter = trio.CapacityLimiter(1)  # one thread at a time uses the connection
        self._by_id: dict[str, JobInfo] = {}
        self._all = _Order()
        self._by_owner: dict[str, _Order] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._next_seq = 1
        # Ended jobs by when they ended, for --keep-finished (a job removed meanwhile is
        # skipped when its turn comes).
        self.ended_order: collections.deque[tuple[float, str]] = collections.deque()
        self.ended_added = trio.Event()
        self.removed_count = AsyncValue(0)  # for tests and metrics
        self.states: collections.Counter[State] = collections.Counter()  # kept jobs, for metrics
        for job in jobs:
            self.add(job)
        for job in sorted((j for j in jobs if j.ended_at), key=lambda j: j.ended_at):
            self.ended_order.append((job.ended_at, job.id))
        self._uid_range = uid_range
        self._uid_owner = dict(uids)
        self._owner_uid: dict[str, int] = {}
        for uid, owner in sorted(uids.items()):
            if uid_range and uid_range[0] <= uid <= uid_range[1]:
                self._owner_uid.setdefault(owner, uid)
        self._next_uid = uid_range[0] if uid_range else 0
        self._batch = _Batch()
        self._wake = trio.Event()
        self._failing = False
        self._committing = False  # a commit or a checkpoint is under way (in `run`)
        self._since_checkpoint = 0  # ops written since the WAL's last checkpoint
        self._thread_next = False  # the next commit in a worker thread (a checkpoint failed)

    @classmethod
    async def open(cls, path: Path, *, uid_range: tuple[int, int] | None) -> Records:
        """Open (create, migrate) the store and load every record, in a worker thread."""

        def load() -> tuple[Store, list[JobInfo], dict[int, str]]:
            store = Store(path)
            try:
                jobs, uids = store.load()
            except BaseException:
                store.close()
                raise
            return store, jobs, uids

        store, jobs, uids = await trio.to_thread.run_sync(load)
        return cls(store, jobs, uids, uid_range)

    # ----------------------------------------------------------------- the index

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[JobInfo]:
        return iter(list(self._by_id.values()))

    def get(self, job_id: str) -> JobInfo | None:
        return self._by_id.get(job_id)

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def add(self, job: JobInfo) -> None:
        """A new job (or one loaded from the store); not written: see `write`."""
        self._by_id[job.id] = job
        self.states[job.state] += 1
        self._all.add(job.seq, job.id)
        self._by_owner.setdefault(job.owner, _Order()).add(job.seq, job.id)
        if job.name:
            self._names[(job.owner, job.name)] = job.id
        self._next_seq = max(self._next_seq, job.seq + 1)

    def ended(self, job: JobInfo) -> None:
        """A kept job's final state: replaces its record and writes it behind."""
        if job.id not in self._by_id:
            return  # removed meanwhile
        self.states[self._by_id[job.id].state] -= 1
        self.states[job.state] += 1
        self._by_id[job.id] = job
        self.ended_order.append((job.ended_at, job.id))
        self.ended_added.set()
        self.write(Put(job))

    def remove(self, job_id: str, *, forgotten: bool = True) -> JobInfo | None:
        """Forget a job (written behind); its record, or None if it was not kept.
        `forgotten`=False: a Start that failed (not counted as a removal)."""
        job = self._by_id.pop(job_id, None)
        if job is None:
            return None
        self.states[job.state] -= 1
        self._all.remove(job.seq)
        order = self._by_owner[job.owner]
        order.remove(job.seq)
        if not order:
            del self._by_owner[job.owner]
        if job.name and self._names.get((job.owner, job.name)) == job_id:
            del self._names[(job.owner, job.name)]
        self.write(Delete(job_id))
        if forgotten:
            self.removed_count.value += 1
        return job

    def named(self, owner: str, name: str) -> str | None:
        """The id of `owner`'s kept job called `name`."""
        return self._names.get((owner, name))

    def newest_first(self, owner: str | None, before: float = math.inf) -> Iterator[str]:
        """Ids of kept jobs (of `owner`, or everyone's) with seq < `before`, newest first."""
        order = self._all if owner is None else self._by_owner.get(owner)
        if order is None:
            return iter(())
        return order.newest_before(int(min(before, self._next_seq)))

    def page(
        self,
        info_of: Callable[[str], JobInfo | None],
        owner: str | None,
        *,
        before: int | None,
        limit: int,
        states: frozenset[State],
        labels: Mapping[str, str],
        id_prefix: str,
        name: str,
    ) -> JobPage:
        """Up to `limit` kept jobs (`info_of` gives each one's current state) with seq <
        `before` matching every filter, newest first. Keyset paging on seq: a job started,
        ended or removed meanwhile never shifts a later page."""
        prefix = id_prefix.lower()
        if prefix and (
            len(prefix.replace("-", "")) < 4 or prefix.strip("0123456789abcdef-") != ""
        ):
            raise InvalidArgument(
                f"id_prefix {id_prefix[:40]!r} must be at least 4 hex digits of a job id"
            )
        if limit < 1:
            raise InvalidArgument(f"page size must be >= 1, not {limit}")
        wanted = tuple(labels.items())
        out: list[JobInfo] = []
        for job_id in self.newest_first(owner, math.inf if before is None else before):
            if prefix and not job_id.startswith(prefix):
                continue
            info = info_of(job_id)
            if info is None:
                continue
            if states and info.state not in states:
                continue
            if name and info.name != name:
                continue
            if wanted and not all(pair in info.labels for pair in wanted):
                continue
            if len(out) == limit:
                return JobPage(out, more=True)
            out.append(info)
        return JobPage(out, more=False)

    async def expire(
        self,
        keep: float,
        forget: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """--keep-finished: call `forget(id)` for each ended job `keep` seconds after it
        ended (0: never). Runs until cancelled."""
        task_status.started()
        if not keep:
            return
        pending = self.ended_order
        while True:
            while pending and pending[0][0] + keep <= time.time():
                forget(pending.popleft()[1])
            if pending:
                await trio.sleep(max(pending[0][0] + keep - time.time(), 0.0))
            else:
                self.ended_added = trio.Event()
                await self.ended_added.wait()

    # ----------------------------------------------------------------- uids

    def uid_for(self, owner: str) -> int:
        """The owner's uid from the range, assigning the lowest never-assigned one to a new
        owner (written behind, so it commits with or before the owner's first job)."""
        uid = self._owner_uid.get(owner)
        if uid is not None:
            return uid
        assert self._uid_range is not None
        first, last = self._uid_range
        uid = max(self._next_uid, first)
        while uid in self._uid_owner:
            uid += 1
        if uid > last:
            raise ResourceExhausted(
                f"every uid of --job-uids {first}-{last} is assigned to an owner (one per "
                "owner, never reused): give jobd a wider --job-uids range"
            )
        self._next_uid = uid + 1
        self._uid_owner[uid] = owner
        self._owner_uid[owner] = uid
        self.write(AssignUid(uid, owner))
        return uid

    # ----------------------------------------------------------------- writing

    def write(self, op: Op) -> _Batch:
        """Queue `op` for the next commit; never waits."""
        self._batch.ops.append(op)
        self._wake.set()
        return self._batch

    async def write_durably(self, op: Op) -> None:
        """Queue `op` and wait until it has committed; StoreError if it could not be. With no
        commit under way, commits the batch now, on this thread when it may (see above)."""
        batch = self._batch
        batch.ops.append(op)
        batch.durable.add(len(batch.ops) - 1)
        if self._committing or not self._may_inline() or not self._commit_inline():
            self._wake.set()  # `run` commits it
        if not batch.done.is_set():
            await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _may_inline(self) -> bool:
        """Whether the queued batch may commit on this thread (else in `run`: a worker thread,
        or first the checkpoint that is due)."""
        return not (
            self._failing
            or self._thread_next
            or len(self._batch.ops) > INLINE_OPS
            or self._since_checkpoint >= CHECKPOINT_OPS
        )

    def _commit_inline(self) -> bool:
        """Commit the queued batch on this thread; False (nothing done, the batch still
        queued) when another connection holds the database's lock."""
        batch = self._batch
        try:
            self._store.apply(batch.ops, wait=False)
        except StoreBusy:
            return False
        except Exception as exc:
            self._batch = _Batch()
            self._failed(batch, exc)
            return True
        self._batch = _Batch()
        self._since_checkpoint += len(batch.ops)
        batch.done.set()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit queued writes until cancelled. A failing commit is logged, its durable
        writers get the error, and the rest is retried: it never ends this task."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not await self._commit():
                await trio.sleep(RETRY_INTERVAL)

    async def _commit(self) -> bool:
        """Commit what is queued (if anything), then checkpoint if it is time; False if the
        commit failed."""
        self._committing = True
        try:
            if self._since_checkpoint >= CHECKPOINT_OPS:
                await self._checkpoint()
            if self._batch.ops:
                if not (self._may_inline() and self._commit_inline()):
                    await self._commit_in_thread()
                if self._failing:
                    return False
            if self._since_checkpoint >= CHECKPOINT_OPS:
                await self._checkpoint()
            return True
        finally:
            self._committing = False

    async def _commit_in_thread(self) -> None:
        batch, self._batch = self._batch, _Batch()
        try:
            await trio.to_thread.run_sync(self._store.apply, batch.ops, limiter=self._limiter)
        except Exception as exc:  # a failing store never ends this task (nor the manager)
            self._failed(batch, exc)
            return
        self._since_checkpoint += len(batch.ops)
        self._thread_next = False
        batch.done.set()
        if self._failing:
            log.warning("the job store %s is written again", self._store.path)
            self._failing = False

    def _failed(self, batch: _Batch, exc: Exception) -> None:
        """A commit failed: its durable writers get the error, the rest is retried (in a
        worker thread, every RETRY_INTERVAL, until it commits)."""
        batch.error = (
            exc if isinstance(exc, StoreError) else StoreError(f"job store failure: {exc!r}")
        )
        if not self._failing:
            log.error("%s; retrying every %.0f s", batch.error, RETRY_INTERVAL)
        self._failing = True
        retry = [op for i, op in enumerate(batch.ops) if i not in batch.durable]
        self._batch.ops[:0] = retry
        self._batch.durable = {i + len(retry) for i in self._batch.durable}
        if self._batch.ops:
            self._wake.set()
        batch.done.set()

    async def _checkpoint(self) -> None:
        """The WAL's checkpoint, in a worker thread (it syncs); commits queue meanwhile. One
        that failed is tried again after the next commits (the WAL only grows meanwhile), and
        the next commit is made in a worker thread: it may start the WAL over, which syncs."""
        try:
            await trio.to_thread.run_sync(self._store.checkpoint, limiter=self._limiter)
        except Exception as exc:
            log.error("%s; tried again after the next commits", exc)
            self._since_checkpoint = CHECKPOINT_OPS // 2
            self._thread_next = True
            return
        self._since_checkpoint = 0

    async def aclose(self) -> None:
        """Commit what is queued (bounded) and close the database. Shielded."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            self._committing = True  # from here every commit is in a worker thread
            while self._batch.ops:
                await self._commit_in_thread()
                if self._failing:
                    break
            if self._batch.ops:
                log.error(
                    "%d job store write(s) could not be committed at shutdown",
                    len(self._batch.ops),
                )
            await trio.to_thread.run_sync(self._store.close, limiter=self._limiter)
