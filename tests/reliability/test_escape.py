"""Escape and abuse through a real `jobd serve`: daemons, process-group and session changes,
SIGTERM ignored, cgroup escapes, a fork bomb, a memory hog. The limits hold, stop kills every
process, and the server keeps answering. (tests/test_engine.py proves each mechanism alone:
setsid/double fork, leaving the cgroup by the root v2 procs file, the pids limit with 100
forks, OOM, kill after grace.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobd.v1 import jobd_pb2 as pb

from ..e2e import alive, pids_in
from .harness import ServerProcess, channel, follow, wait_until

pytestmark = pytest.mark.cgroups

TIMEOUT = 60


def _read_until(stub: Any, job_id: str, marker: bytes) -> bytes:
    seen = b""
    stream = stub.Output(pb.OutputRequest(id=job_id, follow=True), timeout=TIMEOUT)
    for chunk in stream:
        seen += chunk.data
        if marker in seen:
            stream.cancel()
            break
    return seen


def _job_pids(server: ServerProcess, job_id: str) -> list[int]:
    pids = []
    for p in pids_in(server.cgroup_name):
        try:
            if job_id in Path(f"/proc/{p}/cgroup").read_text():
                pids.append(p)
        except FileNotFoundError:
            pass  # it ended meanwhile
    return pids


def _gone(server: ServerProcess, job_id: str, pids: list[int]) -> None:
    assert [p for p in pids if alive(p)] == []
    assert [d for d in Path("/sys/fs/cgroup").glob(f"*/{server.cgroup_name}/jobs/{job_id}")] == []
    assert [d for d in Path("/sys/fs/cgroup").glob(f"*/*/*/{server.cgroup_name}/jobs/{job_id}")
            ] == []


NASTY = r"""
trap '' TERM
setsid sh -c 'trap "" TERM; exec sleep 1000' &
(sh -c 'trap "" TERM; sleep 1000 & exit 0' &)
python3 -c 'import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.setpgid(0, 0)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1000)
    os._exit(0)
time.sleep(1000)' &
nohup sleep 1000 >/dev/null 2>&1 &
echo ready
exec sleep 1000
"""


def test_daemons_group_changes_and_ignored_sigterm_all_die_on_stop(
    shared_server: ServerProcess,
) -> None:
    with channel(shared_server) as (_, alice):
        job = alice.Start(pb.StartRequest(command=["sh", "-c", NASTY]), timeout=TIMEOUT)
        _read_until(alice, job.id, b"ready")
        # Six of its own, plus its PID 1 (see jobd/engine/_shim.py).
        wait_until(lambda: len(_job_pids(shared_server, job.id)) >= 7, "every process to start")
        pids = _job_pids(shared_server, job.id)
        sessions = {Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[3]
                    for p in pids}
        assert len(sessions) >= 2  # some did leave the job's session
        final = alice.Stop(pb.StopRequest(id=job.id, grace={"nanos": 200_000_000}),
                           timeout=TIMEOUT)
        assert final.state == pb.STOPPED and final.signal == 9  # SIGTERM was ignored
        _gone(shared_server, job.id, pids)


ESCAPE = r"""
me=$(cat /proc/self/cgroup | sort | md5sum)
for f in $(find /sys/fs/cgroup -maxdepth 6 \( -name cgroup.procs -o -name tasks \
             -o -name cgroup.kill -o -name pids.max -o -name memory.max \
             -o -name memory.limit_in_bytes -o -name cgroup.subtree_control \) 2>/dev/null); do
  if (echo $$ > "$f") 2>/dev/null; then echo "WROTE $f"; fi
