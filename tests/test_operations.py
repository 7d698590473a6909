"""What an operator relies on besides the API: JSON logs, systemd's readiness protocol against
a real socket, --version, and the unit file checked by systemd itself."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import jobd
from jobd.server import JsonFormatter
from jobd.server._sdnotify import notify

from .e2e import JOBD, Pki, alive, running_server, uid_flags

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("certs"))


# ----------------------------------------------------------------- logs


@pytest.mark.cgroups
async def test_json_logs_one_object_per_line(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    async with running_server(tmp_path, pki_dir, cgroup_name, "--log-format", "json") as server:
        job = await server.start_job("sh", "-c", "exit 3")
        await server.client("status", job)
        await server.client("status", str(uuid.uuid4()), user="bob")
    lines = server.log.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "event", "message"} <= set(record), record
        when = dt.datetime.fromisoformat(record["time"])
        assert record["time"].endswith("Z") and when.utcoffset() == dt.timedelta(0)
    rpcs = [r for r in records if r["event"] == "rpc"]
    start = next(r for r in rpcs if r["method"] == "Start")
    assert start["user"] == "alice" and start["job"] == job and start["code"] == "OK"
    assert isinstance(start["duration_ms"], float) and start["duration_ms"] >= 0
    missing = next(r for r in rpcs if r["user"] == "bob")
    assert missing["method"] == "Status" and missing["code"] == "NOT_FOUND"
    assert any(r["message"].startswith("listening on") for r in records)
    end = next(r for r in records if r["event"] == "job-end" and r["job"] == job)
    assert end["state"] == "EXITED" and end["reason"] == "EXIT" and end["exit_code"] == 3
    assert end["user"] == "alice" and end["duration_s"] >= 0
    assert start["command"] == ["sh", "-c", "exit 3"]


def test_json_formatter_escapes_what_a_client_sends() -> None:
    """A value with newlines, quotes or control characters stays inside its one line."""
    record = logging.LogRecord("jobd.audit", logging.INFO, "", 0, "rpc %s", ("x",), None)
    record.audit_event = "rpc"
    record.audit_fields = {"user": 'eve"\n{"level":"error"}\x00\u2028', "level": "forged"}
    record.job = Path("/not/json")  # not JSON-serializable: written as its str()
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\x00" not in line
    parsed = json.loads(line)
    assert parsed["user"] == 'eve"\n{"level":"error"}\x00\u2028'
    assert parsed["job"] == "/not/json" and parsed["level"] == "info"
    assert parsed["event"] == "rpc" and parsed["message"] == "rpc x"
    assert "audit_fields" not in parsed and "audit_event" not in parsed


# ----------------------------------------------------------------- sd_notify


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


async def _datagrams(sock: socket.socket, count: int) -> list[str]:
    trio_sock = trio.socket.from_stdlib_socket(sock)
    return [(await trio_sock.recv(4096)).decode() for _ in range(count)]


@pytest.mark.cgroups
async def test_serve_notifies_systemd_ready_then_stopping(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with _notify_socket(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        async with running_server(tmp_path, pki_dir, cgroup_name) as server:
            [ready] = await _datagrams(sock, 1)
            assert ready.splitlines()[0] == "READY=1"
            assert f"serving on 127.0.0.1:{server.port}" in ready
            server.proc.send_signal(signal.SIGTERM)
            [stopping] = await _datagrams(sock, 1)
            assert stopping.splitlines()[0] == "STOPPING=1"


# The server as `jobd serve` runs it, but `run_server` a stand-in that reports the collector's
# permanent generation before and after the command has seen it serving.
_FREEZE_PROBE = """
import gc, sys, trio, trio.testing, jobd.cli as cli
async def serving(config, *, task_status=trio.TASK_STATUS_IGNORED):
    before = gc.get_freeze_count()
    task_status.started()
    await trio.testing.wait_all_tasks_blocked()
    print(before, gc.get_freeze_count())
