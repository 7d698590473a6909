"""The commands, one module per group as pueue's client has them: `run` (start, run),
`logs`, `jobs` (stop, status, wait, rm, inspect, list), `context`, `completion`. Each module
adds its commands to the group `cli.py` passes to `register`."""

from __future__ import annotations

import asyncclick as click

from . import completion, context, jobs, logs, run


def register(group: click.Group) -> None:
    for module in (run, logs, jobs, context, completion):
        for command in module.COMMANDS:
            group.add_command(command)
