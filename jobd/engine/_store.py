"""The durable store of job records and owner->uid assignments: one SQLite database in WAL
mode in the data dir (`jobs.sqlite3`). Its schema and every migration live here, in one place.

Synchronous and blocking: use it from one thread at a time. The engine's `_records` module
applies small batches on the trio thread with `wait=False` (in WAL mode with synchronous=NORMAL
a commit is a write into the page cache, no fsync, and a lock held by another process is
`StoreBusy` at once instead of a wait), and everything that may sync or wait in a worker
thread: opening, large batches, `checkpoint` (the only syncs: the WAL is checkpointed here and
nowhere else, wal_autocheckpoint=0) and closing. Imports only the standard library; knows
nothing of trio, jobs or output.

    store = Store(data_dir / "jobs.sqlite3")     # creates or migrates
    jobs, uids = store.load()                    # every record (oldest first), uid -> owner
    store.apply([Put(info), Delete(job_id), AssignUid(uid, owner)])   # one transaction
    store.checkpoint()                           # now and then (syncs)
    store.close()
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._types import EndReason, JobInfo, Limits, Network, State, Usage

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version). Append only:
# a released entry is never edited, so every data dir, however old, reaches the newest.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,          -- order of creation in this data dir (List pages)
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        command TEXT NOT NULL,            -- JSON array
        working_dir TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL,             -- JSON array of [key, value]
        timeout REAL NOT NULL,
        network INTEGER NOT NULL,
        uid INTEGER,
        state INTEGER NOT NULL,
        reason INTEGER NOT NULL,
        exit_code INTEGER NOT NULL,
        signal INTEGER NOT NULL,
        oom_killed INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        cpus REAL NOT NULL, memory_bytes INTEGER NOT NULL, pids INTEGER NOT NULL,
        io_read_bps INTEGER NOT NULL, io_write_bps INTEGER NOT NULL,
        cpu_usec INTEGER NOT NULL, memory_peak_bytes INTEGER NOT NULL,
        oom_kills INTEGER NOT NULL,
        output_bytes INTEGER NOT NULL,
        output_start INTEGER NOT NULL
    );
    CREATE TABLE uids (
        uid INTEGER PRIMARY KEY,          -- never given to another owner, ever
        owner TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
# How long a write waits for another connection's lock (an operator's sqlite3 shell, a
# backup) when it may wait (`apply(wait=True)`, in a worker thread).
BUSY_TIMEOUT_MS = 5000

_COLUMNS = (
    "seq id owner command working_dir name labels timeout network uid state reason exit_code "
    "signal oom_killed started_at ended_at cpus memory_bytes pids io_read_bps io_write_bps "
    "cpu_usec memory_peak_bytes oom_kills output_bytes output_start"
).split()
_PUT = (
    f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)


class StoreError(Exception):
    """The database cannot be opened, read or written (full disk, I/O error, newer schema)."""


class StoreBusy(StoreError):
    """`apply(wait=False)` found the database locked by another connection: nothing was
    written (apply again with `wait=True`, in a worker thread)."""


@dataclass(frozen=True, slots=True)
class Put:
    """Insert or replace one job's record."""

    job: JobInfo


@dataclass(frozen=True, slots=True)
class Delete:
    job_id: str


@dataclass(frozen=True, slots=True)
class AssignUid:
    uid: int
    owner: str


Op = Put | Delete | AssignUid


def _row(job: JobInfo) -> tuple[object, ...]:
    lim, use = job.limits, job.usage
    return (
        job.seq, job.id, job.owner, json.dumps(job.command), job.working_dir, job.name,
        json.dumps(job.labels), job.timeout, int(job.network), job.uid, int(job.state),
        int(job.reason), job.exit_code, job.signal, int(job.oom_killed), job.started_at,
        job.ended_at, lim.cpus, lim.memory_bytes, lim.pids, lim.io_read_bps, lim.io_write_bps,
        use.cpu_usec, use.memory_peak_bytes, use.oom_kills, job.output_bytes, job.output_start,
    )  # fmt: skip


