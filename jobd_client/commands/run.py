"""`start` and `run`: the job's command, limits, name, labels, timeout, network and stdin
into a StartRequest; `run` then follows the output, says why the job ended when it did not
end by itself, and exits with the job's code."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import asyncclick as click
import purerpc
import trio
from google.protobuf.duration_pb2 import Duration

from jobd.v1 import jobd_pb2 as pb

from .. import format as fmt
from ..app import (
    DURATION,
    RATE,
    SIZE,
    App,
    parse_pairs,
    require_text,
    say,
    stdin_kind,
    typed_text,
)
from ..errors import ClientError, describe, find_cause
from ..session import Api, Settings, open_api
from .logs import copy_output, final_state

F = TypeVar("F", bound=Callable[..., Any])
STDIN_READ = 64 * 1024  # bytes per Input message
_NETWORKS = {"host": pb.NETWORK_HOST, "none": pb.NETWORK_NONE}
# Commands taking CMD stop reading options at the first argument: `start ls -l` works.
_COMMAND_SETTINGS = {"allow_interspersed_args": False}


def job_options(command: F) -> F:
    """The options of start and run, and CMD."""
    options = [
        click.option(
            "--cpus", type=click.FloatRange(min=0), metavar="N", help="CPU cores, e.g. 0.5."
        ),
        click.option(
            "--memory",
            type=SIZE,
            metavar="SIZE",
            help="Memory limit, e.g. 512M, 1G, 1.5GiB.",
        ),
        click.option(
            "--pids", type=click.IntRange(min=0), metavar="N", help="Most processes at once."
        ),
        click.option(
            "--io-read",
            type=RATE,
            metavar="SIZE/s",
            help="Read bytes per second, e.g. 10M/s.",
        ),
        click.option(
            "--io-write",
            type=RATE,
            metavar="SIZE/s",
            help="Write bytes per second, e.g. 10M/s.",
        ),
        click.option(
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            callback=parse_pairs,
            help="Add to the job's environment (repeatable).",
        ),
        click.option("--workdir", metavar="DIR", help="Working directory on the server."),
        click.option(
            "--name", metavar="NAME", help="A name for the job, unique among your kept jobs."
        ),
        click.option(
            "--label",
            "labels",
            multiple=True,
            metavar="KEY=VALUE",
            callback=parse_pairs,
            help="A label for `list --label` (repeatable).",
        ),
        click.option(
            "--timeout",
            "job_timeout",
            type=DURATION,
            metavar="DURATION",
            help="Stop the job once it has run this long, e.g. 30s, 10m, 2h.",
        ),
        click.option(
            "--network",
            type=click.Choice(sorted(_NETWORKS)),
            help="host: the host's network; none: loopback only [default: the server's].",
        ),
        click.option(
            "-i",
            "--interactive",
            "stdin",
            is_flag=True,
            help="Send our stdin to the job's (EOF when it ends; Ctrl-D on a terminal).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return click.argument("command", nargs=-1, required=True, metavar="[--] CMD [ARGS]...")(command)


def start_request(
    command: tuple[str, ...],
    *,
    cpus: float | None,
    memory: int | None,
    pids: int | None,
    io_read: int | None,
    io_write: int | None,
    env: dict[str, str],
    workdir: str | None,
    name: str | None,
    labels: dict[str, str],
    job_timeout: float | None,
    network: str | None,
    stdin: bool,
) -> pb.StartRequest:
    for index, arg in enumerate(command):
        require_text("the command" if index == 0 else f"argument {index}", arg)
    for key, value in env.items():
        require_text("an --env name", key)
        require_text(f"--env {key}=", value)
    for key, value in labels.items():
        require_text("a --label key", key)
        require_text(f"--label {key}=", value)
    require_text("--workdir", workdir or "")
    require_text("--name", name or "")
    limits = pb.Limits(
        cpus=cpus or 0,
        memory_bytes=memory or 0,
        pids=pids or 0,
        io_read_bps=io_read or 0,
        io_write_bps=io_write or 0,
    )
    request = pb.StartRequest(
        command=command,
        env=env,
        working_dir=workdir or "",
        limits=limits,
        name=name or "",
        labels=labels,
        stdin=stdin,
        network=_NETWORKS.get(network or "", pb.NETWORK_UNSPECIFIED),
    )
    if job_timeout is not None:
        duration = Duration()
        duration.FromNanoseconds(int(job_timeout * 1e9))
        request.timeout.CopyFrom(duration)
    return request


async def start_job(api: Api, command: tuple[str, ...], options: dict[str, Any]) -> pb.Job:
    """Start, with a limit error in the units the user typed."""
    request = start_request(command, **options)
    try:
        return await api.start(request)
    except Exception as exc:
        cause = find_cause(exc)
        if not isinstance(cause, purerpc.RpcFailedError):
            raise
        typed = {
            f"--{name.replace('_', '-')}": text
            for name in ("cpus", "memory", "pids", "io_read", "io_write")
            if (text := typed_text(options[name])) is not None
        }
        message = describe(cause, "", 0)
        raise ClientError(fmt.limit_message(message, typed)) from None


async def read_stdin() -> AsyncIterator[bytes]:
    """Our stdin, in pieces as they come, until EOF (Ctrl-D on a terminal). Read in a thread:
    a non-blocking fd would change the terminal the shell shares with us."""
    fd = sys.stdin.fileno()
    while data := await trio.to_thread.run_sync(os.read, fd, STDIN_READ, abandon_on_cancel=True):
        yield data


def _warn_unsent_stdin(stdin: bool) -> None:
    if not stdin and (kind := stdin_kind()):
        say(f"stdin is a {kind} and is not sent to the job: pass -i to send it")


@click.command(context_settings=_COMMAND_SETTINGS)
@job_options
@click.pass_obj
async def start(app: App, /, command: tuple[str, ...], **options: Any) -> None:
    """Start CMD as a new job and print its id.

    With -i, sends our stdin to the job and returns once it ends (EOF).
    """
    async with open_api(app.require_settings()) as api:
        job = await start_job(api, command, options)
        click.echo(job.id)
        if options["stdin"]:
            await api.input(job.id, read_stdin())


@click.command(context_settings=_COMMAND_SETTINGS)
@job_options
@click.option(
    "-v",
    "--summary",
    is_flag=True,
    help="At the end, print how long the job ran, its CPU time and peak memory (stderr).",
)
@click.pass_obj
async def run(app: App, /, command: tuple[str, ...], summary: bool, **options: Any) -> int:
    """Start CMD, follow its output, exit with its code.

    Exits with the job's exit code, or 128 + the signal that ended it (137 when
    oom-killed). When the job did not exit by itself (oom-killed, killed,
    stopped, timed out, its server stopped or died) one line on stderr says so.
    Ctrl-C stops the job with the server's grace period and exits 130; a second
    Ctrl-C leaves without waiting for the stop. Without -i the job's stdin is
    empty, and a piped stdin draws a warning.
    """
    settings = app.require_settings()
    _warn_unsent_stdin(options["stdin"])
    async with open_api(settings) as api:
        job = await start_job(api, command, options)
        followed = False
        try:
            async with trio.open_nursery() as nursery:
                if options["stdin"]:
                    nursery.start_soon(api.input, job.id, read_stdin())
                await copy_output(api, job.id, follow=True)
                followed = True
                nursery.cancel_scope.cancel()  # the job has ended: its stdin is moot
        finally:
            if not followed and app.signal:
                await _stop_after_interrupt(app, settings, job.id)
        job = await final_state(api, job.id, settings.timeout)
    if note := fmt.end_note(job):
        say(note)
    if summary:
        say(fmt.summary(job))
    return fmt.exit_status(job)


async def _stop_after_interrupt(app: App, settings: Settings, job_id: str) -> None:
    """Stop the job `run` was following, on a new connection (the old one is being
    cancelled), shielded from the Ctrl-C that asked for it but not from a second one."""
    say(f"interrupted: stopping job {job_id} (Ctrl-C again to leave without waiting)")
    with trio.CancelScope(shield=True) as scope:
        app.cleanup_scope = scope
        try:
            async with open_api(settings) as api:
                job = await api.stop(job_id)
            say(f"job {job_id}: {fmt.status_word(job)}")
        except ClientError as exc:
            say(f"could not stop job {job_id}: {exc.message}")
    if scope.cancelled_caught:
        say(f"left without waiting for job {job_id} to stop")


COMMANDS = [start, run]
