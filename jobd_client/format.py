"""How jobs read on the terminal: status words (docs/DESIGN.md "API"), exit codes
for `run`, the `list` table and JSON. Pure functions of jobd.v1 messages.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import signal
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format

from jobd.v1 import jobd_pb2 as pb

__all__ = ["exit_status", "is_oom_killed", "job_json", "jobs_json", "jobs_table", "status_word"]

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
    """What `run` exits with, as a shell would report the job: its code, or 128 + signal."""
    if job.state == pb.EXITED:
        return job.exit_code
    if job.state in (pb.STOPPED, pb.KILLED) and job.signal > 0:
        return 128 + job.signal
    return 1


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
    return fields


def jobs_json(jobs: Iterable[pb.Job]) -> str:
    return json.dumps([job_json(job) for job in jobs], indent=2)


def _started(job: pb.Job) -> str:
    if not job.HasField("started_at"):
        return "-"
    when: dt.datetime = job.started_at.ToDatetime(tzinfo=dt.UTC).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S")


def jobs_table(jobs: Iterable[pb.Job]) -> str:
    """ID, OWNER, STATUS, STARTED (local time), COMMAND; oldest first, columns aligned."""
    ordered = sorted(jobs, key=lambda job: (job.started_at.seconds, job.started_at.nanos))
    rows = [("ID", "OWNER", "STATUS", "STARTED", "COMMAND")]
    rows += [
        (job.id, job.owner, status_word(job), _started(job), shlex.join(job.command))
        for job in ordered
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]])
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
