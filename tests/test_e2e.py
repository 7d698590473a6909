"""End to end: the real `jobd serve` process, the real `jobd-client` binary, real TLS and
real cgroups; plus the official grpcio client, to prove the wire protocol is real gRPC."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc

from .conftest import jobd_cgroups
from .e2e import CLIENT, JOBD, Pki, Server, alive, pids_in, running_server, uid_flags

pytestmark = pytest.mark.cgroups


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def server(tmp_path: Path, pki_dir: Pki, cgroup_name: str) -> AsyncIterator[Server]:
    async with running_server(tmp_path, pki_dir, cgroup_name) as srv:
        yield srv


# ----------------------------------------------------------------- the CLI, every command


async def test_start_status_logs_stop_list(server: Server) -> None:
    job = await server.start_job("sh", "-c", "echo out; echo err >&2; exec sleep 1000")
    uuid.UUID(job)
    status = await server.client("status", job, check=True)
    assert status.stdout == b"running\n"
    logs = await server.client("logs", job, check=True)
    assert logs.stdout == b"out\n" and logs.stderr == b"err\n"
    logs = await server.client("logs", "--offset", "2", job, check=True)
    # stdout and stderr race into the combined stream; offset 2 cuts into whichever was first
    assert (logs.stdout, logs.stderr) in ((b"t\n", b"err\n"), (b"out\n", b"r\n"))
    stopped = await server.client("stop", "--grace", "5s", job, check=True)
    assert stopped.stdout == b"stopped (signal 15)\n"
    listing = await server.client("list", "--json", check=True)
    jobs = json.loads(listing.stdout)
    [entry] = [j for j in (jobs["jobs"] if isinstance(jobs, dict) else jobs) if j["id"] == job]
    assert entry["owner"] == "alice"
    table = await server.client("list", check=True)
    assert job.encode() in table.stdout and b"stopped (signal 15)" in table.stdout


async def test_run_exit_codes_and_output(server: Server) -> None:
    result = await server.client("run", "--", "sh", "-c", "printf 'a\\0b'; echo e >&2; exit 3")
    assert (result.rc, result.stdout, result.stderr) == (3, b"a\0b", b"e\n")
    result = await server.client("run", "--", "sh", "-c", "kill -TERM $$")
    assert result.rc == 128 + signal.SIGTERM
    result = await server.client(
        "run", "--memory", "32M", "--", "/usr/bin/python3", "-c", "bytearray(256 * 2**20)"
    )
    assert result.rc == 137  # oom-killed: 128 + SIGKILL


def _last_job_id(server: Server) -> str:
    ids = [line.split("job=")[1].split()[0] for line in server.log.decode().splitlines()
           if "method=Start" in line and "code=OK" in line]
    return ids[-1]


async def test_status_json_and_oom_word(server: Server) -> None:
    result = await server.client(
        "run", "--memory", "32M", "--", "/usr/bin/python3", "-c", "bytearray(256 * 2**20)"
    )
    assert result.rc == 137
    job = _last_job_id(server)
    status = await server.client("status", job)  # exits as `wait` would: 128 + SIGKILL
    assert (status.rc, status.stdout) == (137, b"oom-killed\n")
    data = json.loads((await server.client("status", "--json", job)).stdout)
    assert data["id"] == job and data["owner"] == "alice"
    assert int(data["usage"]["oom_kills"]) >= 1
    assert int(data["limits"]["memory_bytes"]) == 32 * 2**20


async def test_follow_is_live_and_ends_with_the_job(server: Server, shared_dir: Path) -> None:
    trigger = shared_dir / "trigger"
    job = await server.start_job(
        "sh", "-c", f"echo first; while [ ! -e {trigger} ]; do sleep 0.02; done; echo second"
    )
    proc = await trio.lowlevel.open_process(
        [*server.client_argv(), "logs", "-f", job], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        seen = b""
        while b"first\n" not in seen:
            seen += await proc.stdout.receive_some()
        assert b"second" not in seen  # the job is still waiting: this is live
        trigger.touch()
        async for data in proc.stdout:
            seen += data
        assert await proc.wait() == 0
        assert seen == b"first\nsecond\n"
    finally:
        trigger.unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_cli_errors_are_one_line(server: Server) -> None:
    missing = str(uuid.uuid4())
    cases = [
        (["status", missing], "NOT_FOUND"),
        (["status", "not-a-uuid"], "no job named 'not-a-uuid'"),
        (["start", "--", "no-such-program-jobd"], "not found in PATH"),
        (["start", "--workdir", "/nonexistent", "--", "true"], "does not exist"),
        (["start", "--cpus", "100000", "--", "true"], "--cpus 100000 exceeds the server's maximum"),
        (["start", "--memory", "1T", "--", "true"], "--memory 1T exceeds the server's maximum "),
    ]
    for args, message in cases:
        result = await server.client(*args)
        assert result.rc == 1, result
        assert message in result.err and result.err.count("\n") == 1, result.err
        assert "Traceback" not in result.err


# ----------------------------------------------------------------- authorization


async def test_authorization_matrix(server: Server) -> None:
    alices = await server.start_job("sleep", "1000", user="alice")
    bobs = await server.start_job("sleep", "1000", user="bob")
    for args in (["status", alices], ["logs", alices], ["stop", "--grace", "0", alices]):
        # NOT_FOUND, word for word what a missing job gets: another user's ids stay hidden.
        denied = await server.client(*args, user="bob")
        assert denied.rc == 1 and f"NOT_FOUND: no job {alices}" in denied.err, (args, denied)
    assert (await server.client("status", alices, user="alice")).stdout == b"running\n"
    assert (await server.client("status", alices, user="admin")).stdout == b"running\n"
    bob_list = (await server.client("list", user="bob", check=True)).stdout
    assert bobs.encode() in bob_list and alices.encode() not in bob_list
    admin_list = (await server.client("list", user="admin", check=True)).stdout
    assert bobs.encode() in admin_list and alices.encode() in admin_list
    stopped = await server.client("stop", "--grace", "0", alices, user="admin", check=True)
    assert stopped.stdout == b"stopped (signal 9)\n"
    await server.client("stop", "--grace", "0", bobs, user="bob", check=True)
    assert "user=bob method=Stop job=" + alices + " code=NOT_FOUND" in server.log.decode()


# ----------------------------------------------------------------- TLS refusals


def _tls_client(
    server: Server, *, cert: str | None, key: str | None, version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server.pki.dir / "ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def _handshake_and_read(server: Server, ctx: ssl.SSLContext) -> bytes:
    """Handshake, then read: a refused client certificate shows in TLS 1.3 only once the
    client reads (the server's alert arrives after the client's Finished)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(1024)