cli.run_server = serving
sys.argv = ["jobd", "serve", *sys.argv[1:]]
cli.cli()
"""


def test_serve_freezes_the_startup_heap_once_serving(tmp_path: Path, pki_dir: Pki) -> None:
    """`jobd serve` moves what startup made out of the collector's view once the server is up
    (a full collection walked it all: a ~22 ms pause per ~5,000 unary calls), not before."""
    certs = pki_dir.dir
    argv = [
        "--listen", "127.0.0.1:0", "--cert", str(certs / "server.pem"),
        "--key", str(certs / "server.key"), "--client-ca", str(certs / "ca.pem"),
        "--data-dir", str(tmp_path / "data"), "--no-cgroups",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _FREEZE_PROBE, *argv],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    before, after = map(int, out.stdout.split())
    assert before == 0
    assert after > 10_000  # the modules, descriptors and the server's objects


def test_notify_abstract_socket_and_unset() -> None:
    name = f"jobd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind("\0" + name)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"
    assert not notify("READY=1", environ={})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"})
    # Nobody listening: logged, never raised.
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/jobd-notify"})


# ----------------------------------------------------------------- version, unit file


def test_version_from_one_place() -> None:
    out = subprocess.run([JOBD, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"jobd {jobd.__version__}"
    from importlib.metadata import version

    assert version("jobd") == jobd.__version__


def _systemd_analyze() -> str | None:
    found = shutil.which("systemd-analyze")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("systemd-analyze is missing in CI: tools/setup.sh installs systemd")
    return found


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (tools/setup.sh installs systemd)")
    unit = (ROOT / "deploy" / "jobd.service").read_text()
    for key in ("Type=notify", "Delegate=yes", "KillMode=mixed", "StateDirectory=jobd",
                "LimitNOFILE="):
        assert key in unit, key
    # verify checks that ExecStart exists: point it at this checkout's jobd.
    unit = unit.replace("/usr/local/bin/jobd", JOBD)
    rc, complaints = _verify(analyze, tmp_path / "good", unit)
    assert rc == 0 and not complaints, complaints
    # The check can fail: verify exits 0 on a bad setting, but it names the line.
    rc, complaints = _verify(analyze, tmp_path / "bad", unit.replace("=mixed", "=bogus"))
    assert any("KillMode" in line or "kill mode" in line for line in complaints), complaints


def _verify(analyze: str, directory: Path, unit: str) -> tuple[int, list[str]]:
    directory.mkdir()
    copy = directory / "jobd.service"
    copy.write_text(unit)
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False
    )
    # Only lines about our unit matter: verify also reports on the host's own units.
    lines = (out.stdout + out.stderr).splitlines()
    return out.returncode, [line for line in lines if "jobd.service" in line]


# ----------------------------------------------------------------- just serve


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            out.append((int(child), cmdline.decode(errors="replace")))
    return out


@pytest.mark.cgroups
async def test_just_serve_execs_jobd_so_a_signal_to_it_stops_jobd(
    tmp_path: Path, cgroup_name: str
) -> None:
    just = Path(JOBD).parent / "just"
    argv = [str(just), "--justfile", str(ROOT / "justfile"), "--working-directory",
            str(tmp_path), "serve", "--listen", "127.0.0.1:0", "--metrics-listen",
            "127.0.0.1:0", "--cgroup-name", cgroup_name, *uid_flags(tmp_path)]  # fmt: skip
    log = bytearray()
    # `just certs` registers the client context dev: in a config dir of this test's own.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    try:
        while b"listening on" not in log:
            data = await proc.stderr.receive_some(65536)
            assert data, log.decode(errors="replace")
            log += data
        # The recipe's shell replaced itself with jobd: jobd is just's own child.
        [(child, cmdline)] = _children(proc.pid)
        assert " serve --listen 127.0.0.1:9090" in cmdline and cmdline.split()[1].endswith(
            "/jobd"
        ), cmdline
        proc.send_signal(signal.SIGTERM)  # `kill <pid of just>`
        while data := await proc.stderr.receive_some(65536):
            log += data
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"SIGTERM: shutting down" in log and b"INFO jobd: stopped" in log, log
    assert not alive(child)
    assert (tmp_path / "certs" / "ca.pem").is_file()  # `just certs` ran first
    config = (tmp_path / "config" / "jobd" / "config.toml").read_text()
    assert f'ca = "{tmp_path}/certs/ca.pem"' in config, config


@pytest.mark.cgroups
async def test_metrics_port_taken_or_malformed_is_a_clear_error(
    tmp_path: Path, pki_dir: Pki, cgroup_name: str
) -> None:
    base = [JOBD, "serve", "--listen", "127.0.0.1:0", "--cert", str(pki_dir.dir / "server.pem"),
            "--key", str(pki_dir.dir / "server.key"), "--client-ca", str(pki_dir.dir / "ca.pem"),
            "--data-dir", str(tmp_path / "data"), "--cgroup-name", cgroup_name,
            *uid_flags(tmp_path)]  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await trio.run_process(
            [*base, "--metrics-listen", f"127.0.0.1:{port}"],
            capture_stderr=True, check=False,
        )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-listen)" in err, err
    assert "Traceback" not in err
    bad = await trio.run_process(
        [*base, "--metrics-listen", "9091"], capture_stderr=True, check=False
    )
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr.decode(), bad.stderr
