"""`completion bash|zsh|fish`: click's shell completion script for jobd-client."""

from __future__ import annotations

import asyncclick as click
from asyncclick.shell_completion import get_completion_class

from ..app import PROG

COMPLETE_VAR = "_JOBD_CLIENT_COMPLETE"


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(jobd-client completion bash)"       (in ~/.bashrc)
    zsh:   eval "$(jobd-client completion zsh)"        (in ~/.zshrc)
    fish:  jobd-client completion fish > ~/.config/fish/completions/jobd-client.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None
    root = ctx.find_root().command
    click.echo(cls(root, {}, PROG, COMPLETE_VAR).source())


COMMANDS = [completion]
