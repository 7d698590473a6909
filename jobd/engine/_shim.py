"""The exec shim: joins the job's cgroup leaves, drops privileges, changes directory and execs
the command. Run as `python -I -S _shim.py CONTROL_FD STATUS_FD`; imports only the standard
library. It waits (possibly long: the server keeps a pool of them, `_shimpool.py`) for its
spec, one marshalled dict {procs, uid, gid, cwd, argv, env}, read to EOF from CONTROL_FD; an
empty read means the server has gone or shut down, and it exits.

Why a shim and not `preexec_fn`: CPython runs `preexec_fn` *after* the `user=` drop, so the
root-owned `cgroup.procs` can no longer be written, and `preexec_fn` is unsafe in a process
with threads. This program is single-threaded, never forks (the job's pid is the command's
pid), and is already inside the leaves when `execvp` runs, so the command and everything it
forks start inside them. Failure is reported as one marshalled dict on the status fd
(close-on-exec, so a successful exec leaves the parent reading a bare EOF).
"""

# Imports are the job's start latency: each costs the interpreter's boot time. marshal,
# errno and _signal are built in (no json: it pulls in re; no `signal`: it pulls in enum). An
# import after the privilege drop might not even be readable.
import _signal  # type: ignore[import-not-found]
import errno
import marshal
import os
import resource
import sys


def main() -> None:
    control_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    parts = []
    while chunk := os.read(control_fd, 65536):
        parts.append(chunk)
    os.close(control_fd)
    if not parts:
        os._exit(0)  # no job for us: the server shut down or died
    spec = marshal.loads(b"".join(parts))  # written by the server itself (_shimpool)
    argv, env = spec["argv"], spec["env"]
    stage = "cgroup"
    what = ""
    try:
        for procs in spec["procs"]:
            what = procs
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # pid 0: the writing process itself
            finally:
                os.close(fd)
        if spec["uid"] is not None:
            stage, what = "user", str(spec["uid"])
            os.setgroups([spec["gid"]])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        nofile = spec.get("nofile")
        if nofile:
            # The job's soft limit on open files: it inherited the server's, raised to the hard
            # limit. The hard limit is left alone, so a job that needs more may raise its own.
            stage, what = "rlimit", "RLIMIT_NOFILE"
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
        stage, what = "chdir", spec["cwd"]
        os.chdir(spec["cwd"])
        # The Python runtime ignores SIGPIPE and SIGXFSZ; a command expects the defaults
        # (e.g. `yes | head` must end by SIGPIPE). Ignored dispositions survive exec.
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
            _signal.signal(sig, _signal.SIG_DFL)
        stage, what = "exec", argv[0]
        _execvpe(argv, env)
    except OSError as exc:
        report = {"stage": stage, "what": what, "errno": exc.errno, "error": exc.strerror}
        os.write(status_fd, marshal.dumps(report))
        os._exit(127)


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


if __name__ == "__main__":
    main()
