"""How jobs read on the terminal: status words (docs/DESIGN.md "API"), exit codes
(`run`, `wait`, `logs -f`, `status`), why a job ended, sizes and durations as people write
them, the `list` table, JSON of jobs and of output chunks. Pure functions of jobd.v1 messages.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shlex
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format

from jobd.v1 import jobd_pb2 as pb

__all__ = [
    "chunk_json",
    "duration",
    "end_note",
    "exit_status",
    "is_oom_killed",
    "job_json",
    "jobs_json",
    "jobs_table",
    "limit_message",
    "size",
    "status_word",
    "summary",
    "timestamp",
]

SIGKILL = int(signal.SIGKILL)


def is_oom_killed(job: pb.Job) -> bool:
    """The kernel killed the job for memory: SIGKILL while the cgroup counted an OOM kill."""
    return job.state == pb.KILLED and job.signal == SIGKILL and job.usage.oom_kills > 0


def status_word(job: pb.Job) -> str:
    """`running`, `exited (code N)`, `stopped (signal N)`, `killed (signal N)`, `oom-killed`."""
    if job.state == pb.RUNNING:
        return "running"
    if job.state == pb.EXITED:
        return f"exited (code {job.exit_code})"
    if job.state == pb.STOPPED:
        return f"stopped (signal {job.signal})"
    if is_oom_killed(job):
        return "oom-killed"
    if job.state == pb.KILLED:
        return f"killed (signal {job.signal})"
    return "unknown"


def exit_status(job: pb.Job) -> int:
    """What `run`, `wait` and `logs -f` exit with, as a shell would report the job: its
    code, or 128 + the signal that ended it (a stopped job that trapped SIGTERM and exited
    by itself: its code). 0 while it runs; 1 for a state this client does not know."""
    if job.state == pb.RUNNING:
        return 0
    if job.state == pb.EXITED:
        return job.exit_code
    if job.state in (pb.STOPPED, pb.KILLED):
        if job.signal > 0:
            return 128 + job.signal
        if job.exit_code:
            return job.exit_code
    return 1


def reason(job: pb.Job) -> int:
    """Why the job ended: the server's reason, or (a server that sends none) what the state
    implies."""
    if job.reason or job.state == pb.RUNNING:
        return job.reason
    if job.state == pb.EXITED:
        return pb.END_REASON_EXIT
    if job.state == pb.STOPPED:
        return pb.END_REASON_STOP
    return pb.END_REASON_OOM if is_oom_killed(job) else pb.END_REASON_SIGNAL


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def end_note(job: pb.Job) -> str:
    """One sentence when the job did not end by itself (`run` prints it), else ""."""
    why = reason(job)
    if why in (pb.END_REASON_UNSPECIFIED, pb.END_REASON_EXIT):
        return ""
    if why == pb.END_REASON_OOM:
        limit = f" ({size(job.limits.memory_bytes)})" if job.limits.memory_bytes else ""
        return f"job {job.id} was oom-killed: it reached its memory limit{limit}"
    if why == pb.END_REASON_TIMEOUT:
        after = duration(job.timeout.ToNanoseconds() / 1e9) if job.HasField("timeout") else ""
        return f"job {job.id} was stopped: it ran past its timeout{' of ' + after if after else ''}"
    if why == pb.END_REASON_STOP:
        return f"job {job.id} was stopped by a stop request ({_signal_name(job.signal)})"
    if why == pb.END_REASON_SERVER_SHUTDOWN:
        return f"job {job.id} was stopped: the server shut down while it ran"
    if why == pb.END_REASON_SERVER_LOST:
        return f"job {job.id} was killed: its server died while it ran"
    return f"job {job.id} was killed by {_signal_name(job.signal)}"


def summary(job: pb.Job) -> str:
    """`run -v`: how it ended, how long it ran, its CPU time and peak memory."""
    ran = _seconds(job)
    return (
        f"job {job.id} {status_word(job)}; ran {duration(ran) if ran is not None else '-'}, "
        f"CPU {duration(job.usage.cpu_usec / 1e6)}, "
        f"peak memory {size(job.usage.memory_peak_bytes)}"
    )


_UNITS = ("", "K", "M", "G", "T", "P")


def size(n: float) -> str:
    """Bytes as the command line reads them (K, M, G, T are powers of 1024): 512M, 23.5G."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{int(value)}B"
    text = f"{value:.1f}".removesuffix(".0") if value < 100 else f"{value:.0f}"
    return f"{text}{_UNITS[unit]}"


