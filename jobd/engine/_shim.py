"""The exec shim: puts a job into its cgroup leaves and namespaces, drops privileges, changes
directory and execs the command. Run as `python -I -S _shim.py CONTROL_FD STATUS_FD`; imports
only the standard library. It reads two marshalled messages from CONTROL_FD: at once its
*preparation* (length-prefixed: the namespaces and mounts no job decides, `_sandbox.py`, and
the leaves of a pooled shim, joined ahead), then,
possibly much later (the server keeps a pool of shims, `_shimpool.py`), its job's spec
(length-prefixed too): {procs, uid, gid, cwd, argv, env, sandbox}; then the server's go, one
byte, once the job's record is committed and its output files exist: nothing of the job runs
before it (the spec comes early, so that the shim has read it and prepared the call while the
server commits the record). An empty read means the server has gone, shut down or given up
the Start, and it exits.

Why a shim and not `preexec_fn`: CPython runs `preexec_fn` *after* the `user=` drop, so the
root-owned `cgroup.procs` can no longer be written, and `preexec_fn` is unsafe in a process
with threads. This program is single-threaded and is already inside the leaves before it
forks or execs anything, so everything of the job starts inside them.

Without namespaces it execs the command itself (the job's pid is the command's pid). With
them (theory of operation):
- while idle it unshares a PID namespace and forks its PID 1, which unshares a mount and
  IPC namespace and mounts the job's private tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock
  (no job chose anything yet: nothing of it runs), then waits for the spec;
- given the job, PID 1 joins the leaves (a pooled shim's PID 1 joined them while idle, at the
  end of its preparation), unshares a cgroup namespace (its root is the leaf
  just joined) and, for NETWORK_NONE, a network namespace with loopback up, mounts the
  job's own view of cgroupfs and forks the command (pid 2), which mounts a /proc of its
  namespace, drops privileges, sets no_new_privs and the seccomp filter, and execs;
- PID 1 reaps every orphan of the namespace; when the command ends it writes the command's
  wait status to the shim and exits, and the kernel kills whatever is left in the namespace;
- the shim (the server's child, outside the namespace and outside the job's cgroup) ends
  exactly as the command did: the same exit code, or the same signal raised on itself; if
  PID 1 dies without a word (the cgroup kill, the OOM killer) it dies of SIGKILL. So the
  server sees the command's own wait status (SIGKILL stays signal 9, never "exit 137").
  PID 1 dies with the shim (PR_SET_PDEATHSIG), so killing the shim kills the job.
The shim ignores SIGTERM, SIGINT and SIGHUP (without cgroups a Stop signals the process
group, the shim included: the command decides, the shim follows it).

Usually a shim is not booted but forked by the zygote (`_shim.py --zygote SOCK_FD`, see
`_zygote` below and `_zygote.py`): a copy of this program, booted once, whose clone(2) with
CLONE_PARENT makes each new shim the server's own child; from there it runs as above.

Failure is reported as one marshalled dict on the status fd (close-on-exec, so a successful
exec leaves the parent reading a bare EOF).
"""

# Imports are the job's start latency when the pool is empty: each costs the interpreter's
# boot time (ctypes ~7 ms, paid while the shim idles in the pool). marshal, errno and _signal
# are built in (no json: it pulls in re; no `signal`: it pulls in enum).
import _signal  # type: ignore[import-not-found]
import ctypes
import errno
import marshal
import os
import resource
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p)

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 22, 38, 2
CLONE_NEWPID, CLONE_NEWCGROUP = 0x20000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
SIOCSIFFLAGS, IFF_UP = 0x8914, 1
_POSIX_SPAWN_RESETIDS, _POSIX_SPAWN_SETSIGDEF = 0x01, 0x04
_LIBC_SIGNALS = (32, 33)  # SIGCANCEL and SIGSETXID of glibc's threads (below SIGRTMIN)
# Dispositions the shim changes for itself. The command gets every signal back as its default:
# ignored dispositions survive exec, and besides the shim's own and the Python runtime's
# (SIGPIPE, SIGXFSZ) the server may have inherited some from whatever started it (a shell's
# `jobd serve &` ignores SIGINT and SIGQUIT).
_IGNORED = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
_RESET = tuple(
    sig for sig in _signal.valid_signals() if sig not in (_signal.SIGKILL, _signal.SIGSTOP)
)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                    flags, data.encode() if data else None),
        target,
    )


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), "prctl")


