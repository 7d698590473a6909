"""`jobd serve`: the server's command line. Every flag is also a JOBD_* environment variable.
Parses and checks options, then hands a `ServerConfig` to `jobd.server`."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncclick as click
import trio

from jobd import __version__, pki
from jobd.engine import EngineConfig, JobdError, Limits, Network
from jobd.engine._manager import JOB_UID_FIRST, JOB_UID_LAST
from jobd.server import ServerConfig, TransportLimits, configure_logging, run_server
from jobd.units import parse_duration, parse_size

MiB = 1024 * 1024

# glibc malloc (mallopt(3)): buffers below this come from the heap instead of a fresh mmap, and
# this much free memory at the heap's top is kept for the next ones instead of given back. A
# stream's 1 MiB buffers (a chunk read from the output file, TLS's encrypted bytes) are made and
# freed ~once per MiB; glibc's own adaptive thresholds (a 2 MiB trim threshold once a 1 MiB
# buffer was freed) kept giving the heap's top back and faulting it in again, zeroed: 30-230
# page faults per MiB streamed (issue 12). A little more than one message plus its TLS bytes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 2 * MiB
MALLOC_TRIM_THRESHOLD = 4 * MiB


def keep_large_buffers() -> bool:
    """Make glibc reuse freed 1 MiB buffers rather than map fresh, zeroed pages for each one
    (`jobd serve` calls it once, before anything is allocated for a stream). False, with
    nothing changed, where there is no glibc `mallopt` (another libc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


class _Parsed(click.ParamType):  # type: ignore[type-arg]
    """A value read by one of the `jobd.units` parsers; its errors are usage errors."""

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


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def _uid_range(value: str) -> tuple[int, int] | None:
    if value == "shared":
        return None
    first, sep, last = value.partition("-")
    if not (sep and first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) < 2**31):
        raise click.BadParameter(f"{value!r}: use FIRST-LAST (e.g. 1000000-1999999) or shared")
    return int(first), int(last)


SIZE, DURATION = _Parsed("SIZE", parse_size), _Parsed("DURATION", parse_duration)
DEFAULTS = EngineConfig(data_dir=Path("."))
TRANSPORT = TransportLimits()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="jobd", message="%(prog)s %(version)s")
def main() -> None:
    """jobd: run Linux commands for remote clients over gRPC with mutual TLS.

    Each job runs in its own cgroup with CPU, memory, IO and process limits.
    Start the server with `jobd serve` (as root); talk to it with `jobd-client`.
    """


F = TypeVar("F", bound=Callable[..., Any])


def _opt(name: str, env: str, **kw: Any) -> Callable[[F], F]:
    """An option that is also the environment variable `env` (shown in --help)."""
    option: Callable[[F], F] = click.option(name, envvar=env, show_envvar=True, **kw)
    return option


@main.command()
@_opt("--listen", "JOBD_LISTEN", default="127.0.0.1:9090", help="Address to serve on.")
@_opt("--cert", "JOBD_CERT", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      required=True, help="Server certificate (PEM).")
@_opt("--key", "JOBD_KEY", type=click.Path(exists=True, dir_okay=False, path_type=Path),
      required=True, help="Server private key (PEM).")
@_opt("--client-ca", "JOBD_CLIENT_CA",
      type=click.Path(exists=True, dir_okay=False, path_type=Path),
      required=True, help="CA that signs client certificates (PEM).")
@_opt("--data-dir", "JOBD_DATA_DIR",
      type=click.Path(file_okay=False, path_type=Path, resolve_path=True),
      default=Path("/var/lib/jobd"), help="Where job output is kept (mode 0700).")
@_opt("--run-as", "JOBD_RUN_AS", default="nobody",
      help="Unprivileged user jobs run as ('root' only if you mean it).")
@_opt("--job-uids", "JOBD_JOB_UIDS", default=f"{JOB_UID_FIRST}-{JOB_UID_LAST}",
      metavar="FIRST-LAST|shared", callback=lambda ctx, param, value: _uid_range(value),
      help="Uids given one per owner, for good (kept in the data dir; gid and home stay the "
      "--run-as user's), so no user's job can signal or inspect another's; no other jobd on "
      "the host may overlap it; 'shared': all jobs use the --run-as uid.")
@_opt("--no-cgroups", "JOBD_NO_CGROUPS", is_flag=True,
      help="Run jobs without any resource limits when cgroups are unusable.")
@_opt("--cgroup-name", "JOBD_CGROUP_NAME", default="jobd",
      help="Name of jobd's cgroup tree under the cgroup it was started in.")
@_opt("--io-device", "JOBD_IO_DEVICE", multiple=True, metavar="MAJ:MIN",
      help="Block device(s) io limits apply to [default: the data dir's disk].")
