"""What a job can see of the host and of other jobs, asked from inside real jobs: processes,
/proc, /tmp and /dev/shm, SysV IPC, the network, cgroupfs, privileges and user namespaces;
and that the command's own way of ending still reaches the record through the namespace's
PID 1."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from jobd.engine import (
    EngineConfig,
    InvalidArgument,
    JobdError,
    JobManager,
    Limits,
    Network,
    State,
    _sandbox,
    open_job_manager,
)
from jobd.v1 import jobd_pb2 as pb

from .conftest import SESSION_NAMES, TEST_CGROUP_PREFIX, unique_uid_range
from .e2e import Pki, alive, host_pids, in_namespace
from .reliability.harness import channel, code_of, serving

pytestmark = pytest.mark.cgroups
MiB = 1 << 20
SECRET = "hunter2-" + os.urandom(4).hex()
PY = "/usr/bin/python3"


async def output_of(engine: JobManager, job_id: str) -> str:
    data = b"".join([c.data async for c in engine.read_output(job_id, follow=True)])
    return data.decode(errors="replace")


async def wait_for_output(engine: JobManager, job_id: str, marker: str) -> str:
    seen = b""
    async for chunk in engine.read_output(job_id, follow=True):
        seen += chunk.data
        if marker.encode() in seen:
            return seen.decode(errors="replace")
    raise AssertionError(f"job ended without printing {marker!r}; printed {seen!r}")


async def run(engine: JobManager, script: str, owner: str = "alice", **kw: object) -> str:
    job = await engine.start(owner, ["sh", "-c", script], **kw)  # type: ignore[arg-type]
    return await output_of(engine, job.id)


@pytest.fixture
async def engine_with(engine_config: EngineConfig) -> AsyncIterator[object]:
    """`async with engine_with(tmp_size=...) as engine`: an engine with other settings (and
    a cgroup tree and data dir of its own, so it may run beside the `engine` fixture's)."""

    def opener(**changes: object) -> object:
        name = TEST_CGROUP_PREFIX + uuid.uuid4().hex[:12]
        SESSION_NAMES.add(name)
        config = dataclasses.replace(
            engine_config, cgroup_name=name, data_dir=engine_config.data_dir.parent / name,
            job_uids=unique_uid_range(),
        )
        return open_job_manager(dataclasses.replace(config, **changes))  # type: ignore[arg-type]

    yield opener


# ----------------------------------------------------------------- processes and /proc


async def test_ps_and_proc_show_only_the_jobs_own_processes(engine: JobManager) -> None:
    bobs = await engine.start(
        "bob", ["sh", "-c", f"echo up; exec {PY} -c 'import time; time.sleep(1000)' {SECRET}"]
    )
    await wait_for_output(engine, bobs.id, "up")
    (bob_host_pid,) = [p for ns, p in host_pids(bobs.id).items() if ns != 1]
    out = await run(
        engine,
        # (echo @"@": the separator as printed is not the one in the shell's own cmdline)
        "exec 2>&1; ps -eo pid=,args=; echo @\"@\"; ls /proc | grep -c '^[0-9]'; echo @\"@\"; "
        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo @\"@\"; "
        f"cat /proc/{bob_host_pid}/cmdline; true",
    )
    ps, count, cmdlines, rest = out.split("@@")
    rows = [line.split(None, 1) for line in ps.strip().splitlines()]
    # PID 1 is the job's own reaper (the shim, forked), then the shell and its ps.
    assert [int(pid) for pid, _ in rows] == [1, 2, 3], ps
    assert "_shim.py" in rows[0][1] and rows[1][1].startswith("sh -c") and "ps" in rows[2][1]
    assert 3 <= int(count) <= 6, count  # the shell, ls, grep, PID 1 (and cat, if quick)
    assert SECRET not in ps and SECRET not in cmdlines and SECRET not in rest, out
    assert "No such file" in rest, rest  # bob's host pid means nothing in here
    assert engine.status(bobs.id).state is State.RUNNING
    await engine.stop(bobs.id, grace=0)


async def test_its_cgroupfs_shows_only_its_own_leaves(
    engine: JobManager, engine_config: EngineConfig
) -> None:
    bobs = await engine.start("bob", ["sleep", "1000"])
    out = await run(engine, "find /sys/fs/cgroup -maxdepth 3; cat /proc/self/cgroup")
    assert bobs.id not in out and engine_config.cgroup_name not in out, out
    assert "/sys/fs/cgroup/unified/cgroup.procs" in out  # its own leaf, as the root
    await engine.stop(bobs.id, grace=0)


# ----------------------------------------------------------------- /tmp, /dev/shm


async def test_tmp_and_shm_are_private_to_each_job_and_gone_after_it(
    engine: JobManager, shared_dir: Path
) -> None:
    go = shared_dir / "go"
    dirs = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
    writes = "; ".join(f"echo {SECRET} > {d}/left-{SECRET}" for d in dirs)
    first = await engine.start(
        "alice",
        ["sh", "-c", f"umask 022; {writes}; readlink /proc/self/ns/mnt; "
         f"while [ ! -e {go} ]; do sleep 0.01; done"],
    )
    mnt_ns = (await wait_for_output(engine, first.id, "]\n")).strip()
    holders = in_namespace(mnt_ns)  # its PID 1 and the shell
    assert len(holders) >= 2, holders
    # The files exist, in the first job's own view (through its root, from the host) ...
    main_pid = host_pids(first.id)[2]  # the shell (its sleeps come and go)
    for d in dirs:
        assert (Path(f"/proc/{main_pid}/root{d}") / f"left-{SECRET}").read_text().strip() == SECRET
        assert not (Path(d) / f"left-{SECRET}").exists()  # ... and not on the host
    # ... and not for a later job of the same owner, nor of another owner.
    listing = "ls -A " + " ".join(dirs) + f"; cat {dirs[0]}/left-{SECRET}"
    for owner in ("alice", "bob"):
        out = await run(engine, listing, owner)
        assert SECRET not in out.replace(f"cat: /tmp/left-{SECRET}", ""), out
        assert "No such file" in out
    go.touch()
    assert (await output_of(engine, first.id)).strip() == mnt_ns
    # Every process that held its mount namespace is gone, so the kernel has freed it and
    # its tmpfs with it (nothing else refers to it: no bind mount, no open ns file). Not
    # in_namespace() again: the kernel hands the number to the next namespace at once.
    assert mnt_ns.startswith("mnt:[") and not [p for p in holders if alive(p)]


async def test_tmp_is_charged_to_the_job_and_bounded(engine_with: object) -> None:
    async with engine_with(tmp_size=4 * MiB) as engine:  # type: ignore[operator]
        job = await engine.start(
            "alice", ["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=8 2>&1; exit 0"]
        )
        assert "No space left on device" in await output_of(engine, job.id)
    async with engine_with() as engine:  # type: ignore[operator]
        job = await engine.start(
            "alice", ["sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=32 status=none"]
        )
        await output_of(engine, job.id)
        # dd itself needs about 1 MiB: the 32 MiB in /dev/shm were charged to the job.
        assert engine.status(job.id).usage.memory_peak_bytes >= 32 * MiB


async def test_a_working_dir_inside_a_private_dir_is_refused(engine: JobManager) -> None:
    assert (await run(engine, "pwd; ls -A", working_dir="/tmp")) == "/tmp\n"  # empty, its own
    os.makedirs("/tmp/jobd-isolation-test-cwd", exist_ok=True)
    try:
        with pytest.raises(InvalidArgument, match="private and empty"):
            await engine.start("alice", ["true"], working_dir="/tmp/jobd-isolation-test-cwd")
    finally:
        os.rmdir("/tmp/jobd-isolation-test-cwd")


# ----------------------------------------------------------------- IPC


async def test_sysv_ipc_is_private(engine: JobManager, shared_dir: Path) -> None:
    go = shared_dir / "go"
    first = await engine.start(
        "bob",
        ["sh", "-c", f"ipcmk -M 4096 -p 0666; ipcmk -Q -p 0666; ipcs -m -q; echo made; "
         f"while [ ! -e {go} ]; do sleep 0.01; done"],
    )
    made = await wait_for_output(engine, first.id, "made")
    assert "Shared memory id" in made and "0x" in made, made
    host = await trio.Path("/proc/sysvipc/shm").read_text()
    out = await run(engine, "ipcs -m -q | grep -c '^0x'; cat /proc/sysvipc/shm | wc -l")
    assert out.split() == ["0", "1"], out  # nothing but the table's header line
    assert await trio.Path("/proc/sysvipc/shm").read_text() == host  # nor on the host's
    go.touch()
    await output_of(engine, first.id)


# ----------------------------------------------------------------- network


async def test_network_none_has_only_loopback(engine: JobManager) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = (
            "import socket\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "c = socket.create_connection(s.getsockname()); print('loopback ok')\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "    print('host reached')\n"
            "except OSError as exc:\n    print('host refused', exc.errno)\n"
        )
        host = await run(engine, f"{PY} -c \"{probe}\"")
        assert "loopback ok" in host and "host reached" in host, host
        job = await engine.start("alice", [PY, "-c", probe], network=Network.NONE)
        out = await output_of(engine, job.id)
        assert "loopback ok" in out and "host refused" in out, out
        assert engine.status(job.id).network is Network.NONE
        links = await run(engine, "ip -o link | cut -d: -f2", network=Network.NONE)
        assert links.split() == ["lo"], links


async def test_network_choice_and_flags(engine_with: object, engine: JobManager) -> None:
    job = await engine.start("alice", ["true"])
    assert job.network is Network.HOST  # the default default
    with pytest.raises(InvalidArgument, match="unknown network 7"):
        await engine.start("alice", ["true"], network=7)
    async with engine_with(
        default_network=Network.NONE, deny_host_network=True
    ) as strict:  # type: ignore[operator]
        with pytest.raises(InvalidArgument, match="--deny-host-network"):
            await strict.start("alice", ["true"], network=Network.HOST)
        job = await strict.start("alice", ["ip", "-o", "link"])
        assert job.network is Network.NONE
        assert (await output_of(strict, job.id)).count("\n") == 1  # lo only
    with pytest.raises(JobdError, match="--default-network none"):
        EngineConfig(data_dir=Path("."), deny_host_network=True)


# ----------------------------------------------------------------- privileges


async def test_no_new_privs_and_no_user_namespaces(
    engine: JobManager, engine_with: object
) -> None:
    out = await run(
        engine,
        "grep NoNewPrivs /proc/self/status; unshare -U true; echo unshare=$?; "
        "unshare -Ur id; "
        f"{PY} -c 'import os; p = os.posix_spawn(\"/bin/true\", [\"true\"], {{}}); "
        "print(\"spawned\", os.waitpid(p, 0)[1])'",
    )
    assert "NoNewPrivs:\t1" in out, out
    assert "unshare=1" in out and out.count("Operation not permitted") == 2, out
    assert "uid=0" not in out and "spawned 0" in out, out  # clone3's fallback works
    async with engine_with(allow_user_namespaces=True) as lax:  # type: ignore[operator]
        out = await run(lax, "unshare -U true; echo unshare=$?")
        assert "unshare=0" in out, out


STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs",
                 "Seccomp", "SigBlk", "SigIgn")


