"""The exec shim: joins the job's cgroup leaves, drops privileges, changes directory and execs
the command. Run as `python -I -S _shim.py SPEC ARGV...`; imports only the standard library.

Why a shim and not `preexec_fn`: CPython runs `preexec_fn` *after* the `user=` drop, so the
root-owned `cgroup.procs` can no longer be written, and `preexec_fn` is unsafe in a process
with threads. This program is single-threaded, never forks (the job's pid is the command's
pid), and is already inside the leaves when `execvp` runs, so the command and everything it
forks start inside them. Failure is reported as one JSON line on the status fd (close-on-exec,
so a successful exec leaves the parent reading a bare EOF).
"""

import errno
import json
import os
import signal
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
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
        stage, what = "chdir", spec["cwd"]
        os.chdir(spec["cwd"])
        # The Python runtime ignores SIGPIPE and SIGXFSZ; a command expects the defaults
        # (e.g. `yes | head` must end by SIGPIPE). Ignored dispositions survive exec.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        stage, what = "exec", argv[0]
        _execvp(argv)
    except OSError as exc:
        report = {"stage": stage, "what": what, "errno": exc.errno, "error": exc.strerror}
        os.write(status_fd, json.dumps(report).encode())
        os._exit(127)


def _execvp(argv: list[str]) -> None:
    """`os.execvp` without its imports (`-S` leaves `warnings` out): try each PATH entry,
    report the most telling error, as the shell does."""
    program = argv[0]
    if "/" in program:
        os.execv(program, argv)
    saved: OSError | None = None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execv(os.path.join(directory or ".", program), argv)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and saved is None:
                saved = exc
    raise saved or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


if __name__ == "__main__":
    main()
