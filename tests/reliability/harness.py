"""What the reliability suite shares: the CI/soak scale, a real `jobd serve` process driven
from synchronous code (hypothesis tests, grpcio), and the proofs that nothing was left."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc

from ..conftest import SESSION_NAMES, TEST_CGROUP_PREFIX, unique_uid_range
from ..e2e import JOBD, LISTENING, Pki, pids_in, tcp_sockets

SOAK = os.environ.get("JOBD_SOAK") == "1"
GiB = 1 << 30
MiB = 1 << 20

# The status codes a client may ever cause; INTERNAL and UNKNOWN never.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def scale(ci: int, soak: int) -> int:
    """A size or count: `ci` in the CI run, `soak` under JOBD_SOAK=1."""
    return soak if SOAK else ci


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition that has no notification (another process's /proc entries), bounded:
    a regression fails instead of hanging. Not a timing threshold: any speed passes."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def cgroup_dirs(cgroup_name: str) -> list[Path]:
    """Every directory of the tree `cgroup_name` in any hierarchy."""
    # os.walk, not rglob: other suites' cgroups come and go while it looks (rglob raised
    # FileNotFoundError for a directory removed under it).
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup", onerror=lambda exc: None):
        found += [Path(top) / d for d in dirs if d == cgroup_name]
    return found


def new_cgroup_name() -> str:
    """A fresh tree name, registered for the suite-end leak check."""
    name = TEST_CGROUP_PREFIX + uuid.uuid4().hex[:12]
    SESSION_NAMES.add(name)
    return name


@dataclass
class ServerProcess:
    """A real `jobd serve` run from synchronous code; its log is collected by a thread."""

    pki: Pki
    data_dir: Path
    cgroup_name: str
    extra: tuple[str, ...] = ()
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: bytearray = field(default_factory=bytearray)
    _reader: threading.Thread | None = None
    # Kept across restarts of this server; of its own, so parallel suites never collide.
    uids: tuple[int, int] = field(default_factory=unique_uid_range)
    prefix: tuple[str, ...] = ()  # e.g. ("prlimit", "--nofile=128")

    def start(self) -> ServerProcess:
        argv = [*self.prefix, JOBD, "serve", "--listen", "127.0.0.1:0",
                "--cert", str(self.pki.dir / "server.pem"),
                "--key", str(self.pki.dir / "server.key"),
                "--client-ca", str(self.pki.dir / "ca.pem"),
                "--data-dir", str(self.data_dir), "--cgroup-name", self.cgroup_name,
                "--job-uids", f"{self.uids[0]}-{self.uids[1]}",
                "--uid-registry", str(self.data_dir.parent / "uid-ranges"),
                *self.extra]
        self.log = bytearray()
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(ready,), daemon=True)
        self._reader.start()
        assert ready.wait(60), "jobd did not start in 60 s"
        match = LISTENING.search(self.log)
        assert match, f"jobd did not start: {self.text}"
        self.port = int(match.group(1))
        return self

    def _read_log(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.extend(line)
            if not ready.is_set() and LISTENING.search(self.log):
                ready.set()
        ready.set()

    @property
    def text(self) -> str:
        return self.log.decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss(self) -> int:
        """The server's resident memory, bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def connections(self) -> int:
        """TCP connections the server holds (in any state but LISTEN)."""
        return len([s for s in socket_states(self.pid) if not s.startswith("0A ")])

    def wait_connections_closed(self, baseline: int) -> None:
        """Every connection the test opened is gone on the server's side too: no connection
        task, call task or socket outlived its client."""
        try:
            wait_until(lambda: self.connections() <= baseline,
                       "the server to close every connection")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {socket_states(self.pid)}") from None

    def check_healthy(self) -> None:
        """Alive, answering, and nothing logged that means a bug."""
        assert self.proc is not None and self.proc.poll() is None, self.text
        with channel(self, "admin") as (_, stub):
            stub.List(pb.ListRequest(), timeout=30)
        for bad in ("Traceback", "internal error", " ERROR ", "Got exception"):
            at = self.text.find(bad)
            assert at < 0, f"{bad!r} in the server log:\n{self.text[max(at - 3000, 0):at + 3000]}"

    def terminate(self) -> int:
        """SIGTERM, and the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._join()
        return rc

    def crash(self) -> None:
        """SIGKILL: as a power loss, from the jobs' point of view."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._join()

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(30)
            self._reader = None
        assert self.proc is not None and self.proc.stderr is not None
        self.proc.stderr.close()


@contextmanager
def serving(pki: Pki, tmp: Path, *extra: str, cgroup_name: str | None = None,
            prefix: tuple[str, ...] = ()) -> Iterator[ServerProcess]:
    """A server for the block; SIGTERM at the end must exit 0 and leave nothing at all."""
    name = cgroup_name or new_cgroup_name()
    server = ServerProcess(pki, tmp / "data", name, extra, prefix=prefix).start()
    try:
        yield server
    finally:
        rc = server.terminate()
    assert rc == 0, server.text
    assert_nothing_left(server)


def assert_nothing_left(server: ServerProcess) -> None:
    assert pids_in(server.cgroup_name) == []
    assert cgroup_dirs(server.cgroup_name) == []
    # Output is kept with its job's record (--keep-finished): no file of a job not kept.
    output = server.data_dir / "output"
    files = {p.name.split(".")[0] for p in output.iterdir()} if output.exists() else set()
    assert files <= kept_ids(server.data_dir), files - kept_ids(server.data_dir)


def kept_ids(data_dir: Path) -> set[str]:
    """Ids of the jobs the server's store keeps (read with sqlite3 while it is stopped)."""
    path = data_dir / "jobs.sqlite3"
    if not path.exists():
        return set()
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}
    finally:
        db.close()


def credentials(pki: Pki, user: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki.dir / "ca.pem").read_bytes(),
        private_key=(pki.dir / f"{user}.key").read_bytes(),
        certificate_chain=(pki.dir / f"{user}.pem").read_bytes(),
    )


# One connection per channel (grpcio would otherwise share subchannels between them), and no
# message-size cap on what the server sends.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]


@contextmanager
def channel(server: ServerProcess, user: str = "alice"
            ) -> Iterator[tuple[grpc.Channel, jobd_pb2_grpc.JobServiceStub]]:
    ch = grpc.secure_channel(server.address, credentials(server.pki, user), CHANNEL_OPTIONS)
    try:
        yield ch, jobd_pb2_grpc.JobServiceStub(ch)
    finally:
        ch.close()


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def follow(stub: jobd_pb2_grpc.JobServiceStub, job_id: str, offset: int = 0
           ) -> tuple[dict[int, Any], int]:
    """Follow a job to its end: sha256 per stream, and the bytes received. Fails if an offset
    is not exactly where the previous chunk ended (nothing lost, nothing doubled)."""
    sums = {pb.STDOUT: hashlib.sha256(), pb.STDERR: hashlib.sha256()}
    at = offset
    for chunk in stub.Output(pb.OutputRequest(id=job_id, follow=True, offset=offset)):
        assert chunk.offset == at, (job_id, chunk.offset, at)
        sums[chunk.stream].update(chunk.data)
        at += len(chunk.data)
    return sums, at - offset


def raw_tls(server: ServerProcess, user: str = "alice") -> socket.socket:
    """A TLS connection with ALPN h2 and the user's certificate, handshake done."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.pki.dir / "ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(*server.pki.pair(user))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def socket_states(pid: int) -> list[str]:
    """TCP state (hex, /proc/net/tcp) and local:remote of each socket the process holds."""
    return [f"{f[3]} {f[1]}->{f[2]}" for f in tcp_sockets(pid)]