def _install_seccomp(bpf: ctypes.Array[ctypes.c_char]) -> None:
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(bpf))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))


def _loopback_up() -> None:
    """`ip link set lo up` in a new network namespace: SIOCSIFFLAGS on an AF_INET socket."""
    sock = _libc.socket(2, 2 | 0o2000000, 0)  # AF_INET, SOCK_DGRAM | SOCK_CLOEXEC
    _check(0 if sock >= 0 else -1, "socket")
    try:
        # struct ifreq (40 bytes): the name, then the flags.
        ifreq = (b"lo".ljust(16, b"\0") + IFF_UP.to_bytes(2, "little")).ljust(40, b"\0")
        ifreq_buf = ctypes.create_string_buffer(ifreq, 40)
        _check(_libc.ioctl(sock, SIOCSIFFLAGS, ifreq_buf), "lo")
    finally:
        os.close(sock)


def _read_prep(fd: int) -> dict[str, object] | None:
    """The length-prefixed preparation message, or None at EOF (no server)."""
    head = b""
    while len(head) < 4:
        chunk = os.read(fd, 4 - len(head))
        if not chunk:
            return None
        head += chunk
    size, body = int.from_bytes(head, "little"), b""
    while len(body) < size:
        chunk = os.read(fd, size - len(body))
        if not chunk:
            return None
        body += chunk
    prep: dict[str, object] = marshal.loads(body)
    return prep


