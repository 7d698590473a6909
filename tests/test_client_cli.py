"""`jobd-client` as a user meets it: the real console script in a subprocess, against no
server, against TLS servers that are not jobd, and against a fake JobService; plus the
parsers and formatters it is built from.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import purerpc
import pytest
import trio
from anyio.streams.tls import TLSListener
from purerpc.server import ConnectionHandler

from jobd.pki import issue_cert, make_ca, write_dev_pki
from jobd.units import parse_duration, parse_rate, parse_size
from jobd.v1 import jobd_pb2 as pb
from jobd.v1.jobd_grpc import JobServiceServicer
from jobd_client import format as fmt
from jobd_client.errors import ClientError, describe, find_cause

CLIENT = Path(sys.executable).parent / "jobd-client"
TRACEBACK = b"Traceback"


# --- running the real console script -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def err(self) -> str:
        return self.stderr.decode()


# No context of the machine's user applies: the config is looked for where none is.
NO_CONFIG = str(Path(os.environ.get("TMPDIR", "/tmp")) / "jobd-test-no-config")


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBD_")}
    env["XDG_CONFIG_HOME"] = NO_CONFIG
    env.update(extra)
    return env


async def jobd_client(*args: str, cwd: Path, **env: str) -> Result:
    assert CLIENT.exists(), f"{CLIENT} missing: run `.venv/bin/pip install -e .`"
    done = await trio.run_process(
        [str(CLIENT), *args],
        stdin=subprocess.DEVNULL,  # a pipe would draw run's "stdin is not sent" warning
        cwd=cwd,
        env=client_env(**env),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def one_error_line(result: Result) -> str:
    """The single `jobd-client: ...` line a failed command must print, without the prefix."""
    assert result.code == 1, result
    assert TRACEBACK not in result.stderr, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobd-client: "), result.err
    return lines[0].removeprefix("jobd-client: ")


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the development PKI in certs/, as `just certs` leaves the repo."""
    root = tmp_path_factory.mktemp("home")
    write_dev_pki(root / "certs")
    return root


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, untrusted CA's PKI (its own server and client certificates)."""
    root = tmp_path_factory.mktemp("stranger")
    write_dev_pki(root)
    return root


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def server_context(certs: Path, *, client_ca: Path | None = None, alpn: bool = True) -> Any:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_ca or certs / "ca.pem")
    if alpn:
        context.set_alpn_protocols(["h2"])
    return context


# Every command that talks to the server, with the arguments it needs.
COMMANDS = [
    ["list"],
    ["status", "some-id"],
    ["stop", "--grace", "0", "some-id"],  # Stop's deadline is the timeout plus the grace
    ["logs", "some-id"],
    ["logs", "-f", "some-id"],
    ["start", "--", "true"],
    ["run", "--", "true"],
]
BOUNDED_COMMANDS = [c for c in COMMANDS if c[:2] != ["logs", "-f"]]  # all but a follow
command_ids = [" ".join(c) for c in COMMANDS]


# --- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["start"], ["stop"], ["status"], ["logs"], ["list"], ["run"]]
)
async def test_help_of_every_command(home: Path, command: list[str]) -> None:
    result = await jobd_client(*command, "--help", cwd=home)
    assert result.code == 0 and not result.stderr
    usage = " ".join(["Usage: jobd-client", *command])
    assert result.stdout.decode().startswith(usage)


async def test_group_help_has_a_line_per_command_and_examples(home: Path) -> None:
    text = (await jobd_client("--help", cwd=home)).stdout.decode()
    for name in ("start", "stop", "status", "logs", "list", "run"):
        assert f"\n  {name} " in text
    assert "Examples:" in text and "JOBD_CLIENT_SERVER" in text and "--timeout" in text
    for name in ("wait", "rm", "inspect", "context", "completion"):
        assert f"\n  {name} " in text
    run_help = (await jobd_client("run", "--help", cwd=home)).stdout.decode()
    assert "Ctrl-C stops the job" in run_help and "130" in run_help


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["start"], "Missing argument"),
        (["run"], "Missing argument"),
        (["stop"], "Missing argument 'ID...'"),
        (["status"], "Missing argument 'ID...'"),
        (["logs", "-f"], "Missing argument 'ID'"),
        (["nosuch"], "No such command"),
        (["stop", "--grace", "soon", "x"], "'soon' is not a duration"),
        (["start", "--memory", "lots", "--", "true"], "'lots' is not a size"),
        (["start", "--io-read", "fast", "--", "true"], "'fast' is not a rate"),
        (["start", "--env", "NOEQUALS", "--", "true"], "'NOEQUALS' is not KEY=VALUE"),
        (["start", "--cpus", "-1", "--", "true"], "-1"),
        (["--server", "localhost", "list"], "is not HOST:PORT"),
        (["--cert", "a.pem", "list"], "--cert and --key go together"),
        (["--user", "bob", "--cert", "a.pem", "--key", "a.key", "list"], "either --user"),
    ],
)
async def test_usage_errors_print_usage_and_exit_2(
    home: Path, args: list[str], complaint: str
) -> None:
    result = await jobd_client(*args, cwd=home)
    assert result.code == 2, result
    assert not result.stdout and TRACEBACK not in result.stderr
    assert "Usage: jobd-client" in result.err and complaint in result.err


