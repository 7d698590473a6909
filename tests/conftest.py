"""Shared fixtures: engines on real cgroups, and the suite-wide proof that no job process and
no jobd cgroup is left behind."""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobd.engine import EngineConfig, JobManager, Mode, detect_layout, open_job_manager

# Every cgroup tree a test makes is named with this prefix, so the leak check finds them all.
TEST_CGROUP_PREFIX = "jobd-test-"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroups_usable() -> str:
    """Empty when real cgroup tests can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if detect_layout().mode is Mode.NONE:
        return "needs cgroup v2 or the hybrid layout"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = cgroups_usable()
    if not reason:
        return
    for item in items:
        if "cgroups" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    # On our machines and in CI (JOBD_REQUIRE_CGROUPS=1) a skipped cgroup test is a failure.
    if report.skipped and os.environ.get("JOBD_REQUIRE_CGROUPS") == "1":
        if "cgroups" in item.keywords:
            report.outcome = "failed"
            report.longrepr = f"cgroup test skipped where it must run: {cgroups_usable()}"


def jobd_cgroups() -> list[Path]:
    """Every cgroup directory a jobd (test or not) created under any hierarchy we use."""
    found = []
    layout = detect_layout() if not cgroups_usable() else None
    bases = []
    if layout is not None:
        bases = [p for p in ([layout.unified] + list(layout.v1.values())) if p is not None]
    for base in bases:
        if base.is_dir():
            found += [p for p in base.iterdir() if p.is_dir() and p.name.startswith("jobd")]
    return found


def job_processes(names: set[str]) -> list[str]:
    """Processes sitting in a jobd cgroup tree with one of `names`, as "pid: cmdline"."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            groups = (entry / "cgroup").read_text()
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            # A killed orphan stays a zombie until init reaps it, and a job's PID 1 stays in
            # exit() until its namespace is released: dead, so not left running.
            zombie = stat[0] == "Z" or bool(int(stat[6]) & 0x4)  # PF_EXITING
            ours = any(f"/{name}/" in groups for name in names)
            if ours and not zombie:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{entry.name}: {cmd}")
        except OSError:
            continue
    return out


# Tree names handed out in this session: the leak check looks only at these (and at the
# default name), so another suite running on the same machine cannot confuse it.
SESSION_NAMES: set[str] = {"jobd"}


def shim_children() -> list[str]:
    """Shims and zygotes (`_shim.py`) that are still children of this process (an engine in
    the test process owns them): every manager that ended must have reaped them."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and "_shim.py" in cmd:
            out.append(f"{entry.name}: {stat[0]} {cmd}")  # a zombie too: never reaped
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """At the end of the suite: no job process, no jobd cgroup of ours and no shim or zygote
    of the engines this process ran remains."""
    before = set(jobd_cgroups())
    yield
    left = [p for p in jobd_cgroups() if p not in before and p.name in SESSION_NAMES]
    procs = job_processes(SESSION_NAMES) + shim_children()
    assert not left and not procs, f"left behind: cgroups {left}, processes {procs}"


@pytest.fixture
def cgroup_name() -> str:
    name = TEST_CGROUP_PREFIX + uuid.uuid4().hex[:12]
    SESSION_NAMES.add(name)
    return name


def unique_uid_range(width: int = 1000) -> tuple[int, int]:
    """A job uid range of this test's own: parallel suites on one host never share a uid."""
    first = 2_000_000 + secrets.randbelow(2_000_000_000 // width) * width
    return first, first + width - 1


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory both the test and its jobs see: /tmp, /var/tmp and /dev/shm are private
    to each job, so a test that signals a job through a file puts it here."""
    path = Path("/run") / f"{TEST_CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def engine_config(tmp_path: Path, cgroup_name: str) -> EngineConfig:
    return EngineConfig(
        data_dir=tmp_path / "data",
        cgroup_name=cgroup_name,
        stop_grace=5.0,
        job_uids=unique_uid_range(),
        uid_registry=tmp_path / "uid-ranges",
    )


@pytest.fixture
async def engine(engine_config: EngineConfig) -> AsyncIterator[JobManager]:
    async with open_job_manager(engine_config) as manager:
        yield manager