def _prepare(prep: dict[str, object], dirs: dict[str, int]) -> ctypes.Array[ctypes.c_char] | None:
    """What no job decides, done while idle: unshare, open jobd's cgroup dirs (into `dirs`),
    mounts, join a pooled shim's leaves; returns the built seccomp filter (kept alive until
    it is installed)."""
    flags = prep.get("unshare", 0)
    assert isinstance(flags, int)
    if flags:
        _unshare(flags)
    for path in prep.get("cgroup_dirs", ()):  # type: ignore[attr-defined]
        dirs[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for source, target, fstype, mflags, data in prep.get("mounts", ()):  # type: ignore[attr-defined]
        _mount(source, target, fstype, mflags, data)
    # A pooled shim's leaves (`_shimpool.py`): joined now, while idle, so that the join's
    # wait (the kernel's RCU grace period after an idle spell) is not paid by a Start. Then
    # what a job's PID 1 does once in its leaves, done now too: the cgroup namespace (its
    # root is the leaf just joined) and the job's view of cgroupfs (`joined`).
    _join({"procs": prep.get("join", ())}, dirs)
    joined = prep.get("joined")
    if prep.get("join") and isinstance(joined, dict):
        if joined["unshare"]:
            _unshare(joined["unshare"])
        for source, target, fstype, mflags, data in joined["mounts"]:
            _mount(source, target, fstype, mflags, data)
    if prep.get("proc"):  # PID 1 is in the job's PID namespace: /proc shows only the job's
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
    bpf = prep.get("seccomp")
    if isinstance(bpf, bytes) and bpf:
        return ctypes.create_string_buffer(bpf, len(bpf))
    return None


def _read_spec(control_fd: int) -> dict[str, object]:
    """The job's spec (length-prefixed, as the preparation); EOF (the server shut down or
    died) exits."""
    spec = _read_prep(control_fd)  # written by the server itself
    if spec is None:
        os._exit(0)
    return spec


def _await_go(control_fd: int) -> None:
    """Until the server's go (its one byte: the job's record and output exist), then the
    control pipe is done with; EOF (the Start failed or was given up, the server went) exits."""
    if os.read(control_fd, 1) != b"G":
        os._exit(0)
    os.close(control_fd)


def _join(spec: dict[str, object], dirs: dict[str, int]) -> None:
    """Into every leaf of the job: through the directories opened before cgroupfs was
    covered, where a leaf is under one of them."""
    for procs in spec["procs"]:  # type: ignore[attr-defined]
        parent = next((d for d in dirs if procs.startswith(d + "/")), None)
        if parent is None:
            fd = os.open(procs, os.O_WRONLY)
        else:
            fd = os.open(procs[len(parent) + 1:], os.O_WRONLY, dir_fd=dirs[parent])
        try:
            os.write(fd, b"0")  # pid 0: the writing process itself
        finally:
            os.close(fd)


def main() -> None:
    if sys.argv[1] == "--probe":
        _probe()
    if sys.argv[1] == "--zygote":
        _zygote(int(sys.argv[2]))
    _run(int(sys.argv[1]), int(sys.argv[2]))


def _run(control_fd: int, status_fd: int) -> None:
    """The shim's life, from its preparation to the job's exec (or its end); never returns."""
    os.set_inheritable(status_fd, False)
    for sig in _IGNORED:
        _signal.signal(sig, _signal.SIG_IGN)
    prep = _read_prep(control_fd)
    if prep is None:
        os._exit(0)  # no job for us: the server shut down or died
    flags = prep.get("unshare", 0)
    assert isinstance(flags, int)
    if not flags:
        _in_place(prep, control_fd, status_fd)
    # PID 1 of a new PID namespace (forked now, while idle) does the rest; this process, the
    # server's child outside the namespace and the job's cgroup, only relays how the
    # command ended, which PID 1 writes on `exit_w` as a 4-byte wait status.
    exit_r, exit_w = os.pipe()
    alive_r, alive_w = os.pipe()  # PID 1's way to see us alive (its getppid() is 0)
    init = -1
    try:
        _unshare(CLONE_NEWPID)
        init = os.fork()
    except OSError as exc:
        spec = _read_spec(control_fd)
        del spec
        _await_go(control_fd)
        _report(status_fd, "namespaces", "unshare", exc)
    if init == 0:
        os.close(exit_r)
        os.close(alive_w)
        _init(prep, flags & ~CLONE_NEWPID, control_fd, status_fd, exit_w, alive_r)
    for fd in (exit_w, alive_r, control_fd, status_fd):
        os.close(fd)
    _quiet_stdio()  # the job's pipes reach EOF when the job's own processes are gone
    data = b""
    while chunk := os.read(exit_r, 4 - len(data)):
        data += chunk
        if len(data) == 4:
            _end_like(int.from_bytes(data, "little"))
    # PID 1 died without a word: killed (the cgroup kill, the OOM killer), and the whole
    # namespace with it, the command too.
    _end_like(_signal.SIGKILL)


def _in_place(prep: dict[str, object], control_fd: int, status_fd: int) -> None:
    """No namespaces on this host: join the leaves and exec the command in this process."""
    failure: OSError | None = None
    try:
        bpf = _prepare({"seccomp": prep.get("seccomp"), "join": prep.get("join", ())}, {})
    except OSError as exc:
        failure, bpf = exc, None  # reported once there is a job to report it to
    spec = _read_spec(control_fd)
    _await_go(control_fd)
    try:
        if failure is not None:
            raise failure
        _join(spec, {})
    except OSError as exc:
        _report(status_fd, "cgroup", str(exc.filename), exc)
    _child(spec, status_fd, None, bpf)


def _init(
    prep: dict[str, object],
    flags: int,
    control_fd: int,
    status_fd: int,
    exit_w: int,
    alive_r: int,
) -> None:
    """PID 1 of the job's namespace: prepares them while idle; given the job, joins its
    leaves, forks the command, reaps every orphan and reports the command's end."""
    _prctl(PR_SET_PDEATHSIG, _signal.SIGKILL)
    os.set_blocking(alive_r, False)
    try:
        os.read(alive_r, 1)
        os._exit(0)  # EOF: the shim died before PR_SET_PDEATHSIG, so must we
    except BlockingIOError:
        os.close(alive_r)
    _set_name(b"jobd-init")
    failure: OSError | None = None
    bpf = None
    dirs: dict[str, int] = {}
    try:
        bpf = _prepare({**prep, "unshare": flags}, dirs)
    except OSError as exc:
        failure = exc  # reported once there is a job to report it to
    spawner = _Spawner(bpf) if failure is None else None
    spec = _read_spec(control_fd)
    # The call's arguments as C data now, while the server commits the job's record.
    prepared = spawner is not None and spawner.prepare(spec)
    _await_go(control_fd)
    stage, what = "namespaces", "unshare"
    try:
        if failure is not None:
            if str(failure.filename).endswith("cgroup.procs"):
                stage, what = "cgroup", str(failure.filename)  # the join ahead
            raise failure
        stage, what = "cgroup", "cgroup.procs"
        _join(spec, dirs)
        sandbox = spec["sandbox"]
        assert isinstance(sandbox, dict)
        stage, what = "namespaces", "unshare"
        if failure is None and prep.get("join") and prep.get("joined"):  # done while idle
            sandbox = {**sandbox, "unshare": sandbox["unshare"] & ~CLONE_NEWCGROUP, "mounts": []}
        if sandbox["unshare"]:
            _unshare(sandbox["unshare"])
        for source, target, fstype, mflags, data in sandbox["mounts"]:
            what = target
            _mount(source, target, fstype, mflags, data)
        if sandbox["loopback"]:
            what = "lo"
            _loopback_up()
        what = "fork"
        command = spawner.spawn() if spawner is not None and prepared else 0
        if spawner is not None and spawner.ready:
            bpf = None  # PID 1 has it, and so will the fork
        if not command:  # `_child` in a fork does it again, step by step, and says what failed
            command = os.fork()
            if command == 0:
                os.close(exit_w)
                _child(spec, status_fd, sandbox, bpf)
    except OSError as exc:
        os.write(exit_w, (127 << 8).to_bytes(4, "little"))
        _report(status_fd, stage, what, exc)
    os.close(status_fd)  # the command's exec closes the last copy: the server's verdict
    if spawner is not None and spawner.ready:
        spawner.settle()
    _quiet_stdio()
    while True:  # orphans of the namespace are ours to reap; the command is the one
        pid, status = os.waitpid(-1, 0)
        if pid == command:
            os.write(exit_w, status.to_bytes(4, "little"))
            os._exit(0)  # the kernel now kills whatever is left in the namespace


def _quiet_stdio() -> None:
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _child(
    spec: dict[str, object],
    status_fd: int,
    sandbox: dict[str, object] | None,
    bpf: ctypes.Array[ctypes.c_char] | None,
) -> None:
    """Become the job's command, or report why not and exit 127."""
    argv, env = spec["argv"], spec["env"]
    assert isinstance(argv, list) and isinstance(env, dict)
    stage = what = ""
    try:
        uid, gid = spec["uid"], spec["gid"]
        if uid is not None:
            assert isinstance(uid, int) and isinstance(gid, int)
            stage, what = "user", str(uid)
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
        nofile = spec.get("nofile")
        if nofile:
            # The job's soft limit on open files: it inherited the server's, raised to the hard
            # limit. The hard limit is left alone, so a job that needs more may raise its own.
            assert isinstance(nofile, int)
            stage, what = "rlimit", "RLIMIT_NOFILE"
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
        cwd = spec["cwd"]
        assert isinstance(cwd, str)
        stage, what = "chdir", cwd
        os.chdir(cwd)
        for sig in _RESET:
            _signal.signal(sig, _signal.SIG_DFL)
        stage, what = "privileges", "no_new_privs"
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if bpf is not None:
            what = "seccomp"
            _install_seccomp(bpf)
        stage, what = "exec", argv[0]
        _execvpe(argv, env)
    except OSError as exc:
        _report(status_fd, stage, what, exc)


class _Spawner:
    """PID 1 starts the command as `_child` would become it, but with posix_spawnp(3): a
    vfork, so neither a copy of this interpreter's address space nor its teardown at exec
    (a fork and exec of this process costs ~2-3 ms here; this ~0.3 ms). Made while PID 1
    idles: glibc's attributes, the no_new_privs bit and the seccomp filter (PID 1's own from
    then on: it never execs and makes no user namespace), and a rehearsal of the call's
    Python path (its first run after the fork copies the pages it writes). Where a part is
    refused, `ready` is false, and a Start takes the fork as before.

    What `_child` does after a fork is done here in PID 1 or in glibc's child: the signals
    the shim ignores back to their defaults (POSIX_SPAWN_SETSIGDEF); the soft RLIMIT_NOFILE
    in PID 1 (inherited), put back after the call; the job's uid and gid: PID 1 takes them as
    its *real* ids only (effective and saved stay root, so it keeps its capabilities) and
    the job's group as its groups, the child's POSIX_SPAWN_RESETIDS sets its effective ids to
    them and its exec copies those to its saved ids; PID 1 puts its own back as soon as the
    call returns; the working dir changed in the child as the job's user (addchdir_np runs
    after RESETIDS); the PATH search in the child. glibc's search stops at an error that
    `_execvpe` would pass over, and any failure at all returns 0: `_child`, forked, then
    does it all again step by step and reports the failing step, exactly as before.

    Between the command's exec and PID 1 putting its real uid back (a few syscalls of PID 1,
    which the vfork wakes as the exec replaces the child's memory), PID 1 shares the job's
    real uid: what a process may do to another of its own real uid, the job could do to PID
    1 then: not signal it (the kernel drops a signal from inside the namespace to its PID 1,
    which handles none), trace it, read its memory or set its rlimits (those need every id
    to match), but set its nice value, scheduling policy or CPU affinity; `settle` puts those
    back after the verdict."""

    def __init__(self, bpf: ctypes.Array[ctypes.c_char] | None) -> None:
        self.ready = False
        self._attr = ctypes.create_string_buffer(1024)  # posix_spawnattr_t (336 bytes)
        self._actions = ctypes.create_string_buffer(1024)  # posix_spawn_file_actions_t (80)
        self._pid = ctypes.c_int(0)
        # What `prepare` made for `spawn`: ids, limit, PATH, program, argv and envp.
        self._call: tuple[int | None, int | None, int, bytes, bytes, ctypes.Array[ctypes.c_char_p],
                          ctypes.Array[ctypes.c_char_p]] | None = None
        try:
            self._spawnp = _libc.posix_spawnp
            self._addchdir = _libc.posix_spawn_file_actions_addchdir_np  # glibc >= 2.29
        except AttributeError:
            return
        # Also glibc's own two signals, which its child would otherwise leave ignored through
        # the exec (the fork's command got them as defaults: the handlers of PID 1's libc,
        # reset by the exec); the set is built by hand, as sigaddset refuses those two.
        defaults = _sigset((*_RESET, *_LIBC_SIGNALS))
        if (_libc.posix_spawnattr_init(self._attr)
                or _libc.posix_spawnattr_setsigdefault(self._attr, defaults)
                or _libc.posix_spawn_file_actions_init(self._actions)):
            return
        try:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            if bpf is not None:
                _install_seccomp(bpf)
        except OSError:
            return  # (`_child` sets them, or reports why not)
        self.ready = True
        try:  # the rehearsal: PID 1's own ids and limit, and nothing spawned
            self._sched = (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0),
                           os.sched_getparam(0), os.sched_getaffinity(0))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if self._prepare(os.getuid(), os.getgid(), soft, ["true"], {}, "/"):
                self.spawn(rehearse=True)
        except OSError:
            self.ready = False

    def settle(self) -> None:
        """PID 1's nice value, scheduling policy and CPU affinity as they were while idle
        (see above); called once its ids are its own again."""
        nice, policy, param, cpus = self._sched
        with _IgnoreOSError():
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        with _IgnoreOSError():
            os.sched_setscheduler(0, policy, param)
        with _IgnoreOSError():
            os.sched_setaffinity(0, cpus)  # (fails if the host took a CPU away since)

    def prepare(self, spec: dict[str, object]) -> bool:
        """Make the call's arguments, environment and working dir C data for `spawn`, before
        the server's go (nothing here changes an id or starts a process). False: the fork
        instead (`_child` then does it all again)."""
        argv, env, uid, gid, cwd = spec["argv"], spec["env"], spec["uid"], spec["gid"], spec["cwd"]
        nofile = spec.get("nofile") or 0
        assert isinstance(argv, list) and isinstance(env, dict) and isinstance(cwd, str)
        assert isinstance(nofile, int)
        if uid is not None:
            assert isinstance(uid, int) and isinstance(gid, int)
        return self._prepare(uid, gid, nofile, argv, env, cwd)  # type: ignore[arg-type]

    def _prepare(
        self, uid: int | None, gid: int | None, nofile: int, argv: list[str],
        env: dict[str, str], cwd: str,
    ) -> bool:
        self._call = None
        try:
            args = [os.fsencode(arg) for arg in argv]
            envp = [os.fsencode(key) + b"=" + os.fsencode(value) for key, value in env.items()]
            path = os.fsencode(env.get("PATH", os.defpath))
            where = os.fsencode(cwd)
        except (TypeError, UnicodeError):
            return False
        if (not self.ready or not args or not args[0]
                or any(b"\0" in part for part in (*args, *envp, path, where))
                or any(not key or "=" in key for key in env)
                or self._addchdir(self._actions, where)):
            return False
        c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
        c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
        self._call = (uid, gid, nofile, path, args[0], c_argv, c_envp)
        return True

    def spawn(self, *, rehearse: bool = False) -> int:
        """The prepared command's pid, or 0 (`_child` in a fork then does it all again)."""
        call, self._call = self._call, None
        if call is None:
            return 0
        uid, gid, nofile, path, program, c_argv, c_envp = call
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        ids = os.getresuid()[0], os.getresgid()[0], os.getgroups()
        flags = _POSIX_SPAWN_SETSIGDEF | (_POSIX_SPAWN_RESETIDS if uid is not None else 0)
        pid = self._pid
        pid.value = 0
        try:
            os.putenv(b"PATH", path)  # the search in glibc's child reads it
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, limit[1]), limit[1]))
            if gid is not None and uid is not None:
                os.setgroups([gid])
                os.setresgid(gid, -1, -1)
                os.setresuid(uid, -1, -1)
            if _libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(flags)) or rehearse:
                return 0
            if self._spawnp(ctypes.byref(pid), program, self._actions, self._attr, c_argv, c_envp):
                pid.value = 0
        except OSError:
            pid.value = 0
        finally:
            # Failing here leaves PID 1 unfit to go on: `_init`'s handler reports it and
            # exits (the namespace dies with PID 1, and the command with it).
            os.setresuid(ids[0], -1, -1)
            os.setresgid(ids[1], -1, -1)
            os.setgroups(ids[2])
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            _libc.posix_spawn_file_actions_destroy(self._actions)
            _libc.posix_spawn_file_actions_init(self._actions)
        return pid.value