def duration(seconds: float) -> str:
    """1.23s, 45ms, 3m04s, 2h05m, 3d04h."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _seconds(job: pb.Job, now: float | None = None) -> float | None:
    if not job.HasField("started_at"):
        return None
    start: float = job.started_at.ToNanoseconds() / 1e9
    end: float = job.ended_at.ToNanoseconds() / 1e9 if job.HasField("ended_at") else 0.0
    if not end:
        end = time.time() if now is None else now
    return max(end - start, 0.0)


_LIMIT_ERROR = re.compile(
    r"limit (?P<field>\w+)=(?P<value>\S+) (?P<what>exceeds the server maximum|is below the "
    r"minimum) (?P<bound>[0-9.e+]+)"
)
# Limits field -> (option, how to show a bound)
_LIMIT_OPTIONS = {
    "memory_bytes": ("--memory", size),
    "io_read_bps": ("--io-read", lambda n: size(n) + "/s"),
    "io_write_bps": ("--io-write", lambda n: size(n) + "/s"),
    "cpus": ("--cpus", lambda n: f"{n:g}"),
    "pids": ("--pids", lambda n: f"{n:g}"),
}


def limit_message(message: str, typed: Mapping[str, str]) -> str:
    """A server's "limit memory_bytes=1.09951e+12 exceeds the server maximum 2.5276e+10" in
    the units the user typed: "--memory 1T exceeds the server's maximum 23.5G"."""
    match = _LIMIT_ERROR.search(message)
    if match is None or match["field"] not in _LIMIT_OPTIONS:
        return message
    option, show = _LIMIT_OPTIONS[match["field"]]
    given = typed.get(option)
    if given is None:  # the server's default is out of range: not the user's doing
        return message
    bound = show(float(match["bound"]))
    what = "exceeds the server's maximum" if "exceeds" in match["what"] else "is below the minimum"
    return f"{match.string[: match.start()]}{option} {given} {what} {bound}"


def timestamp(ts: Any) -> str:
    """RFC 3339 in UTC with microseconds, as `docker logs -t`: 2026-12-01T07:01:02.123456Z."""
    when: dt.datetime = ts.ToDatetime(tzinfo=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chunk_json(chunk: pb.OutputChunk) -> str:
    """One output chunk as one line of JSON: log, stream, time, offset.

    `log` is the chunk's text. Bytes that are not UTF-8 appear in it as the escapes \\udcXX
    (Python's surrogateescape: json.loads(line)["log"].encode("utf-8", "surrogateescape")
    gives the bytes back), and such a chunk also carries `log_base64`, its exact bytes, for
    parsers that replace lone surrogates (jq, Go).
    """
    data = bytes(chunk.data)
    record: dict[str, Any] = {
        "log": data.decode("utf-8", "surrogateescape"),
        "stream": "stderr" if chunk.stream == pb.STDERR else "stdout",
        "time": timestamp(chunk.time),
        "offset": chunk.offset,
    }
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        record["log_base64"] = base64.b64encode(data).decode("ascii")
    return json.dumps(record, ensure_ascii=True)


def job_json(job: pb.Job) -> dict[str, Any]:
    """Every field of job under its proto name (proto3 JSON mapping), plus `status`.
    Limits and usage always appear (zeros if the server sent none); ended_at once ended."""
    full = pb.Job()
    full.CopyFrom(job)
    full.limits.SetInParent()
    full.usage.SetInParent()
    fields: dict[str, Any] = json_format.MessageToDict(
        full, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    fields["status"] = status_word(job)
    fields["output_dropped_bytes"] = job.output_start  # older output no longer kept
    return fields


def jobs_json(jobs: Iterable[pb.Job]) -> str:
    return json.dumps([job_json(job) for job in jobs], indent=2)


def _started(job: pb.Job) -> str:
    if not job.HasField("started_at"):
        return "-"
    when: dt.datetime = job.started_at.ToDatetime(tzinfo=dt.UTC).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S")


def jobs_table(jobs: Iterable[pb.Job], now: float | None = None) -> str:
    """ID, NAME, OWNER, STATUS, STARTED (local time), DURATION (so far, while it runs),
    COMMAND; oldest first, columns aligned."""
    ordered = sorted(jobs, key=lambda job: (job.started_at.seconds, job.started_at.nanos))
    header = ("ID", "NAME", "OWNER", "STATUS", "STARTED", "DURATION", "COMMAND")
    rows = [header]
    for job in ordered:
        ran = _seconds(job, now)
        rows.append(
            (
                job.id,
                job.name or "-",
                job.owner,
                status_word(job),
                _started(job),
                duration(ran) if ran is not None else "-",
                shlex.join(job.command),
            )
        )
    last = len(header) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row[:last], widths, strict=True)), row[last]]
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