def _status(text: str) -> dict[str, str]:
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: " ".join(fields[key].split()) for key in STATUS_FIELDS if key in fields}


async def test_the_command_starts_as_the_jobs_user_and_pid_1_keeps_its_own_ids(
    engine: JobManager, engine_config: EngineConfig, shared_dir: Path
) -> None:
    """PID 1 starts the command with posix_spawn (`_shim._Spawner`), lending it its real ids
    for the call: the command (here `cat` itself: a shell blocks every signal while it forks)
    still has every uid the job's, every gid and its only group nogroup, no capability, no
    signal ignored (glibc's own two included) or blocked, no_new_privs and the filter, the
    job's soft open-files limit and its working dir; once the Start has returned, PID 1 has
    its own ids and groups back, and runs with no_new_privs and the filter itself."""
    job = await engine.start("alice", ["cat", "/proc/self/status"])
    own = await output_of(engine, job.id)
    uid, gid = str(job.uid), "65534"
    assert _status(own) == {
        "Uid": " ".join([uid] * 4), "Gid": " ".join([gid] * 4), "Groups": gid,
        "CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapAmb": "0" * 16,
        "NoNewPrivs": "1", "Seccomp": "2", "SigBlk": "0" * 16, "SigIgn": "0" * 16,
    }, own
    rest = await run(engine, "ulimit -Sn; pwd", working_dir=str(shared_dir))
    assert rest.split() == [str(engine_config.job_nofile), str(shared_dir)], rest
    go = shared_dir / "go"
    job = await engine.start(
        "alice", ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; cat /proc/1/status"]
    )
    go.touch()  # the Start has returned: PID 1 put its ids back before its verdict
    init = _status(await output_of(engine, job.id))
    groups = " ".join(str(g) for g in os.getgroups())  # the server's (this process's)
    assert (init["Uid"], init["Gid"], init.get("Groups", "")) == ("0 0 0 0", "0 0 0 0", groups)
    assert (init["NoNewPrivs"], init["Seccomp"]) == ("1", "2"), init