class _IgnoreOSError:  # (contextlib.suppress without importing contextlib: 7 ms)
    """Ignores an OSError in its block."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        return isinstance(value, OSError)


def _sigset(signals: tuple[int, ...]) -> ctypes.Array[ctypes.c_char]:
    """A sigset_t (1024 bits in unsigned longs) of `signals`, built by hand."""
    mask = sum(1 << (sig - 1) for sig in signals)
    word = ctypes.sizeof(ctypes.c_ulong)
    return ctypes.create_string_buffer(b"".join(
        (mask >> (8 * word * i) & (1 << 8 * word) - 1).to_bytes(word, sys.byteorder)
        for i in range(128 // word)
    ), 128)


def _report(status_fd: int, stage: str, what: str, exc: OSError) -> None:
    report = {"stage": stage, "what": what, "errno": exc.errno, "error": exc.strerror}
    os.write(status_fd, marshal.dumps(report))
    os._exit(127)


def _end_like(status: int) -> None:
    """Exit with the main child's code, or die of its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no core file of the shim itself
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(sig, _signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is to be ignored (it cannot kill)
    os._exit(os.waitstatus_to_exitcode(status))


def _execvpe(argv: list[str], env: dict[str, str]) -> None:
    """`os.execvpe` without its imports (`-S` leaves `warnings` out): try each entry of the
    job's PATH, report the most telling error, as the shell does."""
    program = argv[0]
    if "/" in program:
        os.execve(program, argv, env)
    saved: OSError | None = None
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execve(os.path.join(directory or ".", program), argv, env)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and saved is None:
                saved = exc
    raise saved or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


# ----------------------------------------------------------------- the zygote
# `_shim.py --zygote SOCK_FD`: one pre-booted copy of this program that forks new shims on
# request (`_zygote.py` is the server's side), each in ~1 ms instead of an interpreter boot.
CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
# Each shim's descriptors: its stdout and stderr (write ends), its control pipe (read end)
# and its status pipe (write end).
ZYGOTE_FDS = 4
# At most this many shims per request (4 descriptors each: the kernel passes up to 253).
ZYGOTE_BATCH = 32


def _zygote(sock_fd: int) -> None:
    """Serve fork requests on SOCK_FD (a SOCK_SEQPACKET unix socket to the server) until EOF
    (the server shut down or died). Each request is one byte per shim asked for and the
    four descriptors of each (SCM_RIGHTS); the answer is one message of the new shims' pids,
    4 bytes signed each (-errno for a fork that failed). Each shim is cloned with
    CLONE_PARENT, so it is the *server's* child, as a booted shim is: the server waits for
    it, signals it and reads its exact wait status itself, and the zygote's death loses
    nothing."""
    import _socket  # (`socket` pulls in enum and selectors)

    for sig in _IGNORED:
        _signal.signal(sig, _signal.SIG_IGN)
    sock = _socket.socket(fileno=sock_fd)
    libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the clone
    libc.syscall.restype = ctypes.c_long
    clone = _SYS_CLONE[os.uname().machine]  # elsewhere: dies before it is ready (no zygote)
    _set_name(b"jobd-zygote")  # its shims show as jobd-shim (their cmdline is the zygote's)
    sock.send(b"R")  # booted: ready for requests
    cmsg_size = _socket.CMSG_SPACE(ZYGOTE_BATCH * ZYGOTE_FDS * 4)
    while True:
        message, ancdata, flags, _address = sock.recvmsg(
            ZYGOTE_BATCH, cmsg_size, _socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
                        for i in range(0, len(data) - len(data) % 4, 4)]
        if not message:
            os._exit(0)
        if len(fds) == len(message) * ZYGOTE_FDS and not flags & _socket.MSG_CTRUNC:
            pids = [_fork_one(libc, clone, sock, fds, i) for i in range(len(message))]
        else:
            pids = [-errno.EINVAL] * len(message)
            for fd in fds:
                os.close(fd)
        sock.send(b"".join(pid.to_bytes(4, sys.byteorder, signed=True) for pid in pids))


def _fork_one(libc: ctypes.CDLL, clone: int, sock: object, fds: list[int], i: int) -> int:
    """Clone the request's i-th shim (its descriptors `fds[4i:4i+4]`); its pid or -errno.
    Our copies of its descriptors are closed at once, so that the next shims of the request
    do not inherit them; the shim closes those of the next ones."""
    own = fds[ZYGOTE_FDS * i:ZYGOTE_FDS * (i + 1)]
    _set_name(b"jobd-shim")  # the child's name from its first instant
    try:
        pid = _clone_parent(libc, clone)
    except OSError as exc:
        pid = -(exc.errno or errno.EAGAIN)
    if pid == 0:
        _forked(sock, own, fds[ZYGOTE_FDS * (i + 1):])
    _set_name(b"jobd-zygote")
    for fd in own:
        os.close(fd)
    return pid


def _set_name(name: bytes) -> None:
    buf = ctypes.create_string_buffer(name)
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def _clone_parent(libc: ctypes.CDLL, clone: int) -> int:
    """`os.fork()` with CLONE_PARENT: the same steps around the fork (PyOS_BeforeFork: the
    import lock, at-fork hooks; in the child PyOS_AfterFork_Child: a new GIL, thread and
    signal state), then a raw clone(2), made with the GIL held in this single-threaded
    process. Skipped from glibc's fork(): its at-fork handlers and lock resets (no other
    thread can hold a lock here) and the child's cached tid in its thread block (glibc
    asks the kernel for the tid where it signals itself)."""
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    zero = ctypes.c_long(0)
    pid = int(libc.syscall(ctypes.c_long(clone), ctypes.c_long(CLONE_PARENT | _signal.SIGCHLD),
                           zero, zero, zero, zero))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err), "clone")
    return pid