@pytest.mark.parametrize("who", ["no-cert", "evil-admin", "expired", "future", "server-as-client"])
async def test_tls_refusals(server: Server, who: str) -> None:
    pair: tuple[str | None, str | None] = (None, None)
    if who == "server-as-client":
        pair = server.pki.pair("server")
    elif who != "no-cert":
        pair = server.pki.pair(who)
    ctx = _tls_client(server, cert=pair[0], key=pair[1])
    # Refused: an alert, a reset, or a close before the server says a single HTTP/2 byte.
    try:
        answer = await trio.to_thread.run_sync(_handshake_and_read, server, ctx)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b""
    # and the real CLI says so on one line
    if pair[0]:
        result = await trio.run_process(
            [CLIENT, "--server", server.address, "--ca", str(server.pki.dir / "ca.pem"),
             "--cert", pair[0], "--key", pair[1] or "", "list"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        assert result.returncode == 1 and result.stderr.count(b"\n") == 1, result.stderr


async def test_tls12_and_plaintext_refused(server: Server) -> None:
    cert, key = server.pki.pair("alice")
    ctx = _tls_client(server, cert=cert, key=key, version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await trio.to_thread.run_sync(_handshake_and_read, server, ctx)

    def plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return raw.recv(1024)

    try:
        answer = await trio.to_thread.run_sync(plaintext)
    except ConnectionError:
        answer = b""
    assert b"\x00\x00\x00\x04" not in answer[:9]  # never an HTTP/2 SETTINGS frame in clear
    # the server is still fine
    assert (await server.client("list")).rc == 0


async def test_certificate_without_cn_is_unauthenticated(server: Server) -> None:
    result = await server.client("list", user="nocn")
    assert result.rc == 1 and "UNAUTHENTICATED" in result.err, result


# ----------------------------------------------------------------- grpcio interop


def _grpc_stub(server: Server, user: str) -> tuple[grpc.Channel, jobd_pb2_grpc.JobServiceStub]:
    cert, key = server.pki.pair(user)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(server.pki.dir / "ca.pem").read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    channel = grpc.secure_channel(server.address, creds)
    return channel, jobd_pb2_grpc.JobServiceStub(channel)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def _interop(server: Server) -> dict[str, Any]:
    channel, stub = _grpc_stub(server, "alice")
    out: dict[str, Any] = {}
    with channel:
        job = stub.Start(pb.StartRequest(command=["sh", "-c", "echo hi; echo ho >&2"]), timeout=10)
        chunks = list(stub.Output(pb.OutputRequest(id=job.id, follow=True), timeout=10))
        out["chunks"] = [(c.stream, c.offset, c.data) for c in chunks]
        out["status"] = stub.Status(pb.JobRequest(id=job.id), timeout=10)
        out["list"] = [j.id for j in stub.List(pb.ListRequest(), timeout=10).jobs]
        out["job"] = job.id
        # a server stream cancelled half-way
        noisy = stub.Start(pb.StartRequest(command=["yes"]), timeout=10)
        stream = stub.Output(pb.OutputRequest(id=noisy.id, follow=True))
        got = 0
        for chunk in stream:
            got += len(chunk.data)
            if got > 1 << 20:
                stream.cancel()
                break
        out["cancelled_after"] = got
        out["stop"] = stub.Stop(pb.StopRequest(id=noisy.id), timeout=10)
        # the same connection still works after the cancellation
        out["after_cancel"] = stub.Status(pb.JobRequest(id=job.id), timeout=10).state
        bad = str(uuid.uuid4())
        out["codes"] = {
            "empty": _code(lambda: stub.Start(pb.StartRequest(), timeout=10)),
            "nul": _code(lambda: stub.Start(pb.StartRequest(command=["a\0b"]), timeout=10)),
            "negative": _code(lambda: stub.Start(
                pb.StartRequest(command=["true"], limits=pb.Limits(pids=-1)), timeout=10)),
            "too_big": _code(lambda: stub.Start(
                pb.StartRequest(command=["true"], limits=pb.Limits(cpus=1e9)), timeout=10)),
            "workdir": _code(lambda: stub.Start(
                pb.StartRequest(command=["true"], working_dir="/nope"), timeout=10)),
            "noexec": _code(lambda: stub.Start(
                pb.StartRequest(command=["/etc/passwd"]), timeout=10)),
            "malformed": _code(lambda: stub.Status(pb.JobRequest(id="x"), timeout=10)),
            "missing": _code(lambda: stub.Status(pb.JobRequest(id=bad), timeout=10)),
            "offset": _code(lambda: list(stub.Output(
                pb.OutputRequest(id=job.id, offset=-1), timeout=10))),
            "grace": _code(lambda: stub.Stop(
                pb.StopRequest(id=job.id, grace={"seconds": -1}), timeout=10)),
        }
    channel, bob = _grpc_stub(server, "bob")
    with channel:
        out["bob_status"] = _code(lambda: bob.Status(pb.JobRequest(id=out["job"]), timeout=10))
        out["bob_output"] = _code(lambda: list(bob.Output(
            pb.OutputRequest(id=out["job"]), timeout=10)))
        out["bob_list"] = [j.id for j in bob.List(pb.ListRequest(), timeout=10).jobs]
    return out


async def test_grpcio_interop_every_rpc(server: Server) -> None:
    out = await trio.to_thread.run_sync(_interop, server)
    assert sorted(out["chunks"]) == sorted([(pb.STDOUT, 0, b"hi\n"), (pb.STDERR, 3, b"ho\n")]) \
        or sorted(out["chunks"]) == sorted([(pb.STDERR, 0, b"ho\n"), (pb.STDOUT, 3, b"hi\n")])
    assert out["status"].state == pb.EXITED and out["status"].owner == "alice"
    assert out["job"] in out["list"]
    assert out["cancelled_after"] > 1 << 20
    assert out["stop"].state == pb.STOPPED
    assert out["after_cancel"] == pb.EXITED
    codes = out["codes"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for name in ("empty", "nul", "negative", "too_big", "workdir", "noexec", "malformed",
                 "offset", "grace"):
        assert codes[name] == invalid, (name, codes[name])
    assert codes["missing"] == grpc.StatusCode.NOT_FOUND
    assert out["bob_status"] == grpc.StatusCode.NOT_FOUND
    assert out["bob_output"] == grpc.StatusCode.NOT_FOUND
    assert out["job"] not in out["bob_list"]


# ----------------------------------------------------------------- shutdown


async def test_sigterm_with_running_jobs_and_open_follows(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    async with running_server(tmp_path, pki_dir, cgroup_name) as server:
        jobs = [await server.start_job("sh", "-c", "echo up; exec sleep 1000") for _ in range(3)]
        followers = []
        for job in jobs:
            proc = await trio.lowlevel.open_process(
                [*server.client_argv(), "logs", "-f", job],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            assert proc.stdout is not None
            seen = b""
            while b"up\n" not in seen:
                seen += await proc.stdout.receive_some()
            followers.append(proc)
        pids = pids_in(cgroup_name)
        assert len(pids) >= 3
        server.proc.send_signal(signal.SIGTERM)
        assert await server.proc.wait() == 0
        for proc in followers:
            rc = await proc.wait()
            assert proc.stderr is not None
            err = await proc.stderr.receive_some()
            # The follow ended with a status, not a hang: UNAVAILABLE (1), or the job's end
            # (stopped by the shutdown: 128 + SIGTERM, as `wait` exits).
            assert rc in (1, 128 + signal.SIGTERM), (rc, err)
            assert b"Traceback" not in err
        assert not [p for p in pids if alive(p)]
        assert not [p for p in jobd_cgroups() if p.name == cgroup_name]
    assert b"stopped" in server.log


async def test_sigkill_then_restart_reaps(tmp_path: Path, pki_dir: Pki, cgroup_name: str) -> None:
    """After a crash (SIGKILL) the next server kills what the old one's jobs left running."""
    async with running_server(tmp_path, pki_dir, cgroup_name) as first:
        job = await first.start_job("sh", "-c", "setsid sleep 1000 & exec sleep 1000")
        pids = pids_in(cgroup_name, jobs=[job])
        assert len(pids) >= 2
        first.crashed_on_purpose = True
        first.proc.kill()
        await first.proc.wait()
        assert all(alive(p) for p in pids)  # the crash left them running
    # The job's leaves, and the spare leaves of the idle shims (the pool was full when the
    # server began serving; the job took one of them).
    left = [p for tree in jobd_cgroups() if tree.name == cgroup_name
            for p in (tree / "jobs").iterdir() if p.is_dir()]
    assert job in {p.name for p in left} and len({p.name for p in left}) >= 4
    async with running_server(tmp_path, pki_dir, cgroup_name) as second:
        assert not [p for p in pids if alive(p)]
        assert f"reaped 1 job cgroup(s) left by a previous jobd: {job}".encode() in second.log
        assert b"idle spare leaf(s) of a previous jobd" in second.log
        assert not [p for p in left if p.exists()]
        assert (await second.client("list", check=True)).rc == 0


async def test_serve_refuses_bad_setup(tmp_path: Path, pki_dir: Pki) -> None:
    base = [
        "serve", "--listen", "127.0.0.1:0", "--cert", str(pki_dir.dir / "server.pem"),
        "--key", str(pki_dir.dir / "server.key"), "--data-dir", str(tmp_path / "d"),
        *uid_flags(tmp_path),
    ]


    missing = await trio.run_process(
        [JOBD, *base, "--client-ca", str(tmp_path / "nope.pem")],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert missing.returncode == 2 and b"Traceback" not in missing.stderr
    assert b"nope.pem" in missing.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad = await trio.run_process(
        [JOBD, *base, "--client-ca", str(garbage)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert bad.returncode == 1 and b"Traceback" not in bad.stderr
    assert b"cannot load the TLS files" in bad.stderr
    usage = await trio.run_process(
        [JOBD, "serve"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert usage.returncode == 2 and b"Usage:" in usage.stderr


async def test_second_server_refused_without_harm(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    """Same port: a clear error. Same cgroup tree on another port: refused too, and the
    first server's jobs keep running (the second must not reap them as stale)."""
    async with running_server(tmp_path, pki_dir, cgroup_name) as first:
        job = await first.start_job("sleep", "1000")
        base = [JOBD, "serve", "--cert", str(pki_dir.dir / "server.pem"), "--key",
                str(pki_dir.dir / "server.key"), "--client-ca", str(pki_dir.dir / "ca.pem"),
                "--data-dir", str(tmp_path / "second"), *uid_flags(tmp_path / "second")]
        same_port = await trio.run_process(
            [*base, "--listen", first.address, "--cgroup-name", cgroup_name + "-2"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        assert same_port.returncode == 1
        assert f"cannot listen on {first.address}".encode() in same_port.stderr
        same_tree = await trio.run_process(
            [*base, "--listen", "127.0.0.1:0", "--cgroup-name", cgroup_name],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        assert same_tree.returncode == 1
        assert b"another jobd is running" in same_tree.stderr
        assert (await first.client("status", job, check=True)).stdout == b"running\n"

