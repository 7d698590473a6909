"""Hostile clients against a real `jobd serve` (issue 9): a user with a valid certificate, or
anyone without one, must not be able to freeze the server, exhaust its memory, descriptors
or job slots, forge its audit log, or learn about other users' jobs. One test per finding;
each failed before its fix. Counts are sized for CI; `just soak` (JOBD_SOAK=1) runs them at
full size. Figures are printed with -s and kept in docs/RELIABILITY.md: no timing threshold
is asserted anywhere, only resource bounds and outcomes."""

from __future__ import annotations

import gzip
import hashlib
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobd.v1 import jobd_pb2 as pb

from ..e2e import JOBD, Pki
from .harness import (
    MiB,
    ServerProcess,
    channel,
    code_of,
    follow,
    scale,
    serving,
    wait_until,
)
from .rawh2 import RawH2, grpc_message, server_sockets_read_everything, silent_tcp, status_of

pytestmark = pytest.mark.cgroups
TIMEOUT = 60


def peak_rss(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def digests(sums: dict[int, Any]) -> dict[int, str]:
    return {stream: h.hexdigest() for stream, h in sums.items()}


def legit_call(server: ServerProcess, user: str = "alice") -> float:
    """A fresh connection (its own TLS handshake) and a List: the seconds it took."""
    began = time.monotonic()
    with channel(server, user) as (_, stub):
        stub.List(pb.ListRequest(), timeout=TIMEOUT, wait_for_ready=True)
    return time.monotonic() - began


# ----------------------------------------------------------------- 3. unread streams


def test_unread_output_streams_cost_bounded_memory(hostile_pki: Pki, tmp_path: Path) -> None:
    """Finding 3: 10,000 Output streams (100 connections x 100) opened and never read cost
    1.94 GB. Half the connections grant the default windows and never acknowledge data,
    half grant 2 GiB windows and never read the socket at all. Bound: 256 MiB for 10,000
    streams (CI: 1,000 streams, the same per-stream share plus 32 MiB). A reader that does
    read meanwhile gets all of a job's output, sha256 equal."""
    connections = scale(10, 100)
    streams = connections * 100
    flags = ("--max-calls-per-user", str(streams + 100),
             "--max-connections-per-user", str(connections + 10))
    with serving(hostile_pki, tmp_path, *flags) as server:
        with channel(server, "bob") as (_, bob), channel(server, "alice") as (_, alice):
            big = bob.Start(pb.StartRequest(command=["head", "-c", str(4 * MiB), "/dev/zero"]),
                            timeout=TIMEOUT)
            follow(bob, big.id)
            size = scale(32, 256) * MiB
            legit = alice.Start(pb.StartRequest(command=["head", "-c", str(size), "/dev/urandom"]),
                                timeout=TIMEOUT)
            expected = digests(follow(alice, legit.id)[0])
            before = peak_rss(server)
            request = pb.OutputRequest(id=big.id).SerializeToString()
            raws: list[RawH2] = []
            try:
                for i in range(connections):
                    reads = i % 2 == 0
                    raw = RawH2(server, "bob", window=None if reads else 2**31 - 1)
                    raws.append(raw)
                    for _ in range(100):
                        raw.request("Output", request, send=False)
                    raw.flush()
                    if reads:  # takes what the windows allow, acknowledges nothing
                        raw.until(lambda r=raw: all(  # type: ignore[misc]
                            a.headers for a in r.answers.values()), ack=False)
                wait_until(lambda: server_sockets_read_everything(server),
                           "the server to take in every request")
                assert legit_call(server) >= 0  # a new client is served meanwhile
                began = time.monotonic()
                sums, got = follow(alice, legit.id)
                seconds = time.monotonic() - began
                assert digests(sums) == expected and got == size
                growth = peak_rss(server) - before
                bound = 256 * MiB * streams // 10_000 + 32 * MiB
                print(f"unread streams: {streams} on {connections} connections, server peak "
                      f"RSS grew {growth / MiB:.1f} MiB (bound {bound / MiB:.0f}); a reader "
                      f"meanwhile: {size / MiB / seconds:.0f} MiB/s")
                assert growth < bound, f"{growth / MiB:.1f} MiB for {streams} unread streams"
            finally:
                for raw in raws:
                    raw.close()
            server.wait_connections_closed(2)
            server.check_healthy()
