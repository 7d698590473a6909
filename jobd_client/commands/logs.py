"""`logs`: a job's output, byte for byte per stream, or with timestamps, or as JSON lines;
seeking (`--tail`, `--since`, one stream) is the server's. Also what `run` follows with:
`copy_output` and `final_state`."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from typing import Any

import asyncclick as click
import trio
from google.protobuf.timestamp_pb2 import Timestamp

from jobd.units import parse_duration
from jobd.v1 import jobd_pb2 as pb

from .. import format as fmt
from ..app import App, say
from ..errors import ClientError, OutputClosed
from ..session import Api, open_api

# After a follow ends, how long between looks for the job's final state.
FINAL_STATE_POLL = 0.05


class _Since(click.ParamType[Any]):
    """A duration back from now (10m, 1h) or a time (RFC 3339; without a zone, local)."""

    name = "DURATION|TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(value))
        except ValueError:
            pass
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(
                f"{value!r} is neither a duration (10m, 1h) nor a time "
                "(2026-12-01T07:00:00Z, 2026-12-01 08:00)",
                param,
                ctx,
            )
        return when if when.tzinfo else when.astimezone()


@dataclass(slots=True)
class Writer:
    """Writes chunks to our stdout/stderr as they came: raw, with a timestamp at the start of
    each line (per stream, so a line split over chunks gets one), or as JSON lines."""

    timestamps: bool = False
    as_json: bool = False
    _at_line_start: dict[int, bool] = field(default_factory=dict)

    def write(self, chunk: pb.OutputChunk) -> None:
        if self.as_json:
            _write(pb.STDOUT, (fmt.chunk_json(chunk) + "\n").encode())
            return
        data = bytes(chunk.data)
        if self.timestamps and data:
            prefix = (fmt.timestamp(chunk.time) + " ").encode()
            lines = data.splitlines(keepends=True)
            start = self._at_line_start.get(chunk.stream, True)
            parts = []
            for i, line in enumerate(lines):
                parts.append(prefix + line if (i > 0 or start) else line)
            self._at_line_start[chunk.stream] = data.endswith(b"\n")
            data = b"".join(parts)
        _write(chunk.stream, data)


def _write(stream: int, data: bytes) -> None:
    # Blocking writes, flushed per chunk: a CLI's output is its reader's pace.
    out = sys.stderr.buffer if stream == pb.STDERR else sys.stdout.buffer
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        raise OutputClosed() from None


async def copy_output(
    api: Api,
    job_id: str,
    *,
    follow: bool,
    request: pb.OutputRequest | None = None,
    writer: Writer | None = None,
) -> None:
    writer = writer or Writer()
    chunks = api.output(job_id, follow=follow, request=request)
    try:
        async for chunk in chunks:
            writer.write(chunk)
    finally:
        await chunks.aclose()


async def final_state(api: Api, job_id: str, patience: float) -> pb.Job:
    """The job's state once its output ended: the server may take a moment to record it."""
    job = await api.status(job_id)
    delay = FINAL_STATE_POLL
    with trio.move_on_after(patience):
        while job.state == pb.RUNNING:
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)
            job = await api.status(job_id)
    if job.state == pb.RUNNING:
        raise ClientError(f"job {job_id}: its output ended but the server says it still runs")
    return job


def dropped_note(job: pb.Job, offset: int) -> str:
    """What to say when output older than what the reader asked for is gone."""
    if job.output_start <= offset:
        return ""
    return (
        f"job {job.id}: its first {fmt.size(job.output_start)} of output "
        f"({job.output_start} bytes) were dropped (the server keeps at most its "
        "--max-job-output per job); showing what is kept"
    )


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the job ends.")
@click.option(
    "-t", "--timestamps", is_flag=True, help="Start each line with when it was written (UTC)."
)
@click.option(
    "--tail",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Only the last N lines (the server seeks; 0: all).",
)
@click.option("--since", type=_Since(), help="Only output written since, e.g. 10m or a time.")
@click.option("--stdout", "only_stdout", is_flag=True, help="Only the job's stdout.")
@click.option("--stderr", "only_stderr", is_flag=True, help="Only the job's stderr.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per chunk on stdout: log, stream, time, offset.",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this byte of the job's combined output.",
)
@click.option(
    "--no-exit-code",
    is_flag=True,
    help="With -f, exit 0 however the job ended.",
)
@click.argument("ref", metavar="ID")
@click.pass_obj
async def logs(
    app: App,
    ref: str,
    follow: bool,
    timestamps: bool,
    tail: int,
    since: dt.datetime | None,
    only_stdout: bool,
    only_stderr: bool,
    as_json: bool,
    offset: int,
    no_exit_code: bool,
) -> int:
    """Write a job's output: its stdout to stdout, its stderr to stderr.

    \b
    With -f, once the job ends, exits as `wait` does: the job's exit code, or
    128 + the signal that ended it (--no-exit-code: 0).
    --json writes one object per output chunk and line:
      {"log": "...", "stream": "stdout", "time": "2026-12-01T07:01:02.123456Z",
       "offset": 0}
    Bytes that are not UTF-8 appear in "log" as \\udcXX escapes (Python's
    surrogateescape, lossless), and such a chunk also has "log_base64", its
    exact bytes.
    """
    if only_stdout and only_stderr:
        raise click.UsageError("--stdout and --stderr: pick one (neither: both)")
    settings = app.require_settings()
    request = pb.OutputRequest(offset=offset, tail_lines=tail)
    if since is not None:
        stamp = Timestamp()
        stamp.FromDatetime(since.astimezone(dt.UTC))
        request.since.CopyFrom(stamp)
    if only_stdout or only_stderr:
        request.stream = pb.STDOUT if only_stdout else pb.STDERR
    async with open_api(settings) as api:
        job_id = await api.resolve(ref)
        job = await api.status(job_id)
        if tail == 0 and since is None and (note := dropped_note(job, offset)):
            say(note)
        writer = Writer(timestamps=timestamps, as_json=as_json)
        await copy_output(api, job_id, follow=follow, request=request, writer=writer)
        if not follow or no_exit_code:
            return 0
        job = await final_state(api, job_id, settings.timeout)
    return fmt.exit_status(job)


COMMANDS = [logs]
