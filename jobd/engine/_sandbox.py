"""A job's isolation plan: the namespaces it gets, what is mounted in them and the seccomp
filter that refuses new user namespaces; and, once at start-up, what this host allows (a
probe, never a guess). Imports only the standard library and trio; the shim (`_shim.py`)
carries the plan out, this module only builds it.

    sandbox = await probe_sandbox(SandboxSettings(...), layout, cgroup_dirs)
    log.info("isolation: %s", sandbox.describe())
    pool_message = sandbox.prep           # done by every idle shim, before any job is known
    plan = sandbox.job_plan(Network.NONE)  # in the job's spec; None: no namespaces here
"""

from __future__ import annotations

import logging
import marshal
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from . import _shim
from ._cgroup import Layout, Mode
from ._errors import InvalidArgument
from ._types import Network

log = logging.getLogger(__name__)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_SLAVE = 0x4000, 0x80000
_RO = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
# The world-writable directories of a Debian host: each job gets an empty tmpfs of its own on
# them, so nothing a job leaves there outlives it or reaches another job.
# PID 1 of a sandboxed job sits in its leaf too (see `_shim.py`).
HELPER_PROCESSES = 1
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """The operator's choices (EngineConfig carries them)."""

    tmp_size: int = 0  # bytes per private tmpfs; 0: bounded by the job's memory limit only
    allow_user_namespaces: bool = False


class Sandbox:
    """What isolation jobs get on this host, and each job's plan."""

    def __init__(
        self,
        settings: SandboxSettings,
        prep: dict[str, object],
        cgroup_mounts: list[tuple[str, str, str, int, str]],
        *,
        namespaces: bool,
        cgroupns: bool,
        network_none: bool,
        userns_blocked: bool,
        problems: list[str],
    ) -> None:
        self.settings = settings
        self.prep = prep
        self._cgroup_mounts = cgroup_mounts
        self.namespaces = namespaces
        self.cgroupns = cgroupns
        self.network_none = network_none
        self.userns_blocked = userns_blocked
        self.problems = problems
        # The dirs each job has private, found once (as the idle shims' mounts were planned):
        # their realpath and isdir took 0.1-0.3 ms of every Start.
        self._private_dirs = _existing_private_dirs()

    def job_plan(self, network: Network) -> dict[str, object] | None:
        """The part of a job's spec the shim does once it is in the job's leaves."""
        if not self.namespaces:
            return None
        none = network is Network.NONE
        return {
            "unshare": (CLONE_NEWCGROUP if self.cgroupns else 0) | (CLONE_NEWNET if none else 0),
            "mounts": self._cgroup_mounts,
            "loopback": none,
        }

    def check_working_dir(self, cwd: str) -> None:
        """A directory inside a private one exists only on the host: say so at Start rather
        than fail the job's chdir."""
        if not self.namespaces:
            return
        path = os.path.normpath(cwd)  # not resolved as root: that would probe the host (issue 9)
        for private in self._private_dirs:
            if path.startswith(private.rstrip("/") + "/"):
                raise InvalidArgument(
                    f"working_dir {cwd!r} is inside {private}, which each job has private "
                    "and empty: use a directory outside /tmp, /var/tmp, /dev/shm and /run/lock"
                )

    def describe(self) -> str:
        parts: list[str] = []
        if self.namespaces:
            size = (
                f"each at most {self.settings.tmp_size} bytes and"
                if self.settings.tmp_size
                else ""
            )
            parts.append(
                "own mount, IPC and PID namespaces (/proc shows only the job's processes), "
                f"private tmpfs on {', '.join(self._private_dirs)} ({size} charged to "
                "the job's memory cgroup, gone with the job)"
            )
            parts.append(
                "own cgroup namespace, cgroupfs shows only the job's own leaves"
                if self.cgroupns
                else "cgroupfs hidden (no cgroup namespaces on this host)"
            )
            parts.append(
                "NETWORK_NONE available (own network namespace, loopback only)"
                if self.network_none
                else "NETWORK_NONE unavailable (no network namespaces)"
            )
        else:
            parts.append(
                "NO namespaces: jobs share the host's /tmp, /dev/shm, processes, IPC and "
                "network, and NETWORK_NONE is refused"
            )
        parts.append("no_new_privs")
        parts.append(
            "user namespaces refused (seccomp)"
            if self.userns_blocked
            else "user namespaces NOT refused"
        )
        text = "; ".join(parts)
        if self.problems:
            text += " [" + "; ".join(self.problems) + "]"
        return text