def bad_then_good(shared_dir: Path, good: str) -> str:
    """A PATH whose first `prog-jobd` is not a program (glibc's posix_spawnp stops there with
    ENOEXEC) and whose second is the script `good`."""
    for name, text in (("bad", "not a program\n"), ("good", good)):
        (shared_dir / name).mkdir(mode=0o755)
        (shared_dir / name / "prog-jobd").write_text(text)
        (shared_dir / name / "prog-jobd").chmod(0o755)
    return f"{shared_dir}/bad:{shared_dir}/good"


async def test_a_path_search_glibc_would_stop_at_goes_on_as_before(
    engine: JobManager, shared_dir: Path
) -> None:
    """posix_spawnp's search ends at an entry that exists but cannot be executed (here not
    a program: ENOEXEC); the shim's own goes on to the next entry, as it always did: PID 1
    then forks and searches itself."""
    job = await engine.start(
        "alice", ["prog-jobd"], env={"PATH": bad_then_good(shared_dir, "#!/bin/sh\necho second\n")}
    )
    assert await output_of(engine, job.id) == "second\n"
    assert engine.status(job.id).exit_code == 0
    with pytest.raises(InvalidArgument, match="cannot execute 'prog-jobd'.*Exec format"):
        await engine.start("alice", ["prog-jobd"], env={"PATH": f"{shared_dir}/bad"})


