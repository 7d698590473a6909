"""Helpers for end-to-end tests: a real `jobd serve` process with its own PKI, and the real
`jobd-client` binary pointed at it."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from jobd import pki

from .conftest import unique_uid_range

BIN = Path(sys.executable).parent
JOBD, CLIENT = str(BIN / "jobd"), str(BIN / "jobd-client")
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class Pki:
    """certs/ as `just certs` makes it, plus certificates that must be refused."""

    dir: Path

    @classmethod
    def make(cls, directory: Path) -> Pki:
        pki.write_dev_pki(directory)
        ca = pki.load_issued(directory / "ca.pem", directory / "ca.key")
        now = dt.datetime.now(dt.UTC)
        pki.issue_cert(
            ca, "alice", ("user",), not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ).write(directory / "expired.pem", directory / "expired.key")
        pki.issue_cert(
            ca, "alice", ("user",), not_before=now + dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=30),
        ).write(directory / "future.pem", directory / "future.key")
        pki.issue_cert(ca, "", ("admin",)).write(directory / "nocn.pem", directory / "nocn.key")
        other = pki.make_ca("evil CA")
        other.write(directory / "evil-ca.pem", directory / "evil-ca.key")
        pki.issue_cert(other, "admin", ("admin",)).write(
            directory / "evil-admin.pem", directory / "evil-admin.key"
        )
        return cls(directory)

    def pair(self, name: str) -> tuple[str, str]:
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")


@dataclass
class Result:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass
class Server:
    port: int
    pki: Pki
    proc: trio.Process
    log: bytearray = field(default_factory=bytearray)
    crashed_on_purpose: bool = False  # a test SIGKILLed it: no clean exit expected

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_argv(self, user: str = "alice") -> list[str]:
        cert, key = self.pki.pair(user)
        return [CLIENT, "--server", self.address, "--ca", str(self.pki.dir / "ca.pem"),
                "--cert", cert, "--key", key]

    async def client(
        self, *args: str, user: str = "alice", check: bool = False, stdin: bytes | None = None
    ) -> Result:
        """The client with stdin /dev/null (a pipe draws run's warning), or these bytes."""
        done = await trio.run_process(
            [*self.client_argv(user), *args],
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            capture_stdout=True, capture_stderr=True, check=False,
        )
        result = Result(done.returncode, done.stdout, done.stderr)
        if check:
            assert result.rc == 0, result
        return result

    async def start_job(self, *command: str, user: str = "alice") -> str:
        result = await self.client("start", "--", *command, user=user, check=True)
        return result.stdout.decode().strip()


async def _read_log(stream: trio.abc.ReceiveStream, log: bytearray, port: trio.Event) -> None:
    async for data in stream:
        log.extend(data)
        sys.stderr.buffer.write(data)  # shown by pytest when a test fails
        if not port.is_set() and LISTENING.search(log):
            port.set()
    port.set()


@asynccontextmanager
async def running_server(
    tmp: Path, pki_: Pki, cgroup_name: str, *extra: str
) -> AsyncIterator[Server]:
    """`jobd serve` on 127.0.0.1, a free port; stopped with SIGTERM at the end, which must
    make it exit 0."""
    argv = [JOBD, "serve", "--listen", "127.0.0.1:0", "--cert", str(pki_.dir / "server.pem"),
            "--key", str(pki_.dir / "server.key"), "--client-ca", str(pki_.dir / "ca.pem"),
            "--data-dir", str(tmp / "data"), "--cgroup-name", cgroup_name,
            *uid_flags(tmp), *extra]
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        server = Server(0, pki_, proc)
        ready = trio.Event()
        nursery.start_soon(_read_log, proc.stderr, server.log, ready)
        try:
            await ready.wait()
            match = LISTENING.search(server.log)
            assert match, f"jobd did not start: {server.log.decode(errors='replace')}"
            server.port = int(match.group(1))
            yield server
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(30):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    if not server.crashed_on_purpose:
        assert proc.returncode == 0, server.log.decode(errors="replace")


def uid_flags(tmp: Path) -> list[str]:
    """A job uid range and registry of this server's own, so that parallel test suites'
    servers never collide (a later --job-uids in a test's own flags wins)."""
    first, last = unique_uid_range()
    return ["--job-uids", f"{first}-{last}", "--uid-registry", str(tmp / "uid-ranges")]


def env_without_jobd() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBD_")}


PF_EXITING = 0x4


def alive(pid: int) -> bool:
    """Running. A zombie is dead for our purposes (only its parent's reaping is missing), and
    so is a process inside exit(): a killed job's PID 1 stays there, past its cgroup, until
    the kernel has released the rest of its namespace (PF_EXITING, /proc/PID/stat field 9)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):  # gone (ESRCH: while read)
        return False
    return fields[0] != "Z" and not int(fields[6]) & PF_EXITING


def pids_in(cgroup_name: str, jobs: Collection[str] | None = None) -> list[int]:
    """Live processes in any leaf of the tree `cgroup_name` (the jobs', and the spare leaves
    of the server's idle shims), or only in the leaves of `jobs` (ids)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "cgroup").read_text()
                if jobs is None:
                    inside = f"/{cgroup_name}/jobs/" in text
                else:
                    inside = any(f"/{cgroup_name}/jobs/{job}\n" in text for job in jobs)
                if inside and alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def tcp_sockets(pid: int | str = "self") -> list[list[str]]:
    """The /proc/net/tcp{,6} rows, split into fields, of the sockets process `pid` holds
    (fields[1] local, [2] remote address, [3] state, all hex)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            rows += [fields for line in lines if (fields := line.split())[9] in inodes]
    return rows



def host_pids(job_id: str) -> dict[int, int]:
    """The job's processes, as {pid inside the job's PID namespace: pid on the host} (a job
    sees, and prints, only the former)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"/jobs/{job_id}" not in (entry / "cgroup").read_text():
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            ns_pids = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            levels = ns_pids.split()[1:]
            if len(levels) > 1:  # the job's shim itself lives outside the namespace
                out[int(levels[-1])] = int(entry.name)
    return out


def host_pid(job_id: str, ns_pid: int) -> int:
    return host_pids(job_id)[ns_pid]


def in_namespace(ns: str) -> list[int]:
    """Host pids of the live processes in the namespace a job named by printing
    `readlink /proc/self/ns/pid` (e.g. "pid:[4026532301]")."""
    kind = ns.split(":", 1)[0]
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / kind) == ns and alive(int(entry.name)):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out