def _existing_private_dirs() -> list[str]:
    seen: list[str] = []
    for d in PRIVATE_DIRS:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in seen:
            seen.append(real)
    return seen


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mounts(mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every mount, in mount order."""
    out = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) >= 5 and len(post_fields) >= 3:
            out.append((_unescape(fields[4]), post_fields[0], post_fields[2]))
    return out


def plan_prep(
    settings: SandboxSettings, mountinfo: str, cgroup_dirs: Sequence[str] = ()
) -> dict[str, object]:
    """What every idle shim does before any job is known: new mount, IPC and PID namespaces,
    host mounts still propagating in but none of ours out (slave), an empty tmpfs on each
    world-writable dir, a fresh mqueue, and an empty read-only tmpfs over every cgroupfs
    mount. `cgroup_dirs` (jobd's `jobs` dir in each hierarchy) are opened before that, so
    the shim can still join a job's leaves under them."""
    tmpfs = "mode=1777" + (f",size={settings.tmp_size}" if settings.tmp_size else "")
    mounts: list[tuple[str, str, str, int, str]] = [("none", "/", "", MS_REC | MS_SLAVE, "")]
    mounts += [("jobd", d, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs) for d in _existing_private_dirs()]
    mounts += [
        ("mqueue", point, "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
        for point, fstype, _ in _mounts(mountinfo)
        if fstype == "mqueue"
    ]
    # Also a tmpfs between a cgroupfs mount and a fresh mount of the same hierarchy later:
    # the kernel refuses one stacked right on itself (EBUSY).
    covers = {p: p for p, fstype, _ in _mounts(mountinfo) if fstype in ("cgroup", "cgroup2")}
    mounts += [("jobd", p, "tmpfs", _RO, "size=4k,mode=555") for p in covers]
    return {
        "unshare": CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID,
        "cgroup_dirs": list(cgroup_dirs),
        "mounts": mounts,
        "seccomp": None if settings.allow_user_namespaces else seccomp_filter(),
    }


def plan_cgroup_mounts(
    mountinfo: str, layout: Layout | None, *, cgroupns: bool
) -> list[tuple[str, str, str, int, str]]:
    """Over every cgroupfs mount (covered while idle, `plan_prep`): in the job's cgroup
    namespace a fresh read-only mount of the same hierarchy (its root is then the job's own
    leaf) where the job has a leaf; elsewhere the empty cover stays, so no other job's leaf
    can be seen."""
    used_v1 = set(layout.v1) if layout and layout.mode is Mode.HYBRID and cgroupns else set()
    unified = bool(layout and layout.mode is not Mode.NONE and cgroupns)
    plan: dict[str, list[tuple[str, str, str, int, str]]] = {}
    for point, fstype, super_opts in _mounts(mountinfo):
        if fstype not in ("cgroup", "cgroup2"):
            continue
        plan[point] = []
        opts = [o for o in super_opts.split(",") if o not in ("rw", "ro")]
        if fstype == "cgroup2" and unified:
            plan[point].append(("cgroup2", point, "cgroup2", _RO, ""))
        elif fstype == "cgroup" and used_v1 & set(opts):
            plan[point].append(("cgroup", point, "cgroup", _RO, ",".join(opts)))
    return [mount for mounts in plan.values() for mount in mounts]


# ----------------------------------------------------------------- seccomp

_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38
_X32 = 0x40000000
# audit arch, (unshare, clone), clone3: per ABI a process on this machine may use.
_ABIS: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {
    "x86_64": [
        (0xC000003E, (272, 56, _X32 | 272, _X32 | 56), (435, _X32 | 435)),  # x86_64, x32
        (0x40000003, (310, 120), (435,)),  # i386
    ],
    "aarch64": [
        (0xC00000B7, (97, 220), (435,)),
        (0x40000028, (337, 120), (435,)),  # arm (compat)
    ],
}


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp program: unshare() and clone() with CLONE_NEWUSER fail with
    EPERM; clone3() fails with ENOSYS (its flags are behind a pointer a filter cannot read;
    libc then falls back to clone()); everything else is allowed; a syscall of an ABI not
    listed fails with ENOSYS. None on a machine whose syscall numbers are not known here."""
    abis = _ABIS.get(machine or os.uname().machine)
    if abis is None:
        return None
    # (code, jump-if-true, jump-if-false, k); a jump is a label, resolved below.
    prog: list[tuple[int, str | int, str | int, int]] = [(_BPF_LD_W_ABS, 0, 0, 4)]  # arch
    labels: dict[str, int] = {}
    for i, (arch, flagged, enosys) in enumerate(abis):
        prog.append((_BPF_JEQ_K, 0, f"abi{i + 1}", arch))
        prog.append((_BPF_LD_W_ABS, 0, 0, 0))  # syscall number
        prog += [(_BPF_JEQ_K, "flags", 0, nr) for nr in flagged]
        prog += [(_BPF_JEQ_K, "enosys", 0, nr) for nr in enosys]
        prog.append((_BPF_RET_K, 0, 0, _RET_ALLOW))
        labels[f"abi{i + 1}"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ERRNO | _ENOSYS))  # an ABI not listed
    labels["flags"] = len(prog)
    prog += [
        (_BPF_LD_W_ABS, 0, 0, 16),  # low 32 bits of args[0] (little-endian): the flags
        (_BPF_JSET_K, "eperm", 0, CLONE_NEWUSER),
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    labels["eperm"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ERRNO | _EPERM))
    labels["enosys"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ERRNO | _ENOSYS))
    out = b""
    for at, (code, jt, jf, k) in enumerate(prog):
        jumps = [labels[j] - at - 1 if isinstance(j, str) else j for j in (jt, jf)]
        assert all(0 <= j < 256 for j in jumps)
        out += struct.pack("<HBBI", code, jumps[0], jumps[1], k)
    return out


# ----------------------------------------------------------------- probe


async def probe_sandbox(
    settings: SandboxSettings, layout: Layout | None, cgroup_dirs: list[str]
) -> Sandbox:
    """Try, in a throw-away shim, each piece this host may refuse; build what works."""
    mountinfo = await trio.Path("/proc/self/mountinfo").read_text()
    prep = plan_prep(settings, mountinfo, cgroup_dirs)
    problems: list[str] = []
    if os.geteuid() != 0:
        result = {"namespaces": 1, "cgroupns": 1, "netns": 1}
        problems.append("jobd is not root, so it cannot create namespaces")
        result["seccomp"] = await _probe(prep, "seccomp")
    else:
        result = {step: await _probe(prep, step) for step in
                  ("namespaces", "cgroupns", "netns", "seccomp")}
    for step, err in result.items():
        if err and os.geteuid() == 0 or step == "seccomp" and err:
            problems.append(f"{step}: {os.strerror(err) if err > 0 else 'probe failed'}")
    namespaces = result["namespaces"] == 0
    cgroupns = namespaces and result["cgroupns"] == 0
    userns_blocked = prep["seccomp"] is not None and result["seccomp"] == 0
    if prep["seccomp"] is None and not settings.allow_user_namespaces:
        problems.append(f"no seccomp filter for {os.uname().machine}")
    if not userns_blocked:
        prep = {**prep, "seccomp": None}
    cgroup_mounts = plan_cgroup_mounts(mountinfo, layout, cgroupns=cgroupns)
    if not namespaces:
        prep = {**prep, "unshare": 0, "mounts": []}
    else:
        # Done by PID 1 while idle: /proc of the job's PID namespace; and, once a pooled
        # shim has joined its spare leaf, what a job's plan would do right after the join.
        joined = {"unshare": CLONE_NEWCGROUP if cgroupns else 0, "mounts": cgroup_mounts}
        prep = {**prep, "proc": True, "joined": joined}
    return Sandbox(
        settings,
        prep,
        cgroup_mounts,
        namespaces=namespaces,
        cgroupns=cgroupns,
        network_none=namespaces and result["netns"] == 0,
        userns_blocked=userns_blocked,
        problems=problems,
    )


async def _probe(prep: dict[str, object], step: str) -> int:
    """0 if the step works here, else its errno (-1: the probe itself failed)."""
    try:
        done = await trio.run_process(
            [sys.executable, "-I", "-S", _shim.__file__, "--probe", marshal.dumps(prep).hex(),
             step],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        answer: dict[str, int] = marshal.loads(bytes.fromhex(done.stdout.decode()))
        return answer[step]
    except (OSError, ValueError, EOFError, KeyError) as exc:
        log.warning("isolation probe %s failed: %s", step, exc)
        return -1
