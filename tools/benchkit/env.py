"""What a benchmark case runs against: a real `jobd serve` (own cgroup name, temp data dir,
SIGTERM at the end and a check that nothing is left), the grpcio peer, and worker processes.

    async with open_jobd(workdir, certs) as jobd:            # a fresh server
        w = await Worker.start("stream", target=jobd.target, certs=certs, command=[...])
        await w.go(); result = await w.result()
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

BENCH = str(Path(__file__).resolve().parent.parent / "bench.py")
JOBD = str(Path(sys.executable).parent / "jobd")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


class BenchError(Exception):
    pass


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of all of a process's threads so far (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def _readline(stream: trio.abc.ReceiveStream, buf: bytearray) -> str:
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise BenchError(f"worker ended early; got {bytes(buf)[-2000:]!r}")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


class Worker:
    """One load-generating process (workers.py) running `kind`."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = bytearray()

    @classmethod
    async def start(cls, kind: str, **args: Any) -> Worker:
        proc = await trio.lowlevel.open_process(
            [sys.executable, BENCH, "--worker", kind, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        worker = cls(proc)
        try:
            await worker.expect("ready")
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = await _readline(self.proc.stdout, self._buf)
        if line != word:
            raise BenchError(f"worker said {line!r}, expected {word!r}")

    async def send(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")

    async def go(self, job_id: str = "") -> None:
        await self.send(f"go {job_id}".strip())

    async def result(self) -> Any:
        assert self.proc.stdout is not None
        try:
            line = await _readline(self.proc.stdout, self._buf)
        finally:
            await self.kill()
        if self.proc.returncode not in (0, None):
            raise BenchError(f"worker failed with {self.proc.returncode}")
        return json.loads(line)

    async def kill(self) -> None:
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with trio.move_on_after(30):
                    await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    await stream.aclose()


async def run_workers(
    kind: str, argsets: list[dict[str, Any]], *, before_go: Any = None
) -> list[Any]:
    """Start one worker per argument set, let them go together, collect every result.
    `before_go`, an async function returning a job id, runs once all are ready; the workers
    get its id with "go"."""
    workers: list[Worker] = []
    try:
        for args in argsets:
            workers.append(await Worker.start(kind, **args))
        job_id = await before_go() if before_go is not None else ""
        for w in workers:
            await w.go(job_id)
        results: list[Any] = [None] * len(workers)

        async def collect(i: int) -> None:
            results[i] = await workers[i].result()

        async with trio.open_nursery() as nursery:
            for i in range(len(workers)):
                nursery.start_soon(collect, i)
        return results
    finally:
        for w in workers:
            await w.kill()


@dataclass
class Jobd:
    proc: trio.Process
    port: int
    cgroup_name: str
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")


def _leftover_cgroups(name: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/**/{name}", recursive=True)


# A server's start-up takes 1-7 s here at load 12; one CI rehearsal saw it pass 30 s (not
# reproduced in 40 tries): wait longer, and say where it was stuck if it never listens.
STARTUP_TIMEOUT = 120.0


async def _stuck(pid: int) -> str:
    """Where a server that does not start is: its threads' Python stacks (py-spy), and each
    child's command and kernel wait channel."""
    spy = Path(sys.executable).with_name("py-spy")
    try:
        dump = await trio.run_process([str(spy), "dump", "--pid", str(pid)], capture_stdout=True,
                                      capture_stderr=True, check=False)
        text = dump.stdout.decode(errors="replace") + dump.stderr.decode(errors="replace")
    except OSError as exc:
        text = f"(py-spy: {exc})"
    return text + "\nchildren:\n" + _children(pid)


def _children(pid: int) -> str:
    lines = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            try:
                args = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                wchan = Path(f"/proc/{child}/wchan").read_text()
            except OSError:
                continue
            lines.append(f"  {child} {args.decode(errors='replace')[:200]} (in {wchan})")
    return "\n".join(lines)


@asynccontextmanager
async def open_jobd(workdir: Path, certs: Path, *extra: str) -> AsyncIterator[Jobd]:
    """A fresh `jobd serve` on 127.0.0.1 with its own cgroup tree and data dir; at the end
    SIGTERM, exit 0 expected, and no cgroup or file of it left behind."""
    name = f"jobd-bench-{secrets.token_hex(4)}"
    uids = 2_000_000_000 + secrets.randbelow(100_000) * 1000
    data = workdir / name
    log = workdir / f"{name}.log"
    argv = [
        JOBD, "serve", "--listen", "127.0.0.1:0",
        "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
        "--client-ca", str(certs / "ca.pem"), "--data-dir", str(data),
        "--cgroup-name", name, "--default-pids", "4096", "--default-memory", "1G",
        # A uid range and registry of its own: parallel benches and servers never collide.
        "--job-uids", f"{uids}-{uids + 999}", "--uid-registry", str(workdir / "uid-ranges"),
        # The full run's `seq` writes 1038 MiB: past the default 1G cap the oldest output is
        # dropped, and a follower that is behind skips it (fewer bytes than the baselines).
        "--max-job-output", "4G",
        *extra,
    ]  # fmt: skip
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await trio.lowlevel.open_process(argv, stdout=log_fd, stderr=log_fd)
    finally:
        os.close(log_fd)
    try:
        port = 0
        with trio.move_on_after(STARTUP_TIMEOUT):
            while not port:
                if proc.returncode is not None:
                    raise BenchError(f"jobd exited: {log.read_text()[-3000:]}")
                match = LISTENING.search(log.read_text(errors="replace"))
                if match:
                    port = int(match.group(1))
                else:
                    await trio.sleep(0.05)
        if not port:
            raise BenchError(
                f"jobd did not listen within {STARTUP_TIMEOUT:.0f} s; its log:\n"
                f"{log.read_text(errors='replace')[-3000:]}\n{await _stuck(proc.pid)}"
            )
        try:
            yield Jobd(proc, port, name, log)
        except BaseException:
            # Whatever went wrong, the server's own account of it is in its log.
            sys.stderr.write(f"jobd log ({log}):\n{log.read_text(errors='replace')[-5000:]}\n")
            raise
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(60):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            text = log.read_text(errors="replace")
            left = _leftover_cgroups(name)
            shutil.rmtree(data, ignore_errors=True)
            log.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise BenchError(f"jobd exited with {proc.returncode}: {text[-3000:]}")
    if left:
        raise BenchError(f"jobd left cgroups behind: {left}")


@dataclass
class Peer:
    proc: trio.Process
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def open_peer(certs: Path) -> AsyncIterator[Peer]:
    """The grpc.aio peer (peer.py) in its own process; ends when its stdin closes."""
    async with _open_peer_process([sys.executable, BENCH, "--peer", str(certs)]) as peer:
        yield peer


@asynccontextmanager
async def open_sync_peer(certs: Path, chunk: int = 1024 * 1024) -> AsyncIterator[Peer]:
    """The synchronous grpcio peer (syncpeer.py) sending output messages of up to `chunk`
    bytes; it makes its own cgroup tree, which must be gone once it has stopped."""
    name = f"jobd-bench-peer-{secrets.token_hex(4)}"
    argv = [sys.executable, BENCH, "--sync-peer", str(certs), str(chunk), name]
    async with _open_peer_process(argv) as peer:
        yield peer
    left = _leftover_cgroups(name)
    if left:
        raise BenchError(f"the sync peer left cgroups behind: {left}")


@asynccontextmanager
async def _open_peer_process(argv: list[str]) -> AsyncIterator[Peer]:
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            port = int(await _readline(proc.stdout, bytearray()))
        yield Peer(proc, port)
    finally:
        with trio.CancelScope(shield=True):
            if proc.stdin is not None:
                await proc.stdin.aclose()
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