async def test_options_stop_at_the_command(home: Path) -> None:
    """`start ls -l` needs no `--`: options after CMD belong to CMD (no usage error)."""
    result = await jobd_client(
        "--server", f"127.0.0.1:{free_port()}", "start", "ls", "-l", cwd=home
    )
    assert "connection refused" in one_error_line(result)


# --- no server, or the wrong one ----------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=command_ids)
async def test_connection_refused(home: Path, command: list[str]) -> None:
    port = free_port()
    result = await jobd_client(*command, cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    assert one_error_line(result) == (
        f"cannot connect to the server at 127.0.0.1:{port}: connection refused "
        "(is `just serve` running?)"
    )
    assert not result.stdout


async def test_missing_default_certificate(tmp_path: Path) -> None:
    result = await jobd_client("list", cwd=tmp_path)
    assert one_error_line(result) == (
        "no certificate at certs/alice.pem: run `just certs` or pass --cert/--key"
    )


async def test_missing_given_files(home: Path, tmp_path: Path) -> None:
    no_cert = await jobd_client("--cert", "x.pem", "--key", "x.key", "list", cwd=tmp_path)
    assert one_error_line(no_cert) == "no certificate at x.pem"
    no_ca = await jobd_client("--ca", str(tmp_path / "ca.pem"), "list", cwd=home)
    assert one_error_line(no_ca) == f"no CA certificate at {tmp_path / 'ca.pem'}"
    mismatch = await jobd_client(
        "--cert", "certs/alice.pem", "--key", "certs/bob.key", "list", cwd=home
    )
    assert "key values mismatch" in one_error_line(mismatch)


async def serve_tls(
    nursery: trio.Nursery,
    context: ssl.SSLContext,
    handler: Callable[[trio.SSLStream[trio.SocketStream]], Any],
) -> int:
    """A TLS listener on 127.0.0.1 that is not jobd: it runs handler on each handshaken stream."""

    async def handshake_then(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handshake_then, 0, context, host="127.0.0.1")
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


async def read_forever(stream: trio.SSLStream[trio.SocketStream]) -> None:
    while await stream.receive_some():
        pass


# An HTTP/2 SETTINGS frame with no settings: what a server sends first.
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def hang_up(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Answer the client's HTTP/2 preface, read its whole request, then close the connection.

    Closed only once the client has nothing more to send (its request ended and our SETTINGS
    acknowledged): data arriving at a closed socket, or unread in it, makes the kernel send
    a reset instead of the close this test is about."""
    received = await stream.receive_some()
    await stream.send_all(EMPTY_SETTINGS)
    position = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # then frames
    request_ended = settings_acknowledged = False
    while not (request_ended and settings_acknowledged):
        header = received[position : position + 9]
        length = int.from_bytes(header[:3], "big")
        if len(header) < 9 or len(received) < position + 9 + length:
            more = await stream.receive_some()
            if not more:
                return
            received += more
            continue
        kind, flags, stream_id = header[3], header[4], int.from_bytes(header[5:], "big")
        position += 9 + length
        settings_acknowledged |= kind == 0x4 and bool(flags & 0x1)  # SETTINGS, ACK
        request_ended |= kind in (0x0, 0x1) and stream_id > 0 and bool(flags & 0x1)  # END_STREAM
    await stream.aclose()


async def test_server_from_another_ca(home: Path, stranger: Path, nursery: trio.Nursery) -> None:
    port = await serve_tls(nursery, server_context(stranger), read_forever)
    result = await jobd_client("list", cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    message = one_error_line(result)
    assert message.startswith(f"TLS: cannot verify the server at 127.0.0.1:{port}: ")
    assert "certificate verify failed" in message


async def test_server_name_must_match(home: Path, nursery: trio.Nursery) -> None:
    """The host part of --server is the name the server's certificate must carry."""
    ca = make_ca()
    elsewhere = home / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "ca.pem").write_bytes(ca.cert_pem())
    issue_cert(ca, "db.example", server=True, hosts=["db.example"]).write(
        elsewhere / "server.pem", elsewhere / "server.key"
    )
    context = server_context(elsewhere, client_ca=home / "certs" / "ca.pem")
    port = await serve_tls(nursery, context, read_forever)
    result = await jobd_client(
        "--ca", str(elsewhere / "ca.pem"), "list", cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}"
    )
    assert "IP address mismatch" in one_error_line(result)


