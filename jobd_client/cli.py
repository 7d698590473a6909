"""`jobd-client`: the group, its global options (server, certificates, context, timeout)
and the one place failures become a message and an exit code; Ctrl-C. The commands are in
`commands/`, the calls in `session`, the formatting in `format`, contexts in `config`.
"""

from __future__ import annotations

import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import asyncclick as click
import trio
from asyncclick.core import ParameterSource

from . import commands
from .app import PROG, App, say
from .config import Config, Context
from .errors import ClientError, OutputClosed, find_cause
from .session import DEFAULT_TIMEOUT, Settings

DEFAULT_SERVER = "127.0.0.1:9090"
DEFAULT_USER = "alice"
CERTS = Path("certs")
ENV = "JOBD_CLIENT_"  # the client's environment variables; JOBD_* are the server's


def parse_server(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT, e.g. {DEFAULT_SERVER}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        parse_server(value)
    return value


def _version() -> str:
    try:
        return version("jobd")
    except PackageNotFoundError:
        return "unknown"


HELP = """Start, stop, inspect and follow jobs on a jobd server (gRPC over mutual TLS).

\b
Examples:
  jobd-client run -- make -j4              # follow it, exit with its code
  jobd-client start --name build --cpus 0.5 --memory 512M -- ./build.sh
  jobd-client logs -f -t --tail 20 build   # by name, id or id prefix (6f1c)
  jobd-client wait build                   # exits with the job's code
  jobd-client list --state running -q | xargs jobd-client stop
  jobd-client rm --ended
  echo hello | jobd-client run -i -- cat
  jobd-client context add prod --server jobd.example:9090 --ca ca.pem \\
      --cert me.pem --key me.key

\b
Where the server is and who we are, the first that applies:
  --server/--ca/--cert/--key (or JOBD_CLIENT_SERVER, _CA, _CERT, _KEY);
  --context NAME (JOBD_CLIENT_CONTEXT), else the current context (`context
  use`), unless --server is given; else 127.0.0.1:9090 with certs/ca.pem and
  certs/alice.pem, certs/alice.key under the current directory (`just certs`
  creates them and registers them as the context `dev`). --user NAME takes
  NAME.pem and NAME.key beside the context's certificate (else in certs/).

\b
Unary calls give up after --timeout seconds (10); `logs -f`, `run` and `wait`
wait as long as the job runs. Exit codes: 0 ok, 1 error (one line on stderr),
2 usage, 130 after Ctrl-C; `run`, `wait`, `logs -f` exit with the job's own
(128 + signal when a signal ended it). Shell completion: `jobd-client
completion bash|zsh|fish`.
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.option(
    "--context",
    "context_name",
    envvar=[ENV + "CONTEXT", "JOBD_CONTEXT"],
    show_envvar=True,
    metavar="NAME",
    help="A context of the client config (`jobd-client context ls`).",
)
@click.option(
    "--server",
    envvar=ENV + "SERVER",
    show_envvar=True,
    metavar="HOST:PORT",
    callback=_check_server,
    help=f"The server; HOST is also the name its certificate must carry [default: the "
    f"context's, else {DEFAULT_SERVER}].",
)
@click.option(
    "--ca",
    envvar=ENV + "CA",
    show_envvar=True,
    metavar="FILE",
    help=f"CA certificate that signed the server's [default: the context's, else {CERTS}/ca.pem].",
)
@click.option(
    "--cert",
    envvar=ENV + "CERT",
    show_envvar=True,
    metavar="FILE",
    help="Client certificate (PEM); needs --key.",
)
@click.option(
    "--key", envvar=ENV + "KEY", show_envvar=True, metavar="FILE", help="Client private key (PEM)."
)
@click.option(
    "--user",
    envvar=ENV + "USER",
    show_envvar=True,
    metavar="NAME",
    help=f"Use NAME.pem and NAME.key beside the context's certificate, else in {CERTS}/ "
    f"[default: {DEFAULT_USER}].",
)
@click.option(
    "--timeout",
    "unary_timeout",
    envvar=ENV + "TIMEOUT",
    show_envvar=True,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="How long a unary call (all but logs -f, run's follow, wait) may take.",
)
@click.pass_context
async def cli(
    ctx: click.Context,
    context_name: str | None,
    server: str | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    unary_timeout: float,
) -> None:
    app: App = ctx.ensure_object(App)
    if ctx.invoked_subcommand in ("context", "completion"):
        return  # they need no server (and `context` must work with a broken one)
    chosen = _context(context_name, server)
    cert, key, cert_hint = _client_files(ctx, cert, key, user, chosen)
    if ca is None and chosen is not None:
        ca = str(chosen.ca)
    ca_hint = ": run `just certs` or pass --ca" if ca is None else ""
    host, port = parse_server(server or (chosen.server if chosen else DEFAULT_SERVER))
    app.settings = Settings(
        host=host,
        port=port,
        ca=Path(ca or CERTS / "ca.pem"),
        cert=Path(cert),
        key=Path(key),
        timeout=unary_timeout,
        cert_hint=cert_hint,
        ca_hint=ca_hint,
    )


def _context(name: str | None, server: str | None) -> Context | None:
    """The context named, else the current one unless a server was given."""
    if not name and server is not None:
        return None
    return Config.load().select(name)


def _client_files(
    ctx: click.Context,
    cert: str | None,
    key: str | None,
    user: str | None,
    chosen: Context | None,
) -> tuple[str, str, str]:
    """The certificate and key to present, and how to get them when they are the defaults.

    --cert/--key beat --user, except that --user on the command line beats JOBD_CLIENT_CERT
    and JOBD_CLIENT_KEY from the environment; both beat the context.
    """
    source = ctx.get_parameter_source
    user_typed = source("user") is ParameterSource.COMMANDLINE
    if user_typed and ParameterSource.COMMANDLINE in (source("cert"), source("key")):
        raise click.UsageError("use either --user or --cert/--key, not both")
    if (cert or key) and not user_typed:
        if not (cert and key):
            raise click.UsageError("--cert and --key go together: pass both")
        return cert, key, ""
    if user is None and chosen is not None:
        return str(chosen.cert), str(chosen.key), f" (context {chosen.name})"
    name = user or DEFAULT_USER
    if "/" in name or name in ("", ".", ".."):
        raise click.BadParameter(f"{name!r} is not a user name", param_hint="--user")
    if chosen is not None:
        where = chosen.cert.parent
        return str(where / f"{name}.pem"), str(where / f"{name}.key"), f" (context {chosen.name})"
    hint = ": run `just certs` or pass --cert/--key"
    return str(CERTS / f"{name}.pem"), str(CERTS / f"{name}.key"), hint


commands.register(cli)


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
            say(exc.message)
        return exc.exit_code
    except SystemExit as exc:  # asyncclick exits 1 on EPIPE while writing to stdout
        return exc.code if isinstance(exc.code, int) else 1
    except BaseExceptionGroup as group:  # a command's nursery: report the telling error
        cause = find_cause(group)
        if not isinstance(cause, ClientError):
            raise
        if not app.signal and not isinstance(cause, OutputClosed):
            say(cause.message)
        return cause.exit_code
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