@_opt("--default-cpus", "JOBD_DEFAULT_CPUS", type=float, default=DEFAULTS.default_limits.cpus,
      help="CPUs a job gets when it asks for none.")
@_opt("--default-memory", "JOBD_DEFAULT_MEMORY", type=SIZE, default="512M",
      help="Memory a job gets when it asks for none (no swap).")
@_opt("--default-pids", "JOBD_DEFAULT_PIDS", type=int, default=DEFAULTS.default_limits.pids,
      help="Processes a job may have when it asks for no limit.")
@_opt("--default-io-read", "JOBD_DEFAULT_IO_READ", type=SIZE, default="0",
      help="Read bytes/s when a job asks for none (0: unlimited).")
@_opt("--default-io-write", "JOBD_DEFAULT_IO_WRITE", type=SIZE, default="0",
      help="Write bytes/s when a job asks for none (0: unlimited).")
@_opt("--max-cpus", "JOBD_MAX_CPUS", type=float, default=DEFAULTS.max_limits.cpus,
      show_default="the host's CPUs", help="Most CPUs a job may ask for (0: no maximum).")
@_opt("--max-memory", "JOBD_MAX_MEMORY", type=SIZE, default=str(DEFAULTS.max_limits.memory_bytes),
      show_default=f"3/4 of the host's memory: {DEFAULTS.max_limits.memory_bytes // MiB}M",
      help="Most memory a job may ask for (0: no maximum).")
@_opt("--max-pids", "JOBD_MAX_PIDS", type=int, default=DEFAULTS.max_limits.pids,
      show_default=f"1/4 of the kernel's pid_max: {DEFAULTS.max_limits.pids}",
      help="Most processes a job may ask for (0: no maximum).")
@_opt("--max-jobs", "JOBD_MAX_JOBS", type=click.IntRange(min=0), default=DEFAULTS.max_jobs,
      help="Running jobs in all; a Start past it gets RESOURCE_EXHAUSTED (0: no limit).")
@_opt("--max-jobs-per-user", "JOBD_MAX_JOBS_PER_USER", type=click.IntRange(min=0),
      default=DEFAULTS.max_jobs_per_user,
      help="Running jobs per user; a Start past it gets RESOURCE_EXHAUSTED (0: no limit).")
@_opt("--job-nofile", "JOBD_JOB_NOFILE", type=click.IntRange(min=0), default=DEFAULTS.job_nofile,
      help="Soft limit on open files of each job, as systemd gives services; the hard limit "
      "stays the server's (0: the server's own, raised to its hard limit at start).")
@_opt("--max-connections", "JOBD_MAX_CONNECTIONS", type=click.IntRange(min=1),
      default=TRANSPORT.max_connections,
      help="Established client connections in all; more get RESOURCE_EXHAUSTED.")
@_opt("--max-connections-per-user", "JOBD_MAX_CONNECTIONS_PER_USER",
      type=click.IntRange(min=1), default=TRANSPORT.max_connections_per_user,
      help="Established connections per user (certificate CN); more get RESOURCE_EXHAUSTED.")
@_opt("--max-calls-per-user", "JOBD_MAX_CALLS_PER_USER", type=click.IntRange(min=1),
      default=TRANSPORT.max_calls_per_user,
      help="Calls (e.g. follows) open at once per user, over all connections.")
@_opt("--max-silent-connections", "JOBD_MAX_SILENT_CONNECTIONS", type=click.IntRange(min=1),
      default=TRANSPORT.max_silent,
      help="Accepted connections that have sent nothing yet (at most a quarter of the open-"
      "files limit); when full, the oldest is dropped.")
@_opt("--max-handshakes", "JOBD_MAX_HANDSHAKES", type=click.IntRange(min=1),
      default=TRANSPORT.max_handshakes,
      help="Connections in their TLS handshake at once; when full, the oldest is dropped.")
@_opt("--handshake-timeout", "JOBD_HANDSHAKE_TIMEOUT", type=DURATION,
      default=f"{TRANSPORT.handshake_timeout:g}s", help="Time a client has to complete TLS.")
@_opt("--stop-grace", "JOBD_STOP_GRACE", type=DURATION, default="5s",
      help="Time between SIGTERM and SIGKILL when a stop names none.")
@_opt("--default-network", "JOBD_DEFAULT_NETWORK", default="host",
      type=click.Choice(["host", "none"]),
      help="Network of a job that asks for none: the host's, or its own with loopback only.")
@_opt("--deny-host-network", "JOBD_DENY_HOST_NETWORK", is_flag=True,
      help="Refuse jobs the host's network (needs --default-network none).")