def _forked(sock: object, fds: list[int], others: list[int]) -> None:
    """The zygote's child becomes a shim as `_shimpool.spawn_shim` starts one: a session of
    its own, its pipes `fds` as stdout and stderr, stdin /dev/null (the zygote's), none of
    the zygote's descriptors (`others`, the next shims' of the same request, are closed: an
    idle shim holding another shim's pipes would keep that shim's output and status pipes
    from ever reaching EOF; the rest are close-on-exec). Never returns."""
    try:
        sock.close()  # type: ignore[attr-defined]
        for fd in others:
            os.close(fd)
        os.setsid()
        stdout, stderr, control, status = fds
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        _run(control, status)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # on the job's stderr, as a booted shim would
    os._exit(1)


def _probe() -> None:
    """`_shim.py --probe PREP_HEX STEP`: try one step in a child (the preparation, a cgroup
    or network namespace, the seccomp filter); print {step: errno or 0} marshalled, in hex."""
    prep = marshal.loads(bytes.fromhex(sys.argv[2]))
    name = sys.argv[3]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if name == "namespaces":
                _prepare({**prep, "seccomp": None}, {})
            elif name == "cgroupns":
                _unshare(0x02000000)
            elif name == "netns":
                _unshare(0x40000000)
                _loopback_up()
            elif name == "seccomp":
                _install_probe(prep.get("seccomp"))
        except OSError as exc:
            code = exc.errno or 1
        os.write(w, str(code).encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 64)
    os.waitpid(pid, 0)
    os.write(1, marshal.dumps({name: int(answer or b"-1")}).hex().encode())
    os._exit(0)


def _install_probe(bpf: object) -> None:
    if not isinstance(bpf, bytes):
        return
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _install_seccomp(ctypes.create_string_buffer(bpf, len(bpf)))
    if _libc.unshare(0x10000000) == 0:  # CLONE_NEWUSER must now fail
        raise OSError(errno.EEXIST, "the filter let unshare(CLONE_NEWUSER) through")


if __name__ == "__main__":
    main()
