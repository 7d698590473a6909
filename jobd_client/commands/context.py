"""`context add|ls|use|rm`: the named servers of the client config (`config.py`), so that
the client works from any directory without flags."""

from __future__ import annotations

from pathlib import Path

import asyncclick as click

from ..app import say
from ..config import Config, Context, check_name, config_path
from ..errors import ClientError


def _absolute_file(what: str, value: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ClientError(f"no {what} at {path}", exit_code=2)
    return path


@click.group(name="context")
def context() -> None:
    """Named servers (address, CA, certificate, key) in the client config.

    \b
    The config is $XDG_CONFIG_HOME/jobd/config.toml (default ~/.config/jobd/).
    The current context applies when neither --server nor --context is given;
    --context NAME (or JOBD_CLIENT_CONTEXT) picks another for one command.
    """


@context.command(name="add")
@click.argument("name")
@click.option("--server", required=True, metavar="HOST:PORT", help="The server.")
@click.option("--ca", required=True, metavar="FILE", help="CA certificate of the server's.")
@click.option("--cert", required=True, metavar="FILE", help="Client certificate (PEM).")
@click.option("--key", required=True, metavar="FILE", help="Client private key (PEM).")
@click.option("--replace", is_flag=True, help="Replace a context of that name.")
@click.option("--use", "use_it", is_flag=True, help="Make it the current context.")
def add(
    name: str, server: str, ca: str, cert: str, key: str, replace: bool, use_it: bool
) -> None:
    """Add a context; the files are kept as absolute paths. The first one added becomes
    the current one."""
    from ..cli import parse_server

    check_name(name)
    parse_server(server)
    config = Config.load()
    if name in config.contexts and not replace:
        raise ClientError(f"a context {name!r} exists: pass --replace to replace it")
    config.contexts[name] = Context(
        name,
        server,
        _absolute_file("CA certificate", ca),
        _absolute_file("certificate", cert),
        _absolute_file("key", key),
    )
    if use_it or not config.current or config.current not in config.contexts:
        config.current = name
    config.save()
    current = " (current)" if config.current == name else ""
    say(f"context {name}{current}: {server} in {config.path}")


@context.command(name="ls")
def ls() -> None:
    """List the contexts; * marks the current one."""
    config = Config.load()
    rows = [("", "NAME", "SERVER", "CERT")]
    for name in sorted(config.contexts):
        c = config.contexts[name]
        rows.append(("*" if name == config.current else "", name, c.server, str(c.cert)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)), row[3]]))


@context.command(name="use")
@click.argument("name")
def use(name: str) -> None:
    """Make NAME the current context."""
    config = Config.load()
    config.select(name)  # refuses an unknown name
    config.current = name
    config.save()
    say(f"now using context {name} ({config.contexts[name].server})")


@context.command(name="rm")
@click.argument("name")
def rm(name: str) -> None:
    """Remove the context NAME (its files stay)."""
    config = Config.load()
    config.select(name)
    del config.contexts[name]
    if config.current == name:
        config.current = ""
    config.save()
    say(f"removed context {name}")


@context.command(name="path", hidden=True)
def path() -> None:
    click.echo(config_path())


COMMANDS = [context]