@_opt("--tmp-size", "JOBD_TMP_SIZE", type=SIZE, default="0",
      help="Size of each job's private /tmp, /var/tmp, /dev/shm (0: bounded by the job's "
      "memory limit, which their pages are charged to).")
@_opt("--allow-user-namespaces", "JOBD_ALLOW_USER_NAMESPACES", is_flag=True,
      help="Let jobs create user namespaces (refused by a seccomp filter by default).")
@_opt("--keep-finished", "JOBD_KEEP_FINISHED", type=DURATION, default="7d",
      help="How long an ended job's record and output are kept (0: until removed).")
@_opt("--uid-registry", "JOBD_UID_REGISTRY", type=click.Path(file_okay=False, path_type=Path),
      default=DEFAULTS.uid_registry,
      help="Directory where running servers register their --job-uids, so two never overlap.")
@_opt("--max-job-output", "JOBD_MAX_JOB_OUTPUT", type=SIZE, default="1G",
      help="Output kept per job; past it its oldest output is dropped (0: no bound).")
@_opt("--max-data", "JOBD_MAX_DATA", type=SIZE, default=None,
      show_default="a quarter of the data dir's filesystem",
      help="Output kept for all jobs; past it ended jobs' output goes first, then the oldest "
      "of the running job holding the most (each keeps its newest 1 MiB); when nothing can "
      "go, jobs wait on their pipes (0: no bound).")
