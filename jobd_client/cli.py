"""`jobd-client`: the asyncclick commands, run on trio. Owns the exit codes, Ctrl-C and the
one-line error messages; the calls are in `session`, the formatting in `format`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncclick as click
import trio
from asyncclick.core import ParameterSource

from jobd.units import parse_duration, parse_rate, parse_size
from jobd.v1 import jobd_pb2 as pb

from . import format as fmt
from .errors import ClientError, OutputClosed
from .session import DEFAULT_TIMEOUT, Api, Settings, open_api

PROG = "jobd-client"
DEFAULT_SERVER = "127.0.0.1:9090"
DEFAULT_USER = "alice"
CERTS = Path("certs")
# After a follow ends, how long `run` waits between looks for the job's final state.
FINAL_STATE_POLL = 0.05

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class App:
    """What the commands share: the global options, and what Ctrl-C must reach."""

    settings: Settings | None = None
    signal: int = 0  # the first SIGINT/SIGTERM received, 0 if none
    command_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cleanup_scope: trio.CancelScope | None = None  # a second Ctrl-C cancels it

    def require_settings(self) -> Settings:
        assert self.settings is not None, "the group callback sets the settings"
        return self.settings


class _Parsed(click.ParamType[Any]):
    """A command line value read by one of the `units` parsers; errors are usage errors."""

    def __init__(self, name: str, parse: Callable[[str], float | int]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Parsed("SIZE", parse_size)
RATE = _Parsed("SIZE/s", parse_rate)
DURATION = _Parsed("DURATION", parse_duration)


def _parse_server(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT, e.g. {DEFAULT_SERVER}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _parse_env(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    env = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        env[key] = val
    return env


HELP = """Start, stop, inspect and follow jobs on a jobd server (gRPC over mutual TLS).

\b
Examples:
  jobd-client start -- make -j4          # prints the new job's id
  jobd-client start --cpus 0.5 --memory 512M --pids 100 -- ./build.sh
  jobd-client status 6f1c…               # running | exited (code 0) | …
  jobd-client logs -f 6f1c…              # job stdout to stdout, stderr to stderr
  jobd-client run -- sh -c 'exit 3'      # exits 3
  jobd-client --user bob list
  jobd-client --server jobd.example:9090 --cert me.pem --key me.key list

Without --cert/--key (or --user) the client is alice, with certs/alice.pem and
certs/alice.key under the current directory: `just certs` creates them and `just
serve` serves with them. Unary calls give up after --timeout seconds (10);
`logs -f` and `run` wait as long as the job runs. Exit codes: 0 ok, 1 error
(one line on stderr), 2 usage, 130 after Ctrl-C; `run` exits with the job's own.
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="JOBD_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    show_envvar=True,
    metavar="HOST:PORT",
    callback=_parse_server,
    help="The server; HOST is also the name its certificate must carry.",
)
@click.option(
    "--ca",
    envvar="JOBD_CA",
    default=str(CERTS / "ca.pem"),
    show_default=True,
    show_envvar=True,
    metavar="FILE",
    help="CA certificate that signed the server's.",
)
@click.option(
    "--cert",
    envvar="JOBD_CERT",
    show_envvar=True,
    metavar="FILE",
    help="Client certificate (PEM); needs --key.",
)
@click.option(
    "--key", envvar="JOBD_KEY", show_envvar=True, metavar="FILE", help="Client private key (PEM)."
)
@click.option(
    "--user",
    envvar="JOBD_USER",
    show_envvar=True,
    metavar="NAME",
    help=f"Short for --cert {CERTS}/NAME.pem --key {CERTS}/NAME.key [default: {DEFAULT_USER}].",
)
@click.option(
    "--timeout",
    "unary_timeout",
    envvar="JOBD_TIMEOUT",
    show_envvar=True,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="How long a unary call (all but logs -f, run's follow) may take.",
)
@click.pass_context
async def cli(
    ctx: click.Context,
    server: tuple[str, int],
    ca: str,
    cert: str | None,
    key: str | None,
    user: str | None,
    unary_timeout: float,
) -> None:
    app: App = ctx.ensure_object(App)
    cert, key, cert_hint = _client_files(ctx, cert, key, user)
    ca_hint = ": run `just certs` or pass --ca" if _is_default(ctx, "ca") else ""
    app.settings = Settings(
        host=server[0],
        port=server[1],
        ca=Path(ca),
        cert=Path(cert),
        key=Path(key),
        timeout=unary_timeout,
        cert_hint=cert_hint,
        ca_hint=ca_hint,
    )