@pytest.fixture
def started_ignoring_signals() -> Iterator[None]:
    """The server started as a shell's `jobd serve &` would start it, with SIGINT and SIGQUIT
    ignored (here also SIGUSR1): requested before `engine`, so its zygote and shims inherit
    the dispositions."""
    ignored = (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)
    before = [signal.signal(sig, signal.SIG_IGN) for sig in ignored]
    try:
        yield
    finally:
        for sig, handler in zip(ignored, before, strict=True):
            signal.signal(sig, handler)


async def test_a_command_ignores_no_signal_whatever_the_server_inherited(
    started_ignoring_signals: None, engine: JobManager, shared_dir: Path
) -> None:
    """Ignored dispositions survive exec: the command gets every signal as its default, by
    posix_spawn and by the fork PID 1 falls back to (a PATH search glibc stops at)."""
    job = await engine.start("alice", ["cat", "/proc/self/status"])
    assert _status(await output_of(engine, job.id))["SigIgn"] == "0" * 16
    job = await engine.start("alice", ["prog-jobd"], env={"PATH": bad_then_good(
        shared_dir, "#!/bin/cat /proc/self/status\n")})
    status = _status(await output_of(engine, job.id))
    # (The fork's child is Python: it cannot set glibc's own two, 32 and 33, which CI's run
    # has seen ignored there; every signal a program may use is checked.)
    assert int(status["SigIgn"], 16) & (1 << 31) - 1 == 0, status


def test_seccomp_filter_shape() -> None:
    """The filter assembles for each machine it knows, and only those."""
    for machine in ("x86_64", "aarch64"):
        bpf = _sandbox.seccomp_filter(machine)
        assert bpf and len(bpf) % 8 == 0
    assert _sandbox.seccomp_filter("riscv64") is None


# ----------------------------------------------------------------- how it ended


@pytest.mark.parametrize(
    ("script", "state", "code", "sig"),
    [
        ("kill -9 $$", State.KILLED, 0, 9),
        ("exit 137", State.EXITED, 137, 0),
        ("kill -TERM $$", State.KILLED, 0, 15),
        ("kill -SEGV $$", State.KILLED, 0, 11),
        ("exit 3", State.EXITED, 3, 0),
    ],
)
async def test_the_commands_own_end_reaches_the_record(
    engine: JobManager, script: str, state: State, code: int, sig: int
) -> None:
    """Through the shim and PID 1: a SIGKILL is signal 9, never 'exit 137'."""
    job = await engine.start("alice", ["sh", "-c", script])
    await output_of(engine, job.id)
    final = engine.status(job.id)
    assert (final.state, final.exit_code, final.signal) == (state, code, sig)


