"""Load against a real `jobd serve`: JOBS jobs started concurrently by three users, FOLLOWERS
of them live-followed at once. Every follower gets every byte of its job, in order, exactly
once (sha256 per stream, contiguous offsets); every job ends in the state it should; a later
re-read of every job's output matches too."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from jobd.v1 import jobd_pb2 as pb

from ..e2e import Pki
from .harness import channel, scale, serving

pytestmark = pytest.mark.cgroups

USERS = ("alice", "bob", "admin")
TIMEOUT = 120


def seq(n: int) -> bytes:
    return "".join(f"{i}\n" for i in range(1, n + 1)).encode()


class Plan:
    """Job i: what it runs, what it must print, how it must end."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.user = USERS[i % len(USERS)]
        self.lines = 1000 + (i * 37) % 20000  # 4 KB to 110 KB of stdout
        self.err_lines = i % 50
        self.kind = ("exit", "killed", "stop", "exit0", "exit0")[i % 5]
        self.code = i % 7 if self.kind == "exit" else 0
        tail = {
            "exit": f"exit {self.code}",
            "killed": "kill -9 $$",
            "stop": "exec sleep 1000",
            "exit0": "exit 0",
        }[self.kind]
        self.command = ["sh", "-c", f"seq 1 {self.lines}; seq 1 {self.err_lines} >&2; {tail}"]
        self.stdout = hashlib.sha256(seq(self.lines)).hexdigest()
        self.stderr = hashlib.sha256(seq(self.err_lines)).hexdigest()
        self.size = len(seq(self.lines)) + len(seq(self.err_lines))
        self.id = ""

    def check_final(self, job: pb.Job) -> None:
        expected = {
            "exit": (pb.EXITED, self.code, 0),
            "exit0": (pb.EXITED, 0, 0),
            "killed": (pb.KILLED, 0, 9),
            "stop": (pb.STOPPED, 0, 15),
        }[self.kind]
        assert (job.state, job.exit_code, job.signal) == expected, (self.command, job)
        assert job.owner == self.user


def _follow_and_check(stub: Any, plan: Plan) -> int:
    """Follow from offset 0 to the end; a "stop" job is stopped once all its output is in."""
    sums = {pb.STDOUT: hashlib.sha256(), pb.STDERR: hashlib.sha256()}
    at = 0
    stopped = False
    for chunk in stub.Output(pb.OutputRequest(id=plan.id, follow=True), timeout=TIMEOUT):
        assert chunk.offset == at, (plan.id, chunk.offset, at)
        sums[chunk.stream].update(chunk.data)
        at += len(chunk.data)
        if plan.kind == "stop" and at == plan.size and not stopped:
            stopped = True
            stub.Stop(pb.StopRequest(id=plan.id), timeout=TIMEOUT)
    assert at == plan.size, (plan.command, at)
    assert sums[pb.STDOUT].hexdigest() == plan.stdout, plan.command
    assert sums[pb.STDERR].hexdigest() == plan.stderr, plan.command
    return at


def _reread(stub: Any, plan: Plan) -> int:
    data = {pb.STDOUT: hashlib.sha256(), pb.STDERR: hashlib.sha256()}
    at = 0
    for chunk in stub.Output(pb.OutputRequest(id=plan.id), timeout=TIMEOUT):
        assert chunk.offset == at
        data[chunk.stream].update(chunk.data)
        at += len(chunk.data)
    assert (data[pb.STDOUT].hexdigest(), data[pb.STDERR].hexdigest()) == (
        plan.stdout, plan.stderr)
    return at


def test_many_jobs_many_followers_nothing_lost(hostile_pki: Pki, tmp_path: Path) -> None:
    jobs, followers, rounds = scale(500, 1000), scale(100, 300), scale(1, 3)
    total_bytes = 0
    with serving(hostile_pki, tmp_path) as server:
        for _ in range(rounds):
            total_bytes += _round(server, jobs, followers)
        server.check_healthy()
    print(f"load: {rounds} round(s) of {jobs} jobs / {followers} followers, "
          f"{total_bytes} bytes verified")


def _round(server: Any, jobs: int, followers: int) -> int:
    plans = [Plan(i) for i in range(jobs)]
    followed = {p.i for p in plans[:: max(1, jobs // followers)][:followers]}
    # The unfollowed "stop" jobs are stopped once all their jobs' output is in (re-read).
    verified = 0
    lock = threading.Lock()
    with (
        channel(server, "alice") as (_, alice),
        channel(server, "bob") as (_, bob),
        channel(server, "admin") as (_, admin),
        ThreadPoolExecutor(followers + 8) as follow_pool,
        ThreadPoolExecutor(64) as start_pool,
    ):
        stubs = {"alice": alice, "bob": bob, "admin": admin}
        follows = []

        def start(plan: Plan) -> None:
            plan.id = stubs[plan.user].Start(
                pb.StartRequest(command=plan.command), timeout=TIMEOUT).id
            if plan.i in followed:  # follow at once, while it runs
                follows.append(follow_pool.submit(_follow_and_check, stubs[plan.user], plan))

        list(start_pool.map(start, plans))  # every Start in flight together (64 at a time)
        for future in follows:
            with lock:
                verified += future.result()
        assert len(follows) == followers
        for plan in plans:
            if plan.i not in followed:
                if plan.kind == "stop":
                    _wait_size(stubs[plan.user], plan)
                    stubs[plan.user].Stop(pb.StopRequest(id=plan.id), timeout=TIMEOUT)
                verified += _reread(stubs[plan.user], plan)
            plan.check_final(stubs[plan.user].Status(pb.JobRequest(id=plan.id), timeout=TIMEOUT))
        listed: set[str] = set()
        token = ""
        while True:  # pages of 1000, newest first
            page = admin.List(pb.ListRequest(page_size=1000, page_token=token), timeout=TIMEOUT)
            listed |= {j.id for j in page.jobs}
            if not (token := page.next_page_token):
                break
        assert {p.id for p in plans} <= listed
    return verified


def _wait_size(stub: Any, plan: Plan) -> None:
    """A running job's output is complete: follow until exactly its size has arrived."""
    at = 0
    stream = stub.Output(pb.OutputRequest(id=plan.id, follow=True), timeout=TIMEOUT)
    for chunk in stream:
        at += len(chunk.data)
        if at == plan.size:
            stream.cancel()
            return
