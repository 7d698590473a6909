"""The commands on existing jobs: stop, status, wait, rm, inspect (each taking several ids,
names or id prefixes, handled concurrently) and list (filters, pages, -q)."""

from __future__ import annotations

import json
import math
import shlex
from typing import Any

import asyncclick as click
import purerpc
import trio

from jobd.v1 import jobd_pb2 as pb

from .. import format as fmt
from ..app import DURATION, App, failed, for_each, parse_pairs, report
from ..errors import ClientError
from ..session import open_api

# Exit code of `wait --timeout` when a job is still running, as timeout(1) has it.
WAIT_TIMED_OUT = 124
_STATES = {
    "running": pb.RUNNING,
    "exited": pb.EXITED,
    "stopped": pb.STOPPED,
    "killed": pb.KILLED,
}
_ENDED = [pb.EXITED, pb.STOPPED, pb.KILLED]
_IDS = click.argument("refs", metavar="ID...", nargs=-1, required=True)


def _first_failure(jobs: list[pb.Job]) -> int:
    """The exit code of several jobs: the first (in the order given) that is not 0."""
    return next((code for code in map(fmt.exit_status, jobs) if code), 0)


@click.command()
@click.option(
    "--grace",
    type=DURATION,
    metavar="DURATION",
    help="Time between SIGTERM and SIGKILL, e.g. 5s, 500ms, 0 [default: the server's, 5s].",
)
@_IDS
@click.pass_obj
async def stop(app: App, refs: tuple[str, ...], grace: float | None) -> int:
    """Stop jobs (every process each started) and print how each ended.

    ID is a job's id, its name, or a unique prefix of its id (4 characters or more),
    here and in every command that takes one.
    """
    async with open_api(app.require_settings()) as api:

        async def one(ref: str) -> pb.Job:
            return await api.stop(await api.resolve(ref), grace)

        results = await for_each(refs, one)
    report(refs, results, fmt.status_word)
    return 1 if failed(results) else 0


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print every field as JSON.")
@_IDS
@click.pass_obj
async def status(app: App, refs: tuple[str, ...], as_json: bool) -> int:
    """Print each job's status word: running, exited (code N), …

    Exits 0 while the jobs run; for an ended job, as `wait` does (its exit code, or
    128 + the signal that ended it; the first job given that is not 0); 1 on error.
    """
    async with open_api(app.require_settings()) as api:

        async def one(ref: str) -> pb.Job:
            return await api.status(await api.resolve(ref))

        results = await for_each(refs, one)
    if as_json:
        jobs = report(refs, results, lambda job: "")
        if jobs:
            shown: Any = [fmt.job_json(job) for job in jobs]
            if len(refs) == 1:
                shown = shown[0]
            click.echo(json.dumps(shown, indent=2))
    else:
        jobs = report(refs, results, fmt.status_word)
    return 1 if failed(results) else _first_failure(jobs)


@click.command()
@click.option(
    "--timeout",
    "patience",
    type=DURATION,
    metavar="DURATION",
    help=f"Give up after this long (exit {WAIT_TIMED_OUT}) [default: wait as long as they run].",
)
@_IDS
@click.pass_obj
async def wait(app: App, refs: tuple[str, ...], patience: float | None) -> int:
    """Wait until the jobs have ended; print how each ended.

    Exits as `run` does: the job's exit code, or 128 + the signal that ended it
    (137 when oom-killed); with several jobs, the first given that is not 0; 1 on
    error; 124 when --timeout passed first.
    """
    settings = app.require_settings()
    async with open_api(settings) as api:

        async def one(ref: str) -> pb.Job:
            job_id = await api.resolve(ref)
            with trio.move_on_after(math.inf if patience is None else patience):
                return await api.wait(job_id)
            raise ClientError(
                f"job {job_id} still runs after {fmt.duration(patience or 0)}",
                exit_code=WAIT_TIMED_OUT,
            )

        results = await for_each(refs, one)
    jobs = report(refs, results, fmt.status_word)
    errors = [r for r in results if isinstance(r, ClientError)]
    if errors:
        return 1 if any(e.exit_code != WAIT_TIMED_OUT for e in errors) else WAIT_TIMED_OUT
    return _first_failure(jobs)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Stop running jobs first.")
