"""`jobd-client` against the real server (tests/e2e.py): exit codes of run, wait, logs -f and
status for each end reason this machine can produce, stdin through a real pipe and a pty,
names, id prefixes, several ids at once, list filters, logs seeking and formats, contexts
from a temporary HOME and another directory, and the client's bugs of issue 13."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trio

from jobd.v1 import jobd_pb2 as pb

from .e2e import CLIENT, Pki, Result, Server, running_server
from .test_e2e import _code, _grpc_stub

pytestmark = pytest.mark.cgroups
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def server(tmp_path: Path, pki_dir: Pki, cgroup_name: str) -> AsyncIterator[Server]:
    async with running_server(tmp_path, pki_dir, cgroup_name, "--max-job-output", "1M") as srv:
        yield srv


def note(result: Result) -> str:
    """The one line `run` adds on stderr when the job did not exit by itself."""
    lines = [line for line in result.err.splitlines() if line.startswith("jobd-client: ")]
    assert len(lines) == 1, result
    return lines[0]


async def exit_codes(server: Server, job: str) -> tuple[int, int, int, int]:
    """wait, logs -f, logs -f --no-exit-code, status of an ended job."""
    wait = await server.client("wait", job)
    follow = await server.client("logs", "-f", job)
    quiet = await server.client("logs", "-f", "--no-exit-code", job)
    status = await server.client("status", job)
    return wait.rc, follow.rc, quiet.rc, status.rc


# ----------------------------------------------------------------- exit codes per end reason


async def test_exit_codes_of_a_job_that_exits(server: Server) -> None:
    result = await server.client("run", "--name", "three", "--", "sh", "-c", "echo x; exit 3")
    assert (result.rc, result.stdout, result.stderr) == (3, b"x\n", b"")
    assert await exit_codes(server, "three") == (3, 3, 0, 3)
    assert (await server.client("wait", "three")).stdout == b"exited (code 3)\n"


async def test_exit_codes_of_a_job_killed_by_a_signal(server: Server) -> None:
    result = await server.client("run", "--name", "k", "--", "sh", "-c", "kill -KILL $$")
    assert result.rc == 137
    assert note(result).endswith(" was killed by signal 9 (SIGKILL)")
    assert await exit_codes(server, "k") == (137, 137, 0, 137)


async def test_exit_codes_of_an_oom_kill(server: Server) -> None:
    result = await server.client(
        "run", "--name", "oom", "--memory", "32M", "--",
        "/usr/bin/python3", "-c", "bytearray(256 * 2**20)",
    )  # fmt: skip
    assert result.rc == 137
    assert note(result).endswith(" was oom-killed: it reached its memory limit (32M)")
    assert await exit_codes(server, "oom") == (137, 137, 0, 137)


async def test_exit_codes_of_a_stopped_job(server: Server) -> None:
    """run and wait (two ids at once) see the stop another client made."""
    job = await server.start_job("sleep", "1000")
    other = await server.start_job("sleep", "1000")
    async with trio.open_nursery() as nursery:
        results: dict[str, Result] = {}

        async def run_follow() -> None:
            results["follow"] = await server.client("logs", "-f", job)

        async def wait_both() -> None:
            results["wait"] = await server.client("wait", job, other)

        nursery.start_soon(run_follow)
        nursery.start_soon(wait_both)
        stopped = await server.client("stop", job, other, check=True)
    assert sorted(stopped.stdout.decode().splitlines()) == sorted(
        [f"{job}  stopped (signal 15)", f"{other}  stopped (signal 15)"]
    )
    assert results["follow"].rc == 143 and results["wait"].rc == 143
    assert sorted(results["wait"].stdout.decode().splitlines()) == sorted(
        [f"{job}  stopped (signal 15)", f"{other}  stopped (signal 15)"]
    )


async def _read_until(proc: trio.Process, marker: bytes) -> bytes:
    assert proc.stdout is not None
    seen = b""
    while marker not in seen:
        chunk = await proc.stdout.receive_some()
        assert chunk, f"ended without printing {marker!r}: {seen!r}"
        seen += chunk
    return seen


async def test_run_says_who_stopped_it(server: Server) -> None:
    proc = await trio.lowlevel.open_process(
        [*server.client_argv(), "run", "--name", "victim", "--", "sh", "-c",
         "echo up; exec sleep 1000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    await _read_until(proc, b"up\n")
    await server.client("stop", "victim", check=True)
    assert await proc.wait() == 143
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some()).decode()
    assert err.startswith("jobd-client: job ") and err.endswith(
        " was stopped by a stop request (signal 15 (SIGTERM))\n"
    ), err


async def test_exit_codes_of_a_timeout(server: Server) -> None:
    result = await server.client("run", "--name", "slow", "--timeout", "1s", "--", "sleep", "1000")
    assert result.rc == 143
    assert note(result).endswith(" was stopped: it ran past its timeout of 1s")
    assert await exit_codes(server, "slow") == (143, 143, 0, 143)


async def test_wait_timeout(server: Server) -> None:
    job = await server.start_job("sleep", "1000")
    result = await server.client("wait", "--timeout", "200ms", job)
    assert result.rc == 124 and result.err == f"jobd-client: job {job} still runs after 200ms\n"
    await server.client("stop", "--grace", "0", job, check=True)


async def test_server_shutdown_and_server_lost(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    """A follow open while the server shuts down gets the server's status (not "broke the
    gRPC protocol"); after a restart the job reads stopped (shutdown) or killed (lost)."""
    async with running_server(tmp_path, pki_dir, cgroup_name) as first:
        job = await first.start_job("sh", "-c", "echo up; exec sleep 1000")
        follow = await trio.lowlevel.open_process(
            [*first.client_argv(), "run", "--", "sh", "-c", "echo up; exec sleep 1000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert follow.stdout is not None
        seen = b""
        while b"up\n" not in seen:  # its follow is open
            seen += await follow.stdout.receive_some()
        first.proc.send_signal(signal.SIGTERM)
        assert await first.proc.wait() == 0
        assert follow.stderr is not None
        err = b""
        while chunk := await follow.stderr.receive_some():
            err += chunk
        assert await follow.wait() == 1
        assert err == b"jobd-client: UNAVAILABLE: server is shutting down\n"
    async with running_server(tmp_path, pki_dir, cgroup_name) as second:
        assert await exit_codes(second, job) == (143, 143, 0, 143)
        lost = await second.start_job("sleep", "1000")
        second.crashed_on_purpose = True
        second.proc.kill()
        await second.proc.wait()
    async with running_server(tmp_path, pki_dir, cgroup_name) as third:
        assert await exit_codes(third, lost) == (137, 137, 0, 137)
        [info] = json.loads((await third.client("inspect", lost, check=True)).stdout)
        assert info["reason"] == "END_REASON_SERVER_LOST"


# ----------------------------------------------------------------- stdin


async def test_stdin_through_a_pipe(server: Server) -> None:
    data = os.urandom(5 * 2**20)  # more than any buffer on the way: flow control holds it
    result = await server.client("run", "-i", "--", "sha256sum", stdin=data)
    assert result.rc == 0, result
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert result.stderr == b""


async def test_without_i_a_piped_stdin_is_not_sent_and_says_so(server: Server) -> None:
    result = await server.client("run", "--", "cat", stdin=b"hello\n")
    assert (result.rc, result.stdout) == (0, b"")
    assert result.err == (
        "jobd-client: stdin is a pipe and is not sent to the job: pass -i to send it\n"
    )
    quiet = await server.client("run", "--", "cat")  # stdin /dev/null: nothing to say
    assert (quiet.rc, quiet.stdout, quiet.stderr) == (0, b"", b"")


async def test_start_i_then_logs(server: Server) -> None:
    started = await server.client("start", "-i", "--name", "fed", "--", "tr", "a-z", "A-Z",
                                  stdin=b"shout\n", check=True)  # fmt: skip
    uuid.UUID(started.stdout.decode().strip())
    assert (await server.client("logs", "-f", "fed")).stdout == b"SHOUT\n"


async def test_stdin_through_a_pty_ends_with_ctrl_d(server: Server) -> None:
    """A terminal in canonical mode: a line, then Ctrl-D (EOF) ends the job's stdin."""
    controller, terminal = pty.openpty()
    try:
        proc = await trio.lowlevel.open_process(
            [*server.client_argv(), "run", "-i", "--", "sh", "-c", "cat; echo done"],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        assert proc.stdout is not None and proc.stderr is not None
        await trio.to_thread.run_sync(os.write, controller, b"typed line\n")
        seen = b""
        while b"typed line\n" not in seen:
            seen += await proc.stdout.receive_some()
        await trio.to_thread.run_sync(os.write, controller, b"\x04")
        while chunk := await proc.stdout.receive_some():
            seen += chunk
        assert await proc.wait() == 0
        assert seen == b"typed line\ndone\n"
        assert await proc.stderr.receive_some() == b""
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


def _input_codes(server: Server, fed: str, closed: str) -> dict[str, grpc.StatusCode]:
    channel, stub = _grpc_stub(server, "alice")
    out = {}
    with channel:
        job = stub.Input(iter([pb.InputChunk(id=fed, data=b"one\n")]), timeout=10)
        out["first"] = grpc.StatusCode.OK if job.id == fed else grpc.StatusCode.UNKNOWN
        out["second"] = _code(lambda: stub.Input(iter([pb.InputChunk(id=fed)]), timeout=10))
        out["no_stdin"] = _code(lambda: stub.Input(iter([pb.InputChunk(id=closed)]), timeout=10))
        out["no_id"] = _code(lambda: stub.Input(iter([pb.InputChunk(data=b"x")]), timeout=10))
    channel, bob = _grpc_stub(server, "bob")
    with channel:
        out["bob"] = _code(lambda: bob.Input(iter([pb.InputChunk(id=fed)]), timeout=10))
    return out


async def test_input_call_rules(server: Server) -> None:
    """One Input call per job; none to a job without stdin; only its owner's (to others it
    is NOT_FOUND); grpcio's client-streaming call works against jobd's transport."""
    fed = (await server.client("start", "-i", "--", "sleep", "1000", stdin=b"")).stdout
    fed_id = fed.decode().strip()  # start -i with an empty stdin: EOF at once
    closed = await server.start_job("sleep", "1000")  # no stdin
    channel, stub = _grpc_stub(server, "alice")
    with channel:
        command = ["sh", "-c", "cat; echo eof; exec sleep 1000"]
        kept = stub.Start(pb.StartRequest(command=command, stdin=True), timeout=10)
    codes = await trio.to_thread.run_sync(_input_codes, server, kept.id, closed)
    assert codes == {
        "first": grpc.StatusCode.OK,
        "second": grpc.StatusCode.FAILED_PRECONDITION,
        "no_stdin": grpc.StatusCode.FAILED_PRECONDITION,
        "no_id": grpc.StatusCode.INVALID_ARGUMENT,
        "bob": grpc.StatusCode.NOT_FOUND,  # another user's job reads as missing
    }
    follow = await trio.lowlevel.open_process(
        [*server.client_argv(), "logs", "-f", kept.id],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert await _read_until(follow, b"eof\n") == b"one\neof\n"
    await server.client("stop", "--grace", "0", fed_id, closed, kept.id, check=True)
    assert await follow.wait() == 137


# ----------------------------------------------------------------- names, prefixes, many ids


async def test_names_and_id_prefixes(server: Server) -> None:
    job = (await server.client("start", "--name", "web", "--label", "tier=front", "--",
                               "sleep", "1000", check=True)).stdout.decode().strip()  # fmt: skip
    assert (await server.client("status", "web")).stdout == b"running\n"
    assert (await server.client("status", job[:4])).stdout == b"running\n"
    assert (await server.client("status", job[:13].upper())).stdout == b"running\n"
    taken = await server.client("start", "--name", "web", "--", "true")
    assert taken.rc == 1 and "already has a job named 'web'" in taken.err
    bobs = await server.client("status", "web", user="bob")
    assert bobs.rc == 1 and bobs.err == (
        "jobd-client: no job named 'web' (and it is not an id or id prefix)\n"
    )
    refused = await server.client("rm", "web")
    assert refused.rc == 1 and "FAILED_PRECONDITION" in refused.err
    assert "(`jobd-client rm -f web` stops it first)" in refused.err
    removed = await server.client("rm", "-f", "web", check=True)
    assert removed.stdout == f"{job}\n".encode()
    gone = await server.client("status", job)
    assert gone.rc == 1 and "NOT_FOUND" in gone.err


async def test_many_ids_at_once(server: Server) -> None:
    jobs = [await server.start_job("sleep", "1000") for _ in range(12)]
    stopped = await server.client("stop", "--grace", "0", *jobs, "nosuch", check=False)
    assert stopped.rc == 1
    assert stopped.stdout.decode().splitlines() == [f"{j}  stopped (signal 9)" for j in jobs]
    assert stopped.err == (
        "jobd-client: nosuch: no job named 'nosuch' (and it is not an id or id prefix)\n"
    )
    waited = await server.client("wait", *jobs)
    assert waited.rc == 137
    removed = await server.client("rm", *jobs, check=True)
    assert removed.stdout.decode().split() == jobs


async def test_rm_ended(server: Server) -> None:
    ended = [await server.start_job("true") for _ in range(3)]
    running = await server.start_job("sleep", "1000")
    bobs = await server.start_job("true", user="bob")
    await server.client("wait", *ended, check=True)
    await server.client("wait", bobs, user="bob", check=True)
    result = await server.client("rm", "--ended", check=True)
    assert sorted(result.stdout.decode().split()) == sorted(ended)
    assert (await server.client("list", "-q", check=True)).stdout.decode().split() == [running]
    assert (await server.client("list", "-q", user="bob")).stdout.decode().split() == [bobs]
    mine = await server.client("rm", "--ended", user="admin", check=True)
    assert mine.stdout == b"" and (await server.client("status", bobs, user="bob")).rc == 0
    admin = await server.client("rm", "--ended", "--all-users", user="admin", check=True)
    assert admin.stdout.decode().split() == [bobs]
    usage = await server.client("rm")
    assert usage.rc == 2 and "give job ids, or --ended" in usage.err


async def test_list_filters_and_pages(server: Server) -> None:
    done = [await server.start_job("true") for _ in range(3)]
    started = await server.client(
        "start", "--label", "team=x", "--label", "env=ci", "--", "sleep", "1000", check=True
    )
    labelled = started.stdout.decode().strip()
    await server.client("wait", *done, check=True)
    quiet = await server.client("list", "-q", check=True)
    assert quiet.stdout.decode().split() == [*done, labelled]
    assert (await server.client("list", "-q", "--limit", "2")).stdout.decode().split() == [
        done[2], labelled,
    ]  # fmt: skip
    state = await server.client("list", "-q", "--state", "running")
    assert state.stdout.decode().split() == [labelled]
    label = await server.client("list", "-q", "--label", "team=x", "--label", "env=ci")
    assert label.stdout.decode().split() == [labelled]
    assert (await server.client("list", "-q", "--label", "team=y")).stdout == b""
    bob = await server.start_job("true", user="bob")
    owner = await server.client("list", "-q", "--owner", "bob", user="admin")
    assert owner.stdout.decode().split() == [bob]
    table = (await server.client("list", "--state", "running")).stdout.decode().splitlines()
    assert table[0].split() == ["ID", "NAME", "OWNER", "STATUS", "STARTED", "DURATION", "COMMAND"]
    assert table[1].startswith(labelled) and table[1].endswith("sleep 1000")


async def test_list_pages_through_more_than_one_page(server: Server) -> None:
    jobs = [await server.start_job("true") for _ in range(105)]  # the server's page: 100
    listed = (await server.client("list", "-q", check=True)).stdout.decode().split()
    assert listed == jobs


async def test_inspect(server: Server) -> None:
    job = await server.start_job("sh", "-c", "echo hi")
    await server.client("wait", job, check=True)
    result = await server.client("inspect", job, "nosuch")
    assert result.rc == 1 and "nosuch" in result.err
    [info] = json.loads(result.stdout)
    assert info["id"] == job and info["reason"] == "END_REASON_EXIT"
    assert info["working_dir"] == "/" and int(info["uid"]) > 0
    assert int(info["output_bytes"]) == 3 and info["output_dropped_bytes"] == 0
    assert info["status"] == "exited (code 0)"


# ----------------------------------------------------------------- logs


async def test_logs_timestamps_tail_since_streams(server: Server) -> None:
    job = await server.start_job("sh", "-c", "for i in 1 2 3 4 5; do echo out $i; done; echo e >&2")
    await server.client("wait", job, check=True)
    stamped = await server.client("logs", "-t", job, check=True)
    lines = stamped.stdout.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [f"out {i}" for i in range(1, 6)]
    assert all(re.fullmatch(TIMESTAMP, line.split(" ", 1)[0]) for line in lines), lines
    assert re.fullmatch(TIMESTAMP + " e\n", stamped.err)
    tail = await server.client("logs", "--tail", "2", job, check=True)
    # The last 2 lines of the combined stream; the pipes race, so "e" may come first.
    assert (tail.stdout, tail.stderr) in ((b"out 5\n", b"e\n"), (b"out 4\nout 5\n", b""))
    only = await server.client("logs", "--stdout", "--tail", "2", job, check=True)
    assert (only.stdout, only.stderr) == (b"out 4\nout 5\n", b"")
    errs = await server.client("logs", "--stderr", job, check=True)
    assert (errs.stdout, errs.stderr) == (b"", b"e\n")
    recent = await server.client("logs", "--since", "1h", job, check=True)
    assert recent.stdout.count(b"\n") == 5
    future = await server.client("logs", "--since", "2999-01-01T00:00:00Z", job, check=True)
    assert (future.stdout, future.stderr) == (b"", b"")
    bad = await server.client("logs", "--since", "soon", job)
    assert bad.rc == 2 and "neither a duration" in bad.err


async def test_logs_json_is_lossless(server: Server) -> None:
    job = await server.start_job("sh", "-c", r"printf 'ok\n'; printf 'h\377i\n' >&2")
    await server.client("wait", job, check=True)
    result = await server.client("logs", "--json", job, check=True)
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.stderr == b""
    by_stream = {r["stream"]: r for r in records}
    assert by_stream["stdout"]["log"] == "ok\n" and "log_base64" not in by_stream["stdout"]
    err = by_stream["stderr"]
    assert err["log"].encode("utf-8", "surrogateescape") == b"h\xffi\n"
    assert base64.b64decode(err["log_base64"]) == b"h\xffi\n"
    assert sorted(r["offset"] for r in records) in ([0, 3], [0, 4])  # the two pipes race
    assert all(re.fullmatch(TIMESTAMP, r["time"]) for r in records)


async def test_logs_say_how_much_was_dropped(server: Server) -> None:
    """The server keeps 1M per job (--max-job-output): older output is gone, and said so."""
    job = await server.start_job("sh", "-c", "head -c 3000000 /dev/zero")
    await server.client("wait", job, check=True)
    result = await server.client("logs", job, check=True)
    [info] = json.loads((await server.client("inspect", job)).stdout)
    dropped = int(info["output_start"])
    assert dropped > 0 and len(result.stdout) == 3_000_000 - dropped
    assert result.err == (
        f"jobd-client: job {job}: its first {_size(dropped)} of output ({dropped} bytes) were "
        "dropped (the server keeps at most its --max-job-output per job); showing what is kept\n"
    )


def _size(n: int) -> str:
    from jobd_client.format import size

    return size(n)


# ----------------------------------------------------------------- contexts


async def _client_in(home: Path, cwd: Path, *args: str, **env: str) -> Result:
    """The client as a user with this HOME runs it, from cwd, with no JOBD_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JOBD_")}
    environ.pop("XDG_CONFIG_HOME", None)
    environ.update(HOME=str(home), **env)
    done = await trio.run_process(
        [CLIENT, *args], cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


async def test_contexts_from_a_temporary_home_and_another_directory(
    server: Server, tmp_path: Path
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    certs = server.pki.dir
    added = await _client_in(
        home, certs, "context", "add", "dev", "--server", server.address,
        "--ca", "ca.pem", "--cert", "alice.pem", "--key", "alice.key",
    )  # fmt: skip
    config = home / ".config" / "jobd" / "config.toml"
    assert added.rc == 0 and added.err == (
        f"jobd-client: context dev (current): {server.address} in {config}\n"
    )
    assert config.read_text() == (
        'current = "dev"\n\n[contexts.dev]\n'
        f'server = "{server.address}"\nca = "{certs}/ca.pem"\n'
        f'cert = "{certs}/alice.pem"\nkey = "{certs}/alice.key"\n'
    )
    assert config.stat().st_mode & 0o077 == 0
    job = (await _client_in(home, elsewhere, "start", "--", "true")).stdout.decode().strip()
    waited = await _client_in(home, elsewhere, "wait", job)
    assert (waited.rc, waited.stdout) == (0, b"exited (code 0)\n")
    # --user takes the certificate beside the context's: bob does not see alice's job.
    bob = await _client_in(home, elsewhere, "--user", "bob", "status", job)
    assert bob.rc == 1 and "NOT_FOUND" in bob.err
    again = await _client_in(home, certs, "context", "add", "dev", "--server", "x:1",
                             "--ca", "ca.pem", "--cert", "bob.pem", "--key", "bob.key")  # fmt: skip
    assert again.rc == 1 and "--replace" in again.err
    other = await _client_in(home, certs, "context", "add", "bob", "--server", server.address,
                             "--ca", "ca.pem", "--cert", "bob.pem", "--key", "bob.key")  # fmt: skip
    assert other.err == f"jobd-client: context bob: {server.address} in {config}\n"
    listing = await _client_in(home, elsewhere, "context", "ls")
    w = len(server.address)
    assert listing.stdout.decode() == (
        f"   NAME  {'SERVER'.ljust(w)}  CERT\n"
        f"   bob   {server.address}  {certs}/bob.pem\n"
        f"*  dev   {server.address}  {certs}/alice.pem\n"
    )
    as_bob = await _client_in(home, elsewhere, "--context", "bob", "status", job)
    assert as_bob.rc == 1 and "NOT_FOUND" in as_bob.err
    by_env = await _client_in(home, elsewhere, "status", job, JOBD_CLIENT_CONTEXT="bob")
    assert by_env.rc == 1 and "NOT_FOUND" in by_env.err
    assert (await _client_in(home, elsewhere, "context", "use", "bob")).rc == 0
    assert (await _client_in(home, elsewhere, "status", job)).rc == 1
    assert (await _client_in(home, elsewhere, "context", "rm", "bob")).rc == 0
    unknown = await _client_in(home, elsewhere, "--context", "bob", "list")
    assert unknown.rc == 1 and "no context 'bob'" in unknown.err and "known: dev" in unknown.err
    # No current context now: the defaults (certs/ here) apply, and say how to fix it.
    bare = await _client_in(home, elsewhere, "list")
    assert bare.rc == 1 and "run `just certs`" in bare.err
    # The server's JOBD_* variables do not steer the client.
    steered = await _client_in(
        home, elsewhere, "--context", "dev", "list", JOBD_CERT="/nonexistent", JOBD_SERVER="x:1"
    )
    assert steered.rc == 0, steered
    bad = await _client_in(home, elsewhere, "context", "add", "no/slash", "--server", "a:1",
                           "--ca", "x", "--cert", "x", "--key", "x")  # fmt: skip
    assert bad.rc == 2 and "is not a context name" in bad.err


# ----------------------------------------------------------------- the bugs of issue 13


async def test_non_utf8_argument_is_refused_in_one_line(server: Server) -> None:
    result = await server.client("run", "--", "echo", os.fsdecode(b"h\xffi"))
    assert result.rc == 2 and result.stdout == b""
    assert result.err == (
        "jobd-client: argument 1 b'h\\xffi' is not UTF-8 text: the jobd API carries "
        "arguments, names and the environment as text (send bytes through stdin with -i, "
        "or a file)\n"
    )


async def test_limit_errors_in_the_units_typed(server: Server) -> None:
    result = await server.client("run", "--memory", "1T", "--", "true")
    assert result.rc == 1
    assert re.fullmatch(
        r"jobd-client: INVALID_ARGUMENT: --memory 1T exceeds the server's maximum "
        r"\d+(\.\d)?[MGT]\n",
        result.err,
    ), result.err
    small = await server.client("start", "--memory", "1K", "--", "true")
    assert small.err == "jobd-client: INVALID_ARGUMENT: --memory 1K is below the minimum 1M\n"


async def test_run_summary(server: Server) -> None:
    result = await server.client("run", "-v", "--", "true")
    assert result.rc == 0
    assert re.fullmatch(
        r"jobd-client: job [0-9a-f-]{36} exited \(code 0\); ran \S+, CPU \S+, "
        r"peak memory \d+(\.\d)?[BKMG]\n",
        result.err,
    ), result.err


def _interrupted_before_our_code(err: bytes) -> bool:
    """A KeyboardInterrupt raised while Python starts the program: in `site` and the .pth
    import hooks it runs, in the console script pip generated (at its `from jobd_client._main
    import main`), in the import machinery or the standard library under it, and in no line
    of jobd_client but the first of `_main` (its SIGINT reset): the signal came before that
    reset, where no program can catch it. Also when CPython reports it as "Exception ignored
    in" a callback of the import machinery (then "KeyboardInterrupt: ", and the program
    goes on)."""
    if not re.search(rb"\nKeyboardInterrupt:?\s*$", err):
        return False
    frames = re.findall(rb'File "([^"]+)", line \d+, in [^\n]*\n((?: {4}[^\n]*\n)?)', err)
    if not frames:
        return False
    for path, line in frames:
        if b"/jobd_client/" in path and not (
            path.endswith(b"/_main.py") and b"_signal" in line
        ):
            return False  # a line of ours after the reset ran: the reset did not hold
    return True


def test_what_counts_as_interrupted_before_our_code() -> None:
    wrapper = (
        b'Traceback (most recent call last):\n  File "/v/bin/jobd-client", line 5, in <module>\n'
        b"    from jobd_client._main import main\n"
        b'  File "<frozen importlib._bootstrap>", line 1176, in _find_and_load\nKeyboardInterrupt\n'
    )
    ignored = (
        b"Exception ignored in: <function _get_module_lock.<locals>.cb at 0x7f8b2b998900>\n"
        b'Traceback (most recent call last):\n  File "<frozen importlib._bootstrap>", line 204, '
        b"in cb\nKeyboardInterrupt: \n"
    )
    ours = (
        b'Traceback (most recent call last):\n  File "/r/jobd_client/cli.py", line 9, in main\n'
        b"    run()\nKeyboardInterrupt\n"
    )
    assert _interrupted_before_our_code(wrapper) and _interrupted_before_our_code(ignored)
    assert not _interrupted_before_our_code(ours)
    assert not _interrupted_before_our_code(b"jobd-client: some error\n")


async def test_no_traceback_on_ctrl_c_at_any_moment(server: Server) -> None:
    """SIGINT at many points of a client's life, start-up included: never a traceback of
    ours. (A SIGINT while the interpreter itself boots, before it runs any of our code, makes
    CPython print "Fatal Python error: init_...": nothing a program can change.)"""
    ours = 0
    for step in range(25):
        proc = await trio.lowlevel.open_process(
            [*server.client_argv(), "list"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(step):
            await trio.lowlevel.checkpoint()
        await trio.sleep(step * 0.004)  # spreads the signal over start-up; any moment is fine
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        err = b""
        while chunk := await proc.stderr.receive_some():
            err += chunk
        rc = await proc.wait()
        if b"Fatal Python error: init_" in err:  # the interpreter booting: not ours
            continue
        if _interrupted_before_our_code(err):  # in pip's console-script wrapper: not ours
            continue
        ours += 1
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
        assert rc in (0, 130, -signal.SIGINT), (rc, err)
    assert ours > 0


async def test_version_and_completion(server: Server) -> None:
    version = await server.client("--version", check=True)
    assert re.fullmatch(rb"jobd-client \d+\.\d+\.\d+\S*\n", version.stdout)
    for shell, marker in (("bash", b"complete -o"), ("zsh", b"compdef"), ("fish", b"complete")):
        script = await server.client("completion", shell, check=True)
        assert b"_JOBD_CLIENT_COMPLETE" in script.stdout and marker in script.stdout
