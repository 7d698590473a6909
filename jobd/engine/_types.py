"""Plain values the engine hands out: limits, states, usage and job snapshots.
Depends on nothing but the standard library."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Stream(enum.IntEnum):
    """Which pipe a chunk of output came from (numbers match the API's enum)."""

    STDOUT = 1
    STDERR = 2


class State(enum.IntEnum):
    """A job's life: RUNNING, then exactly one of the final states (numbers match the API)."""

    RUNNING = 1
    EXITED = 2  # main process exited by itself: exit_code
    STOPPED = 3  # ended by a stop request: signal
    KILLED = 4  # killed by any other signal (OOM included): signal


class EndReason(enum.IntEnum):
    """Why a job ended (numbers match the API's enum); UNSPECIFIED while it runs."""

    UNSPECIFIED = 0
    EXIT = 1  # the main process exited by itself
    SIGNAL = 2  # a signal jobd did not send
    STOP = 3  # a Stop or Remove(force) call
    OOM = 4  # killed by the kernel at its memory limit
    TIMEOUT = 5  # its timeout passed
    SERVER_SHUTDOWN = 6  # the server was stopped while it ran
    SERVER_LOST = 7  # its server died; killed at the next start


class Network(enum.IntEnum):
    """Which network a job gets (numbers match the API's enum)."""

    UNSPECIFIED = 0  # the server's default
    HOST = 1
    NONE = 2  # own network namespace with loopback only


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one job. 0 means "not set" (server default, or unlimited)."""

    cpus: float = 0.0
    memory_bytes: int = 0
    pids: int = 0
    io_read_bps: int = 0
    io_write_bps: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_usec: int = 0
    memory_peak_bytes: int = 0
    oom_kills: int = 0


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of one job, as status and list report it. Small on purpose: an ended job is
    kept as one of these (and its record in the store), nothing more."""

    id: str
    owner: str
    command: tuple[str, ...]
    state: State
    exit_code: int = 0  # how the main process ended: its exit code, or
    signal: int = 0  # the signal that killed it (whatever the state)
    oom_killed: bool = False
    started_at: float = 0.0  # Unix time
    ended_at: float = 0.0  # Unix time, 0 while running
    limits: Limits = field(default_factory=Limits)
    usage: Usage = field(default_factory=Usage)
    reason: EndReason = EndReason.UNSPECIFIED  # why it ended; UNSPECIFIED while running
    seq: int = 0  # order of creation in this data dir: List is newest (highest) first
    name: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    working_dir: str = ""
    uid: int | None = None  # the uid it runs as (None: the server's own)
    timeout: float = 0.0  # seconds; 0 = none
    network: Network = Network.UNSPECIFIED
    output_bytes: int = 0  # bytes written to its combined stream, kept or not
    output_start: int = 0  # first offset still kept
    output_blocked: str = ""  # why output is not being stored right now ("" = it is)

    def status_word(self) -> str:
        """The status as the CLI prints it (docs/DESIGN.md, "API")."""
        if self.state is State.RUNNING:
            return "running"
        if self.state is State.EXITED:
            return f"exited (code {self.exit_code})"
        if self.oom_killed:
            return "oom-killed"
        word = "stopped" if self.state is State.STOPPED else "killed"
        if not self.signal:  # e.g. it trapped SIGTERM and exited by itself
            return f"{word} (code {self.exit_code})"
        return f"{word} (signal {self.signal})"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a job's combined output. `offset` counts bytes of the combined stream."""

    stream: Stream
    offset: int
    time: float  # Unix time the engine read it
    data: bytes