async def test_stop_reaches_a_command_that_traps_term(engine: JobManager) -> None:
    job = await engine.start("alice", ["sh", "-c", "trap 'exit 7' TERM; echo ready; "
                                                   "while :; do sleep 0.01; done"])
    await wait_for_output(engine, job.id, "ready")
    final = await engine.stop(job.id, grace=30)
    # The shim passed SIGTERM by (it ignores it); the command's own exit 7 is recorded.
    assert (final.state, final.exit_code, final.signal) == (State.STOPPED, 7, 0), final


async def test_oom_in_the_namespace_is_still_oom(engine: JobManager) -> None:
    job = await engine.start(
        "alice", [PY, "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"],
        limits=Limits(memory_bytes=32 * MiB),
    )
    await output_of(engine, job.id)
    final = engine.status(job.id)
    assert final.oom_killed and final.signal == signal.SIGKILL, final


# ----------------------------------------------------------------- the real server


def test_server_says_what_isolation_is_in_force_and_none_cannot_reach_it(
    tmp_path: Path,
) -> None:
    pki = Pki.make(tmp_path / "pki")
    with serving(pki, tmp_path) as server, channel(server) as (_, alice):
        assert "isolation: own mount, IPC and PID namespaces" in server.text
        assert "user namespaces refused (seccomp)" in server.text
        connect = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {server.port}), timeout=5)\n"
            "    print('reached')\nexcept OSError as exc:\n    print('refused', exc.errno)\n"
        )
        for network, expected in ((pb.NETWORK_NONE, "refused"), (pb.NETWORK_HOST, "reached")):
            job = alice.Start(pb.StartRequest(command=[PY, "-c", connect], network=network),
                              timeout=60)
            assert job.network == network
            out = b"".join(c.data for c in alice.Output(
                pb.OutputRequest(id=job.id, follow=True), timeout=60)).decode()
            assert out.startswith(expected), out
        assert code_of(lambda: alice.Start(
            pb.StartRequest(command=["true"], network=9), timeout=60)).name == "INVALID_ARGUMENT"


def test_without_namespaces_it_says_so_and_pretends_nothing(
    tmp_path: Path, cgroup_name: str
) -> None:
    """A host that refuses namespaces, for real: jobd as root without CAP_SYS_ADMIN (as in
    a container that was not given it), so every unshare() fails."""
    script = f"""
import logging, sys, trio
from pathlib import Path
from jobd.engine import EngineConfig, FailedPrecondition, Network, open_job_manager
logging.basicConfig(level="INFO", stream=sys.stdout, format="%(message)s")

async def main():
    config = EngineConfig(data_dir=Path({str(tmp_path / "data")!r}), cgroup_name={cgroup_name!r})
    async with open_job_manager(config) as jobs:
        try:
            await jobs.start("alice", ["true"], network=Network.NONE)
        except FailedPrecondition as exc:
            print("refused:", exc)
        job = await jobs.start("alice", ["sh", "-c", "grep NoNewPrivs /proc/self/status; ps -e"])
        print(b"".join([c.data async for c in jobs.read_output(job.id, follow=True)]).decode())

trio.run(main)
"""
    done = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "isolation: NO namespaces" in out and "Operation not permitted" in out, out
    assert "refused: this host cannot give a job a network of its own" in out, out
    assert "NoNewPrivs:\t1" in out, out
    assert len(out.split("PID TTY")[1].splitlines()) > 4, out  # it sees the host's processes


# ----------------------------------------------------------------- uids


async def test_the_launch_uses_the_owners_uid(engine: JobManager, shared_dir: Path) -> None:
    """Same owner, same uid (so a second job may append to what the first wrote); two owners,
    two uids; and the uid each job runs as is the one its record names."""
    work = shared_dir / "work"
    work.mkdir()
    work.chmod(0o1777)
    first = await engine.start("alice", ["sh", "-c", "id -u; echo one > mine; chmod 600 mine"],
                               working_dir=str(work))
    assert (await output_of(engine, first.id)).strip() == str(engine.status(first.id).uid)
    second = await engine.start("alice", ["sh", "-c", "id -u; echo two >> mine; cat mine"],
                                working_dir=str(work))
    out = (await output_of(engine, second.id)).split()
    assert out == [str(first.uid), "one", "two"], out
    bobs = await engine.start("bob", ["sh", "-c", "exec 2>&1; id -u; cat mine"],
                              working_dir=str(work))
    out = (await output_of(engine, bobs.id)).split("\n")
    assert out[0] == str(engine.status(bobs.id).uid) != str(first.uid), out
    assert "Permission denied" in out[1], out
