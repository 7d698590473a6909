"""What every command shares: `App` (the settings the group chose, and what Ctrl-C must
reach), the option types, the one-line message helper, and `for_each`, which runs one call
per job id concurrently with bounded concurrency. Knows the proto and click, no transport.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncclick as click
import trio

from jobd.units import parse_duration, parse_rate, parse_size

from .errors import ClientError
from .session import Api, Settings

PROG = "jobd-client"
# How many calls of one command (stop, rm, wait, status of many ids) run at once.
CONCURRENCY = 16

T = TypeVar("T")


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


def say(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


class Parsed(click.ParamType[Any]):
    """A command line value read by one of the `units` parsers; errors are usage errors."""

    def __init__(self, name: str, parse: Callable[[str], float | int]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parsed = self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return _Typed(parsed, value) if isinstance(parsed, int) else parsed


class _Typed(int):
    """A parsed size that remembers how the user wrote it, so errors can say it back."""

    text: str

    def __new__(cls, value: int, text: str) -> _Typed:
        self = super().__new__(cls, value)
        self.text = text
        return self


def typed_text(value: object) -> str | None:
    """How the user wrote an option's value (a size or rate: as typed; a number: as is)."""
    if value is None:
        return None
    if isinstance(value, _Typed):
        return value.text
    return f"{value:g}" if isinstance(value, float) else str(value)


SIZE = Parsed("SIZE", parse_size)
RATE = Parsed("SIZE/s", parse_rate)
DURATION = Parsed("DURATION", parse_duration)


def parse_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    """KEY=VALUE options (--env, --label) into a dict."""
    pairs = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        pairs[key] = val
    return pairs


def require_text(what: str, value: str) -> None:
    """The API carries text: refuse, in one line, what is not UTF-8 (the command line gives
    such bytes to Python as surrogate escapes, which protobuf cannot encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(value)
        raise ClientError(
            f"{what} {raw!r} is not UTF-8 text: the jobd API carries arguments, names and "
            "the environment as text (send bytes through stdin with -i, or a file)",
            exit_code=2,
        ) from None


async def for_each(
    refs: Sequence[str], call: Callable[[str], Awaitable[T]]
) -> list[T | ClientError]:
    """call(ref) for every ref, at most CONCURRENCY at a time; results (or the ClientError
    each one raised) in the order of refs."""
    results: list[T | ClientError | None] = [None] * len(refs)
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(index: int, ref: str) -> None:
        async with limiter:
            try:
                results[index] = await call(ref)
            except ClientError as exc:
                results[index] = exc

    async with trio.open_nursery() as nursery:
        for index, ref in enumerate(refs):
            nursery.start_soon(one, index, ref)
    return [r for r in results if r is not None]


def report(
    refs: Sequence[str], results: Sequence[Any], show: Callable[[Any], str]
) -> list[Any]:
    """Print one line per ref (`show(result)`, prefixed with the ref when there are several)
    and one error line per failure; return the successes."""
    done = []
    for ref, result in zip(refs, results, strict=True):
        if isinstance(result, ClientError):
            say(f"{ref}: {result.message}" if len(refs) > 1 else result.message)
            continue
        done.append(result)
        line = show(result)
        if line:
            click.echo(f"{ref}  {line}" if len(refs) > 1 else line)
    return done


def failed(results: Sequence[Any]) -> bool:
    return any(isinstance(r, ClientError) for r in results)


async def resolve(api: Api, ref: str) -> str:
    return await api.resolve(ref)


def stdin_kind() -> str:
    """'pipe' or 'file' when our stdin holds data a job could read, else '' (a terminal,
    /dev/null, closed)."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return ""
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "pipe"
    if stat.S_ISREG(mode):
        return "file"
    return ""
