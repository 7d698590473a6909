"""Footprint of ended jobs (a benchmark, not a test): N `true` jobs through one real server
started under `prlimit --nofile=1024`; it must stay up with fds well under 200; reports RSS
growth per ended job and Status / List page latency with N jobs kept.

    sudo .venv/bin/python tools/footprint.py --jobs 100000 --port 19100

Needs root (cgroups) and the port free. Writes only under a temp dir, which it removes.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from jobd import pki
from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc

JOBD = str(Path(sys.executable).parent / "jobd")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stub(certs: Path, port: int, user: str) -> jobd_pb2_grpc.JobServiceStub:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{user}.key").read_bytes(),
        certificate_chain=(certs / f"{user}.pem").read_bytes(),
    )
    ch = grpc.secure_channel(f"localhost:{port}", creds, [("grpc.max_receive_message_length", -1)])
    return jobd_pb2_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) * 1e3:.2f} ms, p99 {xs[int(len(xs) * 0.99)] * 1e3:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=19100)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/store"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="jobd-footprint-", dir=args.workdir))
    certs = tmp / "certs"
    certs.mkdir()
    pki.write_dev_pki(certs)
    ca = pki.load_issued(certs / "ca.pem", certs / "ca.key")
    pki.issue_cert(ca, "bob", ("user",)).write(certs / "bob.pem", certs / "bob.key")
    first = 2_000_000_000 + secrets.randbelow(100_000) * 1000
    name = f"jobd-footprint-{secrets.token_hex(4)}"
    argv = [
        "prlimit", "--nofile=1024", JOBD, "serve", "--listen", f"127.0.0.1:{args.port}",
        "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
        "--client-ca", str(certs / "ca.pem"), "--data-dir", str(tmp / "data"),
        "--cgroup-name", name, "--job-uids", f"{first}-{first + 999}",
        "--uid-registry", str(tmp / "uid-ranges"), "--keep-finished", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    log = open(tmp / "jobd.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(argv, stderr=log)
    try:
        alice = _stub(certs, args.port, "alice")
        bob = _stub(certs, args.port, "bob")
        deadline = time.monotonic() + 30
        while True:
            try:
                kept = bob.Start(pb.StartRequest(command=["true"]), timeout=10)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        bob.Wait(pb.JobRequest(id=kept.id), timeout=10)
        pid = server.pid
        max_fds = [_fds(pid)]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                max_fds.append(_fds(pid))

        def one(_: int) -> None:
            job = alice.Start(pb.StartRequest(command=["true"]), timeout=60)
            alice.Wait(pb.JobRequest(id=job.id), timeout=60)

        warm = min(1000, args.jobs // 10)
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(warm)))
            rss0, fds0 = _status(pid, "VmRSS"), _fds(pid)
            sampler = threading.Thread(target=sample)
            sampler.start()
            began = time.monotonic()
            list(pool.map(one, range(args.jobs - warm)))
            took = time.monotonic() - began
            done.set()
            sampler.join()
        rss1, fds1 = _status(pid, "VmRSS"), _fds(pid)
        status_t, list_t, own_t = [], [], []
        for _ in range(1000):
            t = time.perf_counter()
            bob.Status(pb.JobRequest(id=kept.id), timeout=10)
            status_t.append(time.perf_counter() - t)
        for _ in range(100):
            t = time.perf_counter()
            page = alice.List(pb.ListRequest(page_size=100), timeout=10)
            list_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            mine = bob.List(pb.ListRequest(), timeout=10)
            own_t.append(time.perf_counter() - t)
        assert len(page.jobs) == 100 and page.next_page_token and len(mine.jobs) == 1
        print(f"jobs: {args.jobs} `true` through one server (prlimit --nofile=1024), "
              f"{args.concurrency} clients; {(args.jobs - warm) / took:.0f} jobs/s")
        print(f"server up: {server.poll() is None}; fds: {fds0} after {warm} jobs, {fds1} at "
              f"the end, at most {max(max_fds)} during the run")
        print(f"RSS: {rss0 / 2**20:.1f} MiB after {warm} jobs, {rss1 / 2**20:.1f} MiB at the "
              f"end: {(rss1 - rss0) / (args.jobs - warm):.0f} bytes per ended job")
        print(f"Status of bob's 1 kept job: {_ms(status_t)}")
        print(f"List page of 100 (alice, {args.jobs} kept): {_ms(list_t)}")
        print(f"List of bob's 1 job among {args.jobs + 1}: {_ms(own_t)}")
        return 0 if server.poll() is None and max(max_fds) < 200 else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = server.wait()
        log.close()
        if rc != 0:
            print(f"jobd exited {rc}: {(tmp / 'jobd.log').read_text()[-3000:]}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