@click.option("--ended", is_flag=True, help="Remove all your jobs that have ended.")
@click.option(
    "--all-users", is_flag=True, help="With --ended: every user's (admins only)."
)
@click.argument("refs", metavar="[ID...]", nargs=-1)
@click.pass_obj
async def rm(
    app: App, refs: tuple[str, ...], force: bool, ended: bool, all_users: bool
) -> int:
    """Remove jobs: their record and output. Prints each removed id.

    A running job is refused unless -f (which stops it first, with the server's
    grace period).
    """
    if ended == bool(refs):
        raise click.UsageError("give job ids, or --ended (not both)")
    if all_users and not ended:
        raise click.UsageError("--all-users goes with --ended")
    settings = app.require_settings()
    async with open_api(settings) as api:
        if ended:
            request = pb.ListRequest(states=_ENDED)
            if not all_users:
                request.owner = settings.user()
            jobs = await api.list(request)
            ids = tuple(
                j.id
                for j in jobs
                if j.state in _ENDED and (all_users or j.owner == request.owner)
            )

            async def by_id(job_id: str) -> pb.Job:
                return await api.remove(job_id)

            results = await for_each(ids, by_id)
            refs = ids
        else:

            async def one(ref: str) -> pb.Job:
                try:
                    return await api.remove(await api.resolve(ref), force=force)
                except purerpc.RpcFailedError as exc:
                    if exc.status.status_code != purerpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    raise ClientError(
                        f"FAILED_PRECONDITION: {exc.status.status_message} "
                        f"(`jobd-client rm -f {shlex.quote(ref)}` stops it first)"
                    ) from exc

            results = await for_each(refs, one)
    done = report(refs, results, lambda job: "")
    for job in done:
        click.echo(job.id)
    return 1 if failed(results) else 0


@click.command()
@_IDS
@click.pass_obj
async def inspect(app: App, refs: tuple[str, ...]) -> int:
    """Print everything the server knows about the jobs, as a JSON array: state, reason,
    limits, usage, uid, working dir, labels, output kept and dropped."""
    async with open_api(app.require_settings()) as api:

        async def one(ref: str) -> pb.Job:
            return await api.status(await api.resolve(ref))

        results = await for_each(refs, one)
    jobs = report(refs, results, lambda job: "")
    click.echo(json.dumps([fmt.job_json(job) for job in jobs], indent=2))
    return 1 if failed(results) else 0


@click.command(name="list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(sorted(_STATES)),
    help="Only jobs in this state (repeatable).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_pairs,
    help="Only jobs with this label (repeatable: all must match).",
)
@click.option("--owner", metavar="USER", help="Only this user's jobs (admins).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids.")
@click.option(
    "--limit", type=click.IntRange(min=1), metavar="N", help="At most the N newest jobs."
)
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as a JSON array.")
@click.pass_obj
async def list_(
    app: App,
    states: tuple[str, ...],
    labels: dict[str, str],
    owner: str | None,
    quiet: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """List your jobs (every job, for an admin), oldest first."""
    wanted = [_STATES[s] for s in states]
    request = pb.ListRequest(states=wanted, labels=labels, owner=owner or "")
    async with open_api(app.require_settings()) as api:
        jobs = await api.list(request, limit=limit or 0)
    # The same filters here: a server that ignores one must not show more than asked.
    jobs = [
        j
        for j in jobs
        if (not wanted or j.state in wanted)
        and (not owner or j.owner == owner)
        and all(j.labels.get(k) == v for k, v in labels.items())
    ]
    jobs.sort(key=lambda j: (j.started_at.seconds, j.started_at.nanos))
    if limit:
        jobs = jobs[-limit:]
    if quiet:
        for job in jobs:
            click.echo(job.id)
    elif as_json:
        click.echo(fmt.jobs_json(jobs))
    else:
        click.echo(fmt.jobs_table(jobs))


COMMANDS = [stop, status, wait, rm, inspect, list_]