@_opt("--log-level", "JOBD_LOG_LEVEL", default="info",
      type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
@_opt("--library-log-level", "JOBD_LIBRARY_LOG_LEVEL", default="warning",
      type=click.Choice(["debug", "info", "warning", "error"]),
      help="Log verbosity of the libraries (h2 and hpack log every frame at debug).")
@_opt("--log-format", "JOBD_LOG_FORMAT", default="text", type=click.Choice(["text", "json"]),
      help="Log lines for people (text) or one JSON object per line (json; fields in the "
      "README).")
@_opt("--metrics-listen", "JOBD_METRICS_LISTEN", default="", metavar="HOST:PORT",
      show_default="off", help="Serve Prometheus metrics at http://HOST:PORT/metrics (plain "
      "HTTP: bind it to a trusted address).")
async def serve(
    listen: str,
    cert: Path,
    key: Path,
    client_ca: Path,
    data_dir: Path,
    run_as: str,
    job_uids: tuple[int, int] | None,
    no_cgroups: bool,
    cgroup_name: str,
    io_device: tuple[str, ...],
    default_cpus: float,
    default_memory: int,
    default_pids: int,
    default_io_read: int,
    default_io_write: int,
    max_cpus: float,
    max_memory: int,
    max_pids: int,
    max_jobs: int,
    max_jobs_per_user: int,
    job_nofile: int,
    max_connections: int,
    max_connections_per_user: int,
    max_calls_per_user: int,
    max_silent_connections: int,
    max_handshakes: int,
    handshake_timeout: float,
    stop_grace: float,
    default_network: str,
    deny_host_network: bool,
    tmp_size: int,
    allow_user_namespaces: bool,
    keep_finished: float,
    uid_registry: Path,
    max_job_output: int,
    max_data: int | None,
    log_level: str,
    library_log_level: str,
    log_format: str,
    metrics_listen: str,
) -> None:
    """Serve the jobd API over mutual TLS until SIGTERM or SIGINT.

    On SIGTERM/SIGINT it stops accepting, ends open calls, stops every job, removes its
    cgroups and exits 0. A jobd started after a crash first kills and removes whatever its
    predecessor's cgroup tree still holds.
    """
    keep_large_buffers()
    configure_logging(log_level, log_format, library_level=library_log_level)
    # The formats use none of these: skip collecting them for every record (the audit
    # log writes one per RPC). The Logging HOWTO's "Optimization" knobs; the caller lookup
    # walked the stack and the process id cost a getpid() syscall per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    host, port = _listen(listen)
    metrics = _listen(metrics_listen) if metrics_listen else None
    try:
        engine = EngineConfig(
            data_dir=data_dir,
            run_as=None if run_as == "" else run_as,
            job_uids=job_uids,
            cgroup_name=cgroup_name,
            allow_no_cgroups=no_cgroups,
            default_limits=Limits(
                cpus=default_cpus,
                memory_bytes=default_memory,
                pids=default_pids,
                io_read_bps=default_io_read,
                io_write_bps=default_io_write,
            ),
            max_limits=Limits(cpus=max_cpus, memory_bytes=max_memory, pids=max_pids),
            max_jobs=max_jobs,
            max_jobs_per_user=max_jobs_per_user,
            job_nofile=job_nofile,
            stop_grace=stop_grace,
            io_devices=io_device or None,
            default_network=Network.NONE if default_network == "none" else Network.HOST,
            deny_host_network=deny_host_network,
            tmp_size=tmp_size,
            allow_user_namespaces=allow_user_namespaces,
            keep_finished=keep_finished,
            uid_registry=uid_registry,
            max_job_output=max_job_output,
            max_data=max_data,
        )
        transport = TransportLimits(
            max_connections=max_connections,
            max_connections_per_user=max_connections_per_user,
            max_calls_per_user=max_calls_per_user,
            max_silent=max_silent_connections,
            max_handshakes=max_handshakes,
            handshake_timeout=handshake_timeout,
        )
        config = ServerConfig(
            host=host,
            port=port,
            cert=cert,
            key=key,
            client_ca=client_ca,
            engine=engine,
            metrics_listen=metrics,
            transport=transport,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server, config)
            _freeze_heap()
    except* (JobdError, OSError) as group:
        for exc in _leaves(group):
            click.echo(f"jobd: {exc}", err=True)
        sys.exit(1)


def _freeze_heap() -> None:
    """Once serving: collect, then move every object left (modules, descriptors, the server's
    own) out of the collector's view (`gc.freeze()`). A full collection then walks only what
    was made since, not the ~47,000 objects of startup: it took ~22 ms of the event loop's
    time (one per ~5,000 unary calls, a pause for every call in flight), ~1 ms after. Objects
    frozen here that later become garbage are still freed by their reference counts; only
    cycles among them would stay, and startup's cycles were collected just before."""
    gc.collect()
    gc.freeze()


# ----------------------------------------------------------------- jobd certs


@main.group()
def certs() -> None:
    """Make the certificates jobd and its clients use (a CA, the server's, one per user).

    Keys are written with mode 0600, the directory created with mode 0700. Keep ca.key
    offline or at least off the serving host if you can: whoever holds it can make an admin.
    """


_DIR = click.option(
    "--dir", "directory", required=True,
    type=click.Path(file_okay=False, path_type=Path), help="Where the certificates live.",
)  # fmt: skip
_DAYS = click.option(
    "--days", type=click.IntRange(min=0), default=0, show_default="CA 3650, others 365",
    help="Validity in days.",
)  # fmt: skip
_FORCE = click.option("--force", is_flag=True, help="Replace existing files.")


@certs.command("init")
@_DIR
@click.option("--host", "hosts", multiple=True, metavar="NAME|IP",
              default=("localhost", "127.0.0.1", "::1"),
              show_default="localhost, 127.0.0.1, ::1",
              help="Name or address clients use to reach the server (repeat for several).")
@_DAYS
@_FORCE
async def certs_init(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """A new CA (ca.pem, ca.key) and the server's certificate (server.pem, server.key)."""
    _written(lambda: pki.init_pki(directory, hosts, force=force, days=days))
    click.echo(
        f"serve with: jobd serve --cert {directory / 'server.pem'} --key "
        f"{directory / 'server.key'} --client-ca {directory / 'ca.pem'}"
    )


@certs.command("issue")
@_DIR
@click.option("--user", required=True, help="User name (the certificate's CN).")
@click.option("--role", "roles", multiple=True, default=("user",), show_default=True,
              help="Role (an OU; 'admin' may act on every job); repeat for several.")
@_DAYS
@_FORCE
async def certs_issue(
    directory: Path, user: str, roles: tuple[str, ...], days: int, force: bool
) -> None:
    """A client certificate for USER (USER.pem, USER.key), signed by the CA in --dir."""
    _written(lambda: pki.issue_client(directory, user, roles, force=force, days=days))


@certs.command("dev")
@click.option("--dir", "directory", default=Path("certs"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where to write.")
@_FORCE
async def certs_dev(directory: Path, force: bool) -> None:
    """The development set `just certs` makes: a CA, server (localhost), alice, bob (role
    user) and admin (role admin). Keeps what is present unless --force."""
    written = _written(lambda: pki.write_dev_pki(directory, force=force))
    if not written:
        click.echo(f"{directory}: development certificates already present (--force to replace)")


def _written(make: Callable[[], list[Path]]) -> list[Path]:
    try:
        written = make()
    except (pki.PkiError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    for path in written:
        if path.suffix == ".key":
            click.echo(f"wrote {path} (private key, mode 0600)")
            continue
        cert = pki.load_issued(path, path.with_suffix(".key")).cert
        until = cert.not_valid_after_utc.date().isoformat()
        click.echo(f"wrote {path} ({cert.subject.rfc4514_string()}, valid until {until})")
    return written


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def cli() -> None:
    main(_anyio_backend="trio")