def _is_default(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None)


def _client_files(
    ctx: click.Context, cert: str | None, key: str | None, user: str | None
) -> tuple[str, str, str]:
    """The certificate and key to present, and how to get them when they are the defaults.

    --cert/--key beat --user, except that --user on the command line beats JOBD_CERT and
    JOBD_KEY from the environment.
    """
    source = ctx.get_parameter_source
    user_typed = source("user") is ParameterSource.COMMANDLINE
    if user_typed and ParameterSource.COMMANDLINE in (source("cert"), source("key")):
        raise click.UsageError("use either --user or --cert/--key, not both")
    if (cert or key) and not user_typed:
        if not (cert and key):
            raise click.UsageError("--cert and --key go together: pass both")
        return cert, key, ""
    name = user or DEFAULT_USER
    if "/" in name:
        raise click.BadParameter(f"{name!r} is not a user name", param_hint="--user")
    hint = ": run `just certs` or pass --cert/--key"
    return str(CERTS / f"{name}.pem"), str(CERTS / f"{name}.key"), hint


def _limit_options(command: F) -> F:
    """--cpus, --memory, --pids, --io-read, --io-write, --env, --workdir (start and run)."""
    options = [
        click.option(
            "--cpus", type=click.FloatRange(min=0), metavar="N", help="CPU cores, e.g. 0.5."
        ),
        click.option(
            "--memory", type=SIZE, metavar="SIZE", help="Memory limit, e.g. 512M, 1G, 1.5GiB."
        ),
        click.option(
            "--pids", type=click.IntRange(min=0), metavar="N", help="Most processes at once."
        ),
        click.option(
            "--io-read", type=RATE, metavar="SIZE/s", help="Read bytes per second, e.g. 10M/s."
        ),
        click.option(
            "--io-write", type=RATE, metavar="SIZE/s", help="Write bytes per second, e.g. 10M/s."
        ),
        click.option(
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            callback=_parse_env,
            help="Add to the job's environment (repeatable).",
        ),
        click.option("--workdir", metavar="DIR", help="Working directory on the server."),
    ]
    for option in reversed(options):
        command = option(command)
    return click.argument("command", nargs=-1, required=True, metavar="[--] CMD [ARGS]...")(command)


def _start_request(
    command: tuple[str, ...],
    cpus: float | None,
    memory: int | None,
    pids: int | None,
    io_read: int | None,
    io_write: int | None,
    env: dict[str, str],
    workdir: str | None,
) -> pb.StartRequest:
    limits = pb.Limits(
        cpus=cpus or 0,
        memory_bytes=memory or 0,
        pids=pids or 0,
        io_read_bps=io_read or 0,
        io_write_bps=io_write or 0,
    )
    return pb.StartRequest(command=command, env=env, working_dir=workdir or "", limits=limits)


# Commands taking CMD stop reading options at the first argument: `start ls -l` works.
_COMMAND_SETTINGS = {"allow_interspersed_args": False}


@cli.command(context_settings=_COMMAND_SETTINGS)
@_limit_options
@click.pass_obj
async def start(app: App, /, command: tuple[str, ...], **limits: Any) -> None:
    """Start CMD as a new job and print its id."""
    async with open_api(app.require_settings()) as api:
        job = await api.start(_start_request(command, **limits))
    click.echo(job.id)


@cli.command()
@click.option(
    "--grace",
    type=DURATION,
    metavar="DURATION",
    help="Time between SIGTERM and SIGKILL, e.g. 5s, 500ms, 0 [default: the server's, 5s].",
)
@click.argument("job_id", metavar="ID")
@click.pass_obj
async def stop(app: App, job_id: str, grace: float | None) -> None:
    """Stop a job (every process it started) and print how it ended."""
    async with open_api(app.require_settings()) as api:
        job = await api.stop(job_id, grace)
    click.echo(fmt.status_word(job))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print every field as JSON.")
@click.argument("job_id", metavar="ID")
@click.pass_obj
async def status(app: App, job_id: str, as_json: bool) -> None:
    """Print a job's status word: running, exited (code N), …"""
    async with open_api(app.require_settings()) as api:
        job = await api.status(job_id)
    if as_json:
        click.echo(json.dumps(fmt.job_json(job), indent=2))
    else:
        click.echo(fmt.status_word(job))


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the job ends.")
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start at this byte of the job's combined output.",
)
@click.argument("job_id", metavar="ID")
@click.pass_obj
async def logs(app: App, job_id: str, follow: bool, offset: int) -> None:
    """Write a job's output: its stdout to stdout, its stderr to stderr."""
    async with open_api(app.require_settings()) as api:
        await _copy_output(api, job_id, follow=follow, offset=offset)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as a JSON array.")