async def test_server_without_tls_1_3(home: Path, nursery: trio.Nursery) -> None:
    context = server_context(home / "certs")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    port = await serve_tls(nursery, context, read_forever)
    result = await jobd_client("list", cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    # trio sends no alert when a handshake fails: the connection just ends
    assert one_error_line(result) == (
        f"the server at 127.0.0.1:{port} closed the connection during the TLS handshake: "
        "does it speak TLS 1.3?"
    )


async def test_server_that_distrusts_our_certificate(
    home: Path, stranger: Path, nursery: trio.Nursery
) -> None:
    """TLS 1.3 rejects a client certificate after the client's handshake is done, and a trio
    server sends no alert: the client sees the connection end before any answer (in purerpc's
    reader task, so inside an exception group)."""
    context = server_context(home / "certs", client_ca=stranger / "ca.pem")
    port = await serve_tls(nursery, context, read_forever)
    result = await jobd_client("list", cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    message = one_error_line(result)
    assert message.startswith(f"the server at 127.0.0.1:{port} ")
    assert message.endswith(
        "the connection without answering: did it reject our certificate (--cert/--key, --user)?"
    )


async def test_tls_server_that_is_not_grpc(home: Path, nursery: trio.Nursery) -> None:
    port = await serve_tls(nursery, server_context(home / "certs", alpn=False), read_forever)
    result = await jobd_client("list", cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    assert one_error_line(result) == (
        f"the server at 127.0.0.1:{port}: it does not speak HTTP/2 (no ALPN h2): "
        "is it a jobd server?"
    )


@pytest.mark.parametrize("command", BOUNDED_COMMANDS, ids=" ".join)
async def test_server_that_never_answers(
    home: Path, nursery: trio.Nursery, command: list[str]
) -> None:
    """--timeout/JOBD_CLIENT_TIMEOUT (default 10 s) bounds each unary call, and each wait for output
    when not following."""
    port = await serve_tls(nursery, server_context(home / "certs"), read_forever)
    with trio.fail_after(60):  # a hang guard only
        result = await jobd_client(
            *command, cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}", JOBD_CLIENT_TIMEOUT="0.3"
        )
    assert one_error_line(result) == f"the server at 127.0.0.1:{port} did not answer within 0.3 s"


@pytest.mark.parametrize("command", COMMANDS, ids=command_ids)
async def test_server_that_hangs_up(home: Path, nursery: trio.Nursery, command: list[str]) -> None:
    """A connection that ends under a call ends the call at once, follows included (purerpc
    alone would wait forever)."""
    port = await serve_tls(nursery, server_context(home / "certs"), hang_up)
    with trio.fail_after(60):  # a hang guard only
        result = await jobd_client(*command, cwd=home, JOBD_CLIENT_SERVER=f"127.0.0.1:{port}")
    assert one_error_line(result) == f"the server at 127.0.0.1:{port} closed the connection"


# --- a fake JobService ---------------------------------------------------------------------


@dataclass
class Plan:
    """What the fake does with the next job started: its output, then how it ends."""

    chunks: list[tuple[pb.Stream, bytes]] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=lambda: {"state": pb.EXITED})
    endless: bool = False  # a follow waits until Stop
    fail: Exception | None = None  # raised after the chunks


class FakeJobService(JobServiceServicer):
    """A fake server that stands in only for the client's formatting and exit codes: it keeps
    jobs in a dict and plays back planned output. The real server (jobd.server) gets its own
    end-to-end tests with this same client."""

    def __init__(self) -> None:
        self.jobs: dict[str, pb.Job] = {}
        self.plans: dict[str, Plan] = {}
        self.next_plan = Plan()
        self.requests: list[Any] = []
        self.following = trio.Event()
        self.stopped: dict[str, trio.Event] = {}

    def add(self, plan: Plan | None = None, owner: str = "alice", **fields: Any) -> pb.Job:
        job = pb.Job(id=str(uuid.uuid4()), owner=owner, **fields)
        job.started_at.FromSeconds(1_700_000_000)
        self.jobs[job.id] = job
        self.plans[job.id] = plan or Plan()
        self.stopped[job.id] = trio.Event()
        return job

    def _job(self, job_id: str) -> pb.Job:
        if job_id not in self.jobs:
            raise purerpc.NotFoundError(f"no job {job_id}")
        if self.jobs[job_id].owner != "alice":
            raise purerpc.PermissionDeniedError(f"job {job_id} belongs to someone else")
        return self.jobs[job_id]

    def _end(self, job: pb.Job, **fields: Any) -> None:
        job.MergeFrom(pb.Job(**fields))

    async def Start(self, request: pb.StartRequest) -> pb.Job:
        self.requests.append(request)
        if not request.command or not request.command[0]:
            raise purerpc.InvalidArgumentError("empty command")
        job = self.add(self.next_plan, command=request.command, state=pb.RUNNING)
        return job

    async def Stop(self, request: pb.StopRequest) -> pb.Job:
        self.requests.append(request)
        job = self._job(request.id)
        if job.state == pb.RUNNING:
            self._end(job, state=pb.STOPPED, signal=15)
            self.stopped[job.id].set()
        return job

    async def Status(self, request: pb.JobRequest) -> pb.Job:
        self.requests.append(request)
        return self._job(request.id)

    async def List(self, request: pb.ListRequest) -> pb.ListResponse:
        self.requests.append(request)
        return pb.ListResponse(jobs=list(self.jobs.values()))

    async def Output(  # type: ignore[override]  # purerpc takes async generators too
        self, request: pb.OutputRequest
    ) -> AsyncIterator[pb.OutputChunk]:
        self.requests.append(request)
        job = self._job(request.id)
        plan = self.plans[job.id]
        offset = 0
        for stream, data in plan.chunks:
            if offset >= request.offset:
                yield pb.OutputChunk(data=data, stream=stream, offset=offset)
            offset += len(data)
        if request.follow:
            self.following.set()
            if plan.endless:
                await self.stopped[job.id].wait()
            elif job.state == pb.RUNNING:
                self._end(job, **plan.end)
        if plan.fail is not None:
            raise plan.fail


class _ClosingHandler(ConnectionHandler):  # type: ignore[misc]
    """purerpc's per-connection handler, except that it closes what purerpc leaves open (each
    request's event channel, the connection): ResourceWarnings, errors in this suite."""

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        try:
            await super().__call__(stream)
        finally:
            await anyio.aclose_forcefully(stream)

    async def request_received(self, stream: Any) -> None:
        try:
            await super().request_received(stream)
        finally:
            for channel in stream._incoming_events:
                channel.close()


async def serve_fake(service: FakeJobService, context: ssl.SSLContext, *, task_status: Any) -> None:
    """purerpc's request handling on a listener bound to 127.0.0.1 only (purerpc's own
    Server.serve_async binds every interface)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    handler = _ClosingHandler({"jobd.v1.JobService": service.service}, purerpc.Server(port))
    task_status.started(port)
    async with TLSListener(listener, context, standard_compatible=False) as tls:
        await tls.serve(handler)


@dataclass
class Fake:
    service: FakeJobService
    home: Path
    server: str

    async def client(self, *args: str, **env: str) -> Result:
        with trio.fail_after(60):  # a hang guard only (a loaded host starts the client slowly)
            return await jobd_client(*args, cwd=self.home, JOBD_CLIENT_SERVER=self.server, **env)


@pytest.fixture
async def fake(home: Path, nursery: trio.Nursery) -> Fake:
    """A fake JobService over mutual TLS on 127.0.0.1: it stands in only for the client's
    formatting and exit codes; the real server gets its own end-to-end tests."""
    service = FakeJobService()
    port = await nursery.start(serve_fake, service, server_context(home / "certs"))
    return Fake(service, home, f"127.0.0.1:{port}")


async def test_start_sends_the_command_and_limits(fake: Fake) -> None:
    result = await fake.client(
        "start", "--cpus", "0.5", "--memory", "512M", "--pids", "64", "--io-read", "1M/s",
        "--io-write", "2MB/s", "--env", "A=1", "--env", "B=x=y", "--workdir", "/tmp",
        "--", "sh", "-c", "echo hi", "--not-an-option",
    )  # fmt: skip
    assert result.code == 0, result
    job_id = result.stdout.decode().strip()
    assert job_id in fake.service.jobs
    request = fake.service.requests[-1]
    assert list(request.command) == ["sh", "-c", "echo hi", "--not-an-option"]
    assert dict(request.env) == {"A": "1", "B": "x=y"} and request.working_dir == "/tmp"
    assert request.limits == pb.Limits(
        cpus=0.5, memory_bytes=512 << 20, pids=64, io_read_bps=1 << 20, io_write_bps=2_000_000
    )


async def test_choosing_the_certificate(fake: Fake) -> None:
    """--user on the command line beats JOBD_CLIENT_CERT/_KEY; those beat JOBD_CLIENT_USER."""
    env = {"JOBD_CLIENT_CERT": "nosuch.pem", "JOBD_CLIENT_KEY": "nosuch.key"}
    assert (await fake.client("--user", "bob", "list", **env)).code == 0
    assert one_error_line(await fake.client("list", **env)) == "no certificate at nosuch.pem"
    assert one_error_line(await fake.client("list", JOBD_CLIENT_USER="carol")) == (
        "no certificate at certs/carol.pem: run `just certs` or pass --cert/--key"
    )
    assert (
        await fake.client("--cert", "certs/admin.pem", "--key", "certs/admin.key", "list")
    ).code == 0


async def test_start_without_limits_leaves_them_to_the_server(fake: Fake) -> None:
    assert (await fake.client("start", "true")).code == 0
    request = fake.service.requests[-1]
    assert request.limits == pb.Limits() and not request.env and not request.working_dir


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"state": pb.RUNNING}, "running"),
        ({"state": pb.EXITED, "exit_code": 3}, "exited (code 3)"),
        ({"state": pb.STOPPED, "signal": 15}, "stopped (signal 15)"),
        ({"state": pb.KILLED, "signal": 9}, "killed (signal 9)"),
        ({"state": pb.KILLED, "signal": 9, "usage": pb.Usage(oom_kills=1)}, "oom-killed"),
    ],
)
async def test_status_words(fake: Fake, fields: dict[str, Any], word: str) -> None:
    """The word, and the exit code `wait` would give (0 while it runs)."""
    job = fake.service.add(**fields)
    result = await fake.client("status", job.id)
    code = fmt.exit_status(job)
    assert (result.code, result.stdout, result.stderr) == (code, f"{word}\n".encode(), b"")


async def test_status_json(fake: Fake) -> None:
    job = fake.service.add(state=pb.EXITED, exit_code=2, command=["ls"])
    result = await fake.client("status", "--json", job.id)
    data = json.loads(result.stdout)
    assert data["id"] == job.id and data["exit_code"] == 2 and data["state"] == "EXITED"
    assert data["status"] == "exited (code 2)" and data["command"] == ["ls"]
    assert data["started_at"] == "2023-11-14T22:13:20Z" and "usage" in data


NOSUCH = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", NOSUCH], f"NOT_FOUND: no job {NOSUCH}"),
        (["stop", NOSUCH], f"NOT_FOUND: no job {NOSUCH}"),
        (["logs", NOSUCH], f"NOT_FOUND: no job {NOSUCH}"),
        (["logs", "-f", NOSUCH], f"NOT_FOUND: no job {NOSUCH}"),
        (["status", "nosuch"], "no job named 'nosuch' (and it is not an id or id prefix)"),
        (["wait", "abc"], "no job named 'abc'; as an id prefix it is too short: give at least "
         "4 characters of the id"),
        (["rm", "abcd"], "no job with the name or id prefix 'abcd'"),
        (["start", "--", ""], "INVALID_ARGUMENT: empty command"),
        (["run", "--", ""], "INVALID_ARGUMENT: empty command"),
    ],
)
async def test_rpc_errors_are_one_line(fake: Fake, args: list[str], message: str) -> None:
    result = await fake.client(*args)
    assert one_error_line(result) == message
    assert not result.stdout


async def test_permission_denied(fake: Fake) -> None:
    job = fake.service.add(owner="bob", state=pb.RUNNING)
    result = await fake.client("stop", job.id)
    assert one_error_line(result) == f"PERMISSION_DENIED: job {job.id} belongs to someone else"


async def test_stop_prints_the_status_word_and_sends_the_grace(fake: Fake) -> None:
    job = fake.service.add(state=pb.RUNNING)
    result = await fake.client("stop", "--grace", "1.5s", job.id)
    assert result.stdout == b"stopped (signal 15)\n"
    assert fake.service.requests[-1].grace.ToNanoseconds() == 1_500_000_000
    again = await fake.client("stop", "--grace", "0", job.id)
    assert again.stdout == b"stopped (signal 15)\n"
    assert fake.service.requests[-1].HasField("grace")
    await fake.client("stop", job.id)
    assert not fake.service.requests[-1].HasField("grace")  # the server's default


OUTPUT = [
    (pb.STDOUT, b"out \xff\x00 one\n"),
    (pb.STDERR, b"err \x80 one\n"),
    (pb.STDOUT, b"no newline"),
    (pb.STDERR, b"\r\n\x1b[31m"),
]


async def test_logs_are_byte_exact_per_stream(fake: Fake) -> None:
    job = fake.service.add(Plan(chunks=OUTPUT), state=pb.EXITED)
    result = await fake.client("logs", job.id)
    assert result.code == 0
    assert result.stdout == b"out \xff\x00 one\nno newline"
    assert result.stderr == b"err \x80 one\n\r\n\x1b[31m"
    assert fake.service.requests[-1] == pb.OutputRequest(id=job.id, follow=False, offset=0)


async def test_logs_offset_and_follow(fake: Fake) -> None:
    job = fake.service.add(Plan(chunks=OUTPUT), state=pb.RUNNING)
    skip = len(OUTPUT[0][1])
    result = await fake.client("logs", "-f", "--offset", str(skip), job.id)
    assert result.code == 0 and result.stdout == b"no newline"
    output = [r for r in fake.service.requests if isinstance(r, pb.OutputRequest)]
    assert output == [pb.OutputRequest(id=job.id, follow=True, offset=skip)]


async def test_logs_stream_ended_by_the_server(fake: Fake) -> None:
    """Output already written stays written; the status follows on one line."""
    plan = Plan(chunks=OUTPUT[:1], fail=purerpc.UnavailableError("server shutting down"))
    job = fake.service.add(plan, state=pb.RUNNING)
    result = await fake.client("logs", "-f", job.id)
    assert result.stdout == OUTPUT[0][1]
    assert one_error_line(result) == "UNAVAILABLE: server shutting down"


LIST_HEADER = ["ID", "NAME", "OWNER", "STATUS", "STARTED", "DURATION", "COMMAND"]


async def test_list_table_and_json(fake: Fake) -> None:
    first = fake.service.add(state=pb.EXITED, exit_code=0, command=["echo", "a b"])
    second = fake.service.add(state=pb.RUNNING, command=["sleep", "60"])
    table = (await fake.client("list")).stdout.decode().splitlines()
    assert table[0].split() == LIST_HEADER
    assert table[1].startswith(first.id) and table[1].endswith("echo 'a b'")
    assert "exited (code 0)" in table[1] and "running" in table[2]
    assert table[0].index("OWNER") == table[1].index("alice") == table[2].index("alice")
    listed = json.loads((await fake.client("list", "--json")).stdout)
    assert [j["id"] for j in listed] == [first.id, second.id]


async def test_list_empty(fake: Fake) -> None:
    result = await fake.client("list")
    assert result.stdout.decode().split() == LIST_HEADER


@pytest.mark.parametrize(
    ("end", "code", "note"),
    [
        ({"state": pb.EXITED, "exit_code": 0}, 0, ""),
        ({"state": pb.EXITED, "exit_code": 3}, 3, ""),
        ({"state": pb.STOPPED, "signal": 15}, 128 + 15,
         "was stopped by a stop request (signal 15 (SIGTERM))"),
        ({"state": pb.KILLED, "signal": 9, "usage": pb.Usage(oom_kills=2)}, 137,
         "was oom-killed: it reached its memory limit"),
    ],
)  # fmt: skip
async def test_run_exits_with_the_jobs_code(
    fake: Fake, end: dict[str, Any], code: int, note: str
) -> None:
    """The job's stderr byte for byte, then (when it did not exit by itself) one line."""
    fake.service.next_plan = Plan(chunks=OUTPUT, end=end)
    result = await fake.client("run", "--memory", "1G", "--", "job", "arg")
    assert result.code == code, result
    assert result.stdout == b"out \xff\x00 one\nno newline"
    job_stderr = b"err \x80 one\n\r\n\x1b[31m"
    assert result.stderr.startswith(job_stderr)
    tail = result.stderr[len(job_stderr) :].decode()
    if note:
        assert tail.startswith("jobd-client: job ") and tail.endswith(f" {note}\n"), tail
        assert tail.count("\n") == 1
    else:
        assert tail == ""


async def start_client(
    nursery: trio.Nursery, cwd: Path, server: str, *args: str
) -> tuple[trio.Process, Callable[[], Any]]:
    """The client running in the background; stderr() reads all it wrote to stderr."""
    process: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            [str(CLIENT), *args],
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=client_env(JOBD_CLIENT_SERVER=server),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
    )

    async def stderr() -> bytes:
        assert process.stderr is not None
        data = b""
        while chunk := await process.stderr.receive_some():
            data += chunk
        return data

    return process, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_ctrl_c_during_run_stops_the_job(
    fake: Fake, nursery: trio.Nursery, signum: signal.Signals
) -> None:
    fake.service.next_plan = Plan(chunks=OUTPUT[:1], endless=True)
    process, stderr = await start_client(
        nursery, fake.home, fake.server, "run", "--", "sleep", "1000"
    )
    with trio.fail_after(60):  # a hang guard only (a loaded host starts the client slowly)
        await fake.service.following.wait()
        process.send_signal(signum)
        code = await process.wait()
    assert code == 128 + signum
    (job,) = fake.service.jobs.values()
    assert job.state == pb.STOPPED
    assert isinstance(fake.service.requests[-1], pb.StopRequest)
    assert (await stderr()).decode().splitlines() == [
        f"jobd-client: interrupted: stopping job {job.id} (Ctrl-C again to leave without waiting)",
        f"jobd-client: job {job.id}: stopped (signal 15)",
    ]