def _job(row: sqlite3.Row) -> JobInfo:
    return JobInfo(
        seq=row["seq"],
        id=row["id"],
        owner=row["owner"],
        command=tuple(json.loads(row["command"])),
        working_dir=row["working_dir"],
        name=row["name"],
        labels=tuple((k, v) for k, v in json.loads(row["labels"])),
        timeout=row["timeout"],
        network=Network(row["network"]),
        uid=row["uid"],
        state=State(row["state"]),
        reason=EndReason(row["reason"]),
        exit_code=row["exit_code"],
        signal=row["signal"],
        oom_killed=bool(row["oom_killed"]),
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        limits=Limits(
            cpus=row["cpus"],
            memory_bytes=row["memory_bytes"],
            pids=row["pids"],
            io_read_bps=row["io_read_bps"],
            io_write_bps=row["io_write_bps"],
        ),
        usage=Usage(
            cpu_usec=row["cpu_usec"],
            memory_peak_bytes=row["memory_peak_bytes"],
            oom_kills=row["oom_kills"],
        ),
        output_bytes=row["output_bytes"],
        output_start=row["output_start"],
    )


class Store:
    """One connection, used from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT in apply).
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job store {path}: {exc}") from exc
        try:
            self._db.row_factory = sqlite3.Row
            path.chmod(0o600)
            # WAL: a commit is one append (no journal rewrite), readers never block the writer;
            # synchronous=NORMAL: a commit survives a crash of jobd (the OS still has it),
            # a power loss may lose the last commits but never corrupts the database.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (which sync the WAL and the database file) only in `checkpoint`,
            # never inside a commit: a commit on the trio thread must not sync.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._busy_timeout = BUSY_TIMEOUT_MS
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the job store {self.path} has schema version {version}, newer than this "
                f"jobd's {SCHEMA_VERSION}: run the newer jobd, or give this one another "
                "--data-dir"
            )
        for v in range(version, SCHEMA_VERSION):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for statement in _MIGRATIONS[v].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {v + 1}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"cannot migrate the job store {self.path}: {exc}") from exc

    def _transaction(self, body: Callable[[], object], *, wait: bool = True) -> None:
        timeout = BUSY_TIMEOUT_MS if wait else 0
        try:
            if timeout != self._busy_timeout:
                self._db.execute(f"PRAGMA busy_timeout={timeout}")
                self._busy_timeout = timeout
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # (a failed COMMIT may leave it open)
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if not wait and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                raise StoreBusy(f"the job store {self.path} is locked: {exc}") from exc
            raise StoreError(f"cannot write the job store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the job store {self.path}: {exc}") from exc

    def load(self) -> tuple[list[JobInfo], dict[int, str]]:
        """Every job record, oldest first, and every uid assignment."""
        try:
            jobs = [_job(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY seq")]
            uids = {r["uid"]: r["owner"] for r in self._db.execute("SELECT * FROM uids")}
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the job store {self.path}: {exc}") from exc
        return jobs, uids

    def apply(self, ops: Sequence[Op], *, wait: bool = True) -> None:
        """Carry out `ops` in one transaction: all of them or, on StoreError, none. With
        `wait` False, a database locked by another connection is `StoreBusy` at once."""

        def body() -> None:
            for op in ops:
                if isinstance(op, Put):
                    self._db.execute(_PUT, _row(op.job))
                elif isinstance(op, Delete):
                    self._db.execute("DELETE FROM jobs WHERE id = ?", (op.job_id,))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO uids (uid, owner) VALUES (?, ?)", (op.uid, op.owner)
                    )

        self._transaction(body, wait=wait)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (syncing both) and, when all of it was copied,
        start the WAL over: the first write after that rewrites the WAL's header and syncs
        it, so a write follows here (the schema version, unchanged), and no later commit
        syncs. Call it from a worker thread."""
        try:
            busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and frames > 0 and copied == frames:
                self._transaction(
                    lambda: self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot checkpoint the job store {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()