@click.pass_obj
async def list_(app: App, as_json: bool) -> None:
    """List your jobs (every job, for an admin)."""
    async with open_api(app.require_settings()) as api:
        jobs = await api.list()
    click.echo(fmt.jobs_json(jobs) if as_json else fmt.jobs_table(jobs))


@cli.command(context_settings=_COMMAND_SETTINGS)
@_limit_options
@click.pass_obj
async def run(app: App, /, command: tuple[str, ...], **limits: Any) -> int:
    """Start CMD, follow its output, exit with its code.

    Exits with the job's exit code, or 128 + the signal that ended it (137 when
    oom-killed). Ctrl-C stops the job with the server's grace period and exits
    130; a second Ctrl-C leaves without waiting for the stop.
    """
    settings = app.require_settings()
    async with open_api(settings) as api:
        job = await api.start(_start_request(command, **limits))
        followed = False
        try:
            await _copy_output(api, job.id, follow=True)
            followed = True
        finally:
            if not followed and app.signal:
                await _stop_after_interrupt(app, settings, job.id)
        job = await _final_state(api, job.id, settings.timeout)
    return fmt.exit_status(job)


def _write(stream: int, data: bytes) -> None:
    # Blocking writes, flushed per chunk: a CLI's output is its reader's pace.
    out = sys.stderr.buffer if stream == pb.STDERR else sys.stdout.buffer
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        raise OutputClosed() from None


async def _copy_output(api: Api, job_id: str, *, follow: bool, offset: int = 0) -> None:
    chunks = api.output(job_id, follow=follow, offset=offset)
    try:
        async for chunk in chunks:
            _write(chunk.stream, chunk.data)
    finally:
        await chunks.aclose()


async def _final_state(api: Api, job_id: str, patience: float) -> pb.Job:
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


async def _stop_after_interrupt(app: App, settings: Settings, job_id: str) -> None:
    """Stop the job `run` was following, on a new connection (the old one is being
    cancelled), shielded from the Ctrl-C that asked for it but not from a second one."""
    _say(f"interrupted: stopping job {job_id} (Ctrl-C again to leave without waiting)")
    with trio.CancelScope(shield=True) as scope:
        app.cleanup_scope = scope
        try:
            async with open_api(settings) as api:
                job = await api.stop(job_id)
            _say(f"job {job_id}: {fmt.status_word(job)}")
        except ClientError as exc:
            _say(f"could not stop job {job_id}: {exc.message}")
    if scope.cancelled_caught:
        _say(f"left without waiting for job {job_id} to stop")


def _say(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


async def _watch_signals(signals: Any, app: App) -> None:
    """First SIGINT/SIGTERM: cancel the command. Second: cancel its cleanup too."""
    async for signum in signals:
        if not app.signal:
            app.signal = signum
            app.command_scope.cancel()
        elif app.cleanup_scope is not None:
            app.cleanup_scope.cancel()


async def _invoke(argv: list[str], app: App) -> int:
    """Run the command line; every failure becomes a message and an exit code."""
    try:
        result = await cli.main(args=argv, prog_name=PROG, standalone_mode=False, obj=app)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
    except OutputClosed as exc:
        return exc.exit_code
    except ClientError as exc:
        if not app.signal:
            _say(exc.message)
        return exc.exit_code
    except SystemExit as exc:  # asyncclick exits 1 on EPIPE while writing to stdout
        return exc.code if isinstance(exc.code, int) else 1
    return result if isinstance(result, int) else 0


async def _main(argv: list[str]) -> int:
    app = App()
    code = 1
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, app)
            with app.command_scope:
                try:
                    code = await _invoke(argv, app)
                except Exception:
                    if not app.signal:
                        raise
            nursery.cancel_scope.cancel()
    return 128 + app.signal if app.signal else code


def main() -> None:
    """The console script: `jobd-client` on trio."""
    try:
        code = trio.run(_main, sys.argv[1:])
    except KeyboardInterrupt:  # before or after the signal receiver: still no traceback
        code = 130
    if code == OutputClosed().exit_code:
        # stdout's reader went away: point stdout at /dev/null so the final flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)