async def test_ctrl_c_during_logs_follow(fake: Fake, nursery: trio.Nursery) -> None:
    job = fake.service.add(Plan(chunks=OUTPUT[:1], endless=True), state=pb.RUNNING)
    process, stderr = await start_client(nursery, fake.home, fake.server, "logs", "-f", job.id)
    with trio.fail_after(60):  # a hang guard only (a loaded host starts the client slowly)
        await fake.service.following.wait()
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 130
    assert await stderr() == b""
    assert job.state == pb.RUNNING  # logs never stops a job


async def test_ctrl_c_while_waiting_for_an_answer(home: Path, nursery: trio.Nursery) -> None:
    asked = trio.Event()

    async def listen(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.receive_some()
        asked.set()
        await read_forever(stream)

    port = await serve_tls(nursery, server_context(home / "certs"), listen)
    process, stderr = await start_client(nursery, home, f"127.0.0.1:{port}", "list")
    with trio.fail_after(60):  # a hang guard only (a loaded host starts the client slowly)
        await asked.wait()
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 130
    assert await stderr() == b""


@pytest.mark.parametrize(("command", "code"), [("logs", 141), ("list", 1)])
async def test_closed_stdout_ends_quietly(fake: Fake, command: str, code: int) -> None:
    """`jobd-client logs ID | head`: no message, no traceback once head has had enough; a
    job's output exits as if killed by SIGPIPE, a table as click does."""
    job = fake.service.add(Plan(chunks=[(pb.STDOUT, b"x" * 65536)] * 30), state=pb.EXITED)
    for _ in range(2000):  # a table longer than a pipe's buffer
        fake.service.add(state=pb.RUNNING, command=["sleep", "60"])
    args = ["logs", job.id] if command == "logs" else ["list"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with trio.fail_after(60):  # a hang guard only (a loaded host starts the client slowly)
            done = await trio.run_process(
                [str(CLIENT), *args],
                stdin=subprocess.DEVNULL,
                cwd=fake.home,
                env=client_env(JOBD_CLIENT_SERVER=fake.server),
                stdout=write_end,
                capture_stderr=True,
                check=False,
            )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (code, b"")


# --- the pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512B", 512),
        ("512K", 512 << 10),
        ("512k", 512 << 10),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2MiB", 2 << 20),
        ("1T", 1 << 40),
        ("2MB", 2_000_000),
        ("1kB", 1000),
        (" 3 G ", 3 << 30),
        (".5M", 1 << 19),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1X", "1.2.3M", "1 iB", "ten", "1GG"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_parse_rate() -> None:
    assert parse_rate("10M/s") == 10 << 20
    assert parse_rate("10M") == 10 << 20
    assert parse_rate("500/s") == 500
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate("fast/s")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("1.5s", 1.5), ("2h", 7200.0),
     ("3", 3.0), ("0s", 0.0), ("7d", 604800.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "5 sec", "1w", "soon"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("fields", "word", "code"),
    [
        ({"state": pb.STATE_UNSPECIFIED}, "unknown", 1),
        ({"state": pb.RUNNING}, "running", 0),
        # A job that trapped SIGTERM and exited 7 by itself: stopped, with its own code.
        ({"state": pb.STOPPED, "exit_code": 7}, "stopped (signal 0)", 7),
        ({"state": pb.EXITED}, "exited (code 0)", 0),
        ({"state": pb.EXITED, "exit_code": 255}, "exited (code 255)", 255),
        ({"state": pb.STOPPED, "signal": 15}, "stopped (signal 15)", 143),
        ({"state": pb.STOPPED, "signal": 9}, "stopped (signal 9)", 137),
        ({"state": pb.KILLED, "signal": 11}, "killed (signal 11)", 139),
        ({"state": pb.KILLED, "signal": 9}, "killed (signal 9)", 137),
        ({"state": pb.KILLED, "signal": 9, "usage": pb.Usage(oom_kills=1)}, "oom-killed", 137),
        # An OOM kill counted but the job died of something else: not oom-killed.
        ({"state": pb.KILLED, "signal": 6, "usage": pb.Usage(oom_kills=1)}, "killed (signal 6)",
         134),
        ({"state": pb.STOPPED, "signal": 9, "usage": pb.Usage(oom_kills=1)},
         "stopped (signal 9)", 137),
    ],
)  # fmt: skip
def test_status_word_and_exit_status(fields: dict[str, Any], word: str, code: int) -> None:
    job = pb.Job(**fields)
    assert fmt.status_word(job) == word
    assert fmt.exit_status(job) == code


def test_find_cause_unwraps_groups_and_causes() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    generic = OSError("All connection attempts failed")
    generic.__cause__ = refused
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [anyio.EndOfStream(), generic])])
    assert find_cause(group) is refused
    failed: Exception = purerpc.NotFoundError("no job x")
    assert find_cause(ExceptionGroup("g", [anyio.BrokenResourceError(), failed])) is failed
    assert find_cause(ExceptionGroup("g", [KeyError("bug")])) is None
    error = ClientError("said")
    assert find_cause(ExceptionGroup("g", [failed, error])) is error