done
mkdir /sys/fs/cgroup/unified/mine 2>/dev/null && echo "MADE a cgroup"
cat /proc/self/cgroup | sort | md5sum | grep -q "${me%% *}" && echo "still in my leaf"
echo tried $(find /sys/fs/cgroup -maxdepth 6 -name cgroup.procs 2>/dev/null | wc -l)
find /sys/fs/cgroup -maxdepth 6 -type d 2>/dev/null
"""


def test_a_job_cannot_move_itself_or_touch_any_cgroup_it_can_see(
    shared_server: ServerProcess,
) -> None:
    """As the unprivileged user, it tries to join every cgroup.procs/tasks file it can find,
    to raise its own limits, to kill through cgroup.kill and to make a cgroup: all refused,
    it stays in its leaf. What it can find is only its own leaves (its cgroup namespace and
    read-only cgroupfs): no sibling, no other job's leaf, not jobd's tree."""
    with channel(shared_server) as (_, alice), channel(shared_server, "bob") as (_, bob):
        other = bob.Start(pb.StartRequest(command=["sleep", "1000"]), timeout=TIMEOUT)
        job = alice.Start(pb.StartRequest(command=["sh", "-c", ESCAPE]), timeout=TIMEOUT)
        out = b"".join(c.data for c in alice.Output(
            pb.OutputRequest(id=job.id, follow=True), timeout=TIMEOUT)).decode()
        assert "WROTE" not in out and "MADE" not in out, out
        assert "still in my leaf" in out, out
        assert other.id not in out and shared_server.cgroup_name not in out, out
        # It sees only its own leaf in each hierarchy jobd uses, read-only (1 on pure v2).
        tried = int(out.split("tried ")[1].split()[0])
        assert tried >= 1, out
        assert bob.Status(pb.JobRequest(id=other.id), timeout=TIMEOUT).state == pb.RUNNING
        bob.Stop(pb.StopRequest(id=other.id, grace={"seconds": 0}), timeout=TIMEOUT)
    print(f"cgroup escape: {tried} cgroup.procs files tried, none writable")


def test_fork_bomb_is_held_by_the_pids_limit(shared_server: ServerProcess) -> None:
    with channel(shared_server) as (_, alice), channel(shared_server, "admin") as (_, admin):
        job = alice.Start(pb.StartRequest(
            # The bomb starts in a subshell: the job's main shell forks once, before the
            # limit is reached, so it cannot die of a failed fork itself (it did, now and
            # then, making the job EXITED before the stop).
            command=["sh", "-c", "echo ready; (b() { b | b & }; b); exec sleep 1000"],
            limits=pb.Limits(pids=64)), timeout=TIMEOUT)
        _read_until(alice, job.id, b"ready")
        leaf = next(Path("/sys/fs/cgroup/pids").glob(f"{shared_server.cgroup_name}/jobs/{job.id}"))
        wait_until(lambda: int((leaf / "pids.events").read_text().split()[1]) > 0,
                   "the bomb to hit the limit")
        assert int((leaf / "pids.current").read_text()) <= 64 + 1  # + its PID 1
        # The server answers while the bomb runs.
        assert admin.List(pb.ListRequest(), timeout=TIMEOUT) is not None
        pids = _job_pids(shared_server, job.id)
        final = alice.Stop(pb.StopRequest(id=job.id, grace={"seconds": 0}), timeout=TIMEOUT)
        assert final.state == pb.STOPPED
        _gone(shared_server, job.id, pids)


HOG = ("import os\n"
       "for _ in range(3):\n"
       "    if os.fork() == 0:\n"
       "        break\n"
       "b = bytearray(256 << 20)\n"
       "print('survived', flush=True)\n")


def test_memory_hogs_are_held_by_the_memory_limit(shared_server: ServerProcess) -> None:
    """Four processes each asking for 256 MiB under a 64 MiB limit: none gets it; the job
    ends (OOM-killed); the server's own memory is untouched."""
    rss = shared_server.rss()
    with channel(shared_server) as (_, alice):
        job = alice.Start(pb.StartRequest(command=["python3", "-c", HOG],
                                          limits=pb.Limits(memory_bytes=64 << 20)),
                          timeout=TIMEOUT)
        sums, size = follow(alice, job.id)
        final = alice.Status(pb.JobRequest(id=job.id), timeout=TIMEOUT)
        assert final.usage.oom_kills >= 1
        assert final.usage.memory_peak_bytes <= 64 << 20
        out = b"".join(c.data for c in alice.Output(pb.OutputRequest(id=job.id), timeout=TIMEOUT))
        assert b"survived" not in out
        assert alice.List(pb.ListRequest(), timeout=TIMEOUT) is not None
    assert shared_server.rss() - rss < 32 << 20
