"""Layout detection, and the pure cgroup v2 driver against a FAKE cgroup tree in a temp dir.

This machine (and CI) has the hybrid layout, whose real cgroups the engine tests use. A pure
v2 hierarchy with controllers cannot exist here, so the v2 path is checked against plain
files standing in for cgroupfs: what the driver writes where, what it reads back, and how it
reaps. The kernel's own behaviour (enforcement, kill) is not faked; it is not tested here.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from jobd.engine import Limits, Mode, detect_layout
from jobd.engine._cgroup import CgroupTree, Layout

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
8:pids:/
7:blkio:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_CGROUP = "0::/system.slice/jobd.service\n"


def fake_v2(tmp_path: Path) -> Layout:
    """A fake /sys/fs/cgroup with the four controllers and jobd's service cgroup."""
    mount = tmp_path / "sys/fs/cgroup"
    start = mount / "system.slice/jobd.service"
    start.mkdir(parents=True)
    for d in (mount, mount / "system.slice", start):
        (d / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (start / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return detect_layout(V2_MOUNTINFO, V2_CGROUP, root=tmp_path)


class FakeTree(CgroupTree):
    """Plain directories keep their files, so rmdir cannot work as on cgroupfs."""

    def rmdir(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def test_detects_hybrid(tmp_path: Path) -> None:
    (tmp_path / "sys/fs/cgroup/unified").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/unified/cgroup.controllers").write_text("\n")
    layout = detect_layout(HYBRID_MOUNTINFO, HYBRID_CGROUP, root=tmp_path)
    assert layout.mode is Mode.HYBRID
    assert layout.unified == tmp_path / "sys/fs/cgroup/unified"
    assert layout.v1["memory"] == tmp_path / "sys/fs/cgroup/memory/process_api/abc"
    assert layout.v1["cpuacct"] == tmp_path / "sys/fs/cgroup/cpuacct"


def test_detects_v2_and_none(tmp_path: Path) -> None:
    layout = fake_v2(tmp_path)
    assert layout.mode is Mode.V2
    assert layout.unified == tmp_path / "sys/fs/cgroup/system.slice/jobd.service"
    assert detect_layout("", "", root=tmp_path).mode is Mode.NONE


def test_this_machine_is_detected() -> None:
    assert detect_layout().mode in (Mode.V2, Mode.HYBRID, Mode.NONE)


def test_v2_tree_limits_usage_kill_and_close(tmp_path: Path) -> None:
    layout = fake_v2(tmp_path)
    assert layout.unified is not None
    start = layout.unified
    tree = FakeTree(layout, "jobd", io_devices=["8:0"])
    tree.open()
    # The server left the cgroup it was started in, so that cgroup can delegate controllers.
    assert (start / "jobd/server/cgroup.procs").read_text() == str(os.getpid())
    for d in (start, start / "jobd", start / "jobd/jobs"):
        assert (d / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"

    leaf = tree.leaf("job-1")
    leaf.create(
        Limits(cpus=0.5, memory_bytes=64 << 20, pids=50, io_read_bps=1000, io_write_bps=2000)
    )
    d = start / "jobd/jobs/job-1"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "memory.swap.max").read_text() == "0"  # no swap
    assert (d / "pids.max").read_text() == "50"
    assert (d / "io.max").read_text() == "8:0 rbps=1000 wbps=2000"
    assert leaf.procs_files == [str(d / "cgroup.procs")]

    (d / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\n")
    (d / "memory.peak").write_text("4096\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    usage = leaf.usage()
    assert (usage.cpu_usec, usage.memory_peak_bytes, usage.oom_kills) == (1234, 4096, 1)

    (d / "cgroup.kill").write_text("")
    leaf.signal_all(signal.SIGKILL)
    assert (d / "cgroup.kill").read_text() == "1"

    (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert not leaf.populated()
    leaf.remove()
    assert not d.exists()
    tree.close()
    assert (start / "cgroup.procs").read_text() == str(os.getpid())  # moved back
    assert not (start / "jobd").exists()


def test_v2_unset_limits_write_nothing(tmp_path: Path) -> None:
    tree = FakeTree(fake_v2(tmp_path), "jobd")
    tree.open()
    leaf = tree.leaf("job-2")
    leaf.create(Limits())
    assert leaf.unified is not None
    assert sorted(p.name for p in leaf.unified.iterdir()) == []
    tree.close()


def test_v2_reaps_stale_leaves(tmp_path: Path) -> None:
    layout = fake_v2(tmp_path)
    assert layout.unified is not None
    stale = layout.unified / "jobd/jobs/0f0f"
    stale.mkdir(parents=True)
    (stale / "cgroup.procs").write_text("")
    (stale / "cgroup.events").write_text("populated 0\n")
    tree = FakeTree(layout, "jobd")
    tree.open()
    assert not stale.exists()
    tree.close()


def test_v2_missing_controllers_named(tmp_path: Path) -> None:
    layout = fake_v2(tmp_path)
    assert layout.unified is not None
    (layout.unified / "cgroup.controllers").write_text("cpu\n")
    with pytest.raises(Exception, match="io, memory, pids are not available"):
        FakeTree(layout, "jobd").open()


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_bad_tree_names(name: str) -> None:
    with pytest.raises(Exception, match="bad cgroup name"):
        CgroupTree(Layout(Mode.NONE), name)


async def test_ended_leaves_queued_during_a_worker_call_go_in_one_call() -> None:
    """A leaf's kill and removal run in a worker thread (they take the kernel's cgroup mutex);
    the leaves of jobs that end while one such call runs go together in the next call, not a
    thread hand-off each, and a failing leaf fails only its own caller (seen failing with
    one call per leaf: [[a], [b], [c], [d]])."""
    import threading

    import trio
    import trio.testing

    from jobd.engine._cgroup import _Batched

    calls: list[list[str]] = []
    release = threading.Event()
    in_thread = trio.Event()

    def work(items: list[str]) -> list[str | Exception]:
        calls.append(sorted(items))
        if items == ["a"]:
            trio.from_thread.run_sync(in_thread.set)
            release.wait(10)
        return [ValueError(i) if i == "c" else i.upper() for i in items]

    batched: _Batched[str, str] = _Batched(work)
    got: dict[str, object] = {}

    async def one(item: str) -> None:
        try:
            got[item] = await batched(item)
        except ValueError as exc:
            got[item] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "a")
        await in_thread.wait()
        for item in "bcd":
            nursery.start_soon(one, item)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert calls == [["a"], ["b", "c", "d"]]
    assert got["a"] == "A" and got["b"] == "B" and got["d"] == "D"
    assert isinstance(got["c"], ValueError)