def test_describe_rpc_status_without_message() -> None:
    assert describe(purerpc.UnavailableError(""), "h:1", 10) == "UNAVAILABLE"
    assert (
        describe(trio.TooSlowError(), "h:1", 10) == "the server at h:1 did not answer within 10 s"
    )


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("TLSV1_ALERT_UNKNOWN_CA", "the server does not trust our certificate (unknown CA)"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "the server requires a client certificate"),
        ("SOMETHING_ELSE", "something_else"),
    ],
)
def test_describe_tls_alerts(reason: str, says: str) -> None:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason
    assert describe(error, "h:1", 10) == f"TLS with the server at h:1 failed: {says}"


# --- golden output of the human formats, against the fake ----------------------------------


def _ended_job(service: FakeJobService, job_id: str, **fields: Any) -> pb.Job:
    job = pb.Job(id=job_id, owner="alice", **fields)
    job.started_at.FromSeconds(1_700_000_000)
    service.jobs[job.id] = job
    service.plans[job.id] = Plan()
    service.stopped[job.id] = trio.Event()
    return job


async def test_list_table_golden(fake: Fake) -> None:
    a = _ended_job(fake.service, "6f1c0000-0000-4000-8000-000000000001", name="build",
                   command=["make", "-j4"], state=pb.EXITED, exit_code=2)
    a.ended_at.FromSeconds(1_700_000_000 + 184)
    b = _ended_job(fake.service, "6f1c1111-0000-4000-8000-000000000002",
                   command=["sh", "-c", "sleep 9; echo 'a b'"], state=pb.STOPPED, signal=15)
    b.started_at.FromSeconds(1_700_000_060)
    b.ended_at.FromNanoseconds(1_700_000_060 * 10**9 + 1_500_000_000)
    result = await fake.client("list", TZ="UTC")
    assert result.stdout.decode() == (
        "ID                                    NAME   OWNER  STATUS               STARTED              DURATION  COMMAND\n"  # noqa: E501
        "6f1c0000-0000-4000-8000-000000000001  build  alice  exited (code 2)      2023-11-14 22:13:20  3m04s     make -j4\n"  # noqa: E501
        "6f1c1111-0000-4000-8000-000000000002  -      alice  stopped (signal 15)  2023-11-14 22:14:20  1.5s      sh -c 'sleep 9; echo '\"'\"'a b'\"'\"''\n"  # noqa: E501
    )
    quiet = await fake.client("list", "-q", "--state", "stopped")
    assert quiet.stdout.decode() == f"{b.id}\n"
    # An ambiguous id prefix lists its candidates; a unique one (or the name) resolves.
    ambiguous = await fake.client("status", "6f1c")
    assert one_error_line(ambiguous) == (
        f"the id prefix '6f1c' matches 2 jobs: {a.id} (alice, build), {b.id} (alice); "
        "give more of it"
    )
    assert (await fake.client("status", "6f1c1")).stdout == b"stopped (signal 15)\n"
    missing = await fake.client("status", "6f1c2")
    assert one_error_line(missing) == "no job with the name or id prefix '6f1c2'"
    assert (await fake.client("status", "build")).stdout == b"exited (code 2)\n"
    several = await fake.client("status", "build", b.id)
    assert several.code == 2  # the first given that is not 0: build's exit code
    assert several.stdout.decode() == f"build  exited (code 2)\n{b.id}  stopped (signal 15)\n"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"state": pb.EXITED, "reason": pb.END_REASON_EXIT, "exit_code": 3}, ""),
        ({"state": pb.KILLED, "reason": pb.END_REASON_OOM, "signal": 9,
          "limits": pb.Limits(memory_bytes=32 << 20)},
         "was oom-killed: it reached its memory limit (32M)"),
        ({"state": pb.KILLED, "reason": pb.END_REASON_SIGNAL, "signal": 11},
         "was killed by signal 11 (SIGSEGV)"),
        ({"state": pb.STOPPED, "reason": pb.END_REASON_STOP, "signal": 15},
         "was stopped by a stop request (signal 15 (SIGTERM))"),
        ({"state": pb.STOPPED, "reason": pb.END_REASON_TIMEOUT, "signal": 15,
          "timeout": {"seconds": 90}},
         "was stopped: it ran past its timeout of 1m30s"),
        ({"state": pb.STOPPED, "reason": pb.END_REASON_SERVER_SHUTDOWN, "signal": 15},
         "was stopped: the server shut down while it ran"),
        ({"state": pb.KILLED, "reason": pb.END_REASON_SERVER_LOST, "signal": 9},
         "was killed: its server died while it ran"),
        # A server that sends no reason: the state says it.
        ({"state": pb.KILLED, "signal": 9, "usage": pb.Usage(oom_kills=1)},
         "was oom-killed: it reached its memory limit"),
    ],
)  # fmt: skip
def test_end_note_for_every_reason(fields: dict[str, Any], says: str) -> None:
    job = pb.Job(id="j", **fields)
    assert fmt.end_note(job) == (f"job j {says}" if says else "")


def test_summary_and_units_golden() -> None:
    job = pb.Job(id="j", state=pb.EXITED, usage=pb.Usage(cpu_usec=450_000,
                                                         memory_peak_bytes=12_900_000))
    job.started_at.FromSeconds(100)
    job.ended_at.FromNanoseconds(101_234_000_000)
    assert fmt.summary(job) == "job j exited (code 0); ran 1.23s, CPU 450ms, peak memory 12.3M"
    assert [fmt.size(n) for n in (0, 1023, 1024, 1536, 25_276_000_000, 1 << 40)] == [
        "0B", "1023B", "1K", "1.5K", "23.5G", "1T"]  # fmt: skip
    assert fmt.limit_message(
        "INVALID_ARGUMENT: limit memory_bytes=1.09951e+12 exceeds the server maximum 2.5276e+10",
        {"--memory": "1T"},
    ) == "INVALID_ARGUMENT: --memory 1T exceeds the server's maximum 23.5G"
    # A limit the user did not give (the server's own default) keeps the server's words.
    raw = "limit pids=5000 exceeds the server maximum 100"
    assert fmt.limit_message(raw, {}) == raw


def test_chunk_json_golden() -> None:
    chunk = pb.OutputChunk(data=b"h\xffi\n", stream=pb.STDERR, offset=7)
    chunk.time.FromNanoseconds(1_700_000_000_123_456_789)
    assert fmt.chunk_json(chunk) == (
        '{"log": "h\\udcffi\\n", "stream": "stderr", "time": "2023-11-14T22:13:20.123456Z", '
        '"offset": 7, "log_base64": "aP9pCg=="}'
    )
