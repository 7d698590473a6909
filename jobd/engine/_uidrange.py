"""The host-wide registry of job uid ranges, so that two jobd servers never share a uid (a
job of one could then signal or read the files of a job of the other). Standard library only.

The registry is a directory (default /run/jobd/uid-ranges, a tmpfs: it starts empty at boot)
with one file per running server, named FIRST-LAST, which that server holds flocked while it
runs: the kernel drops the lock when the server dies, however it dies. Claiming a range takes
the registry's own lock, removes the files whose lock can be taken (their server is gone),
refuses a range that overlaps a held one, then creates and locks its own file.

    fd = claim_uid_range(Path("/run/jobd/uid-ranges"), (1_000_000, 1_999_999), data_dir)
    ...
    release_uid_range(registry, span, fd)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ._errors import JobdError


def _parse(name: str) -> tuple[int, int] | None:
    first, sep, last = name.partition("-")
    if sep and first.isdigit() and last.isdigit():
        return int(first), int(last)
    return None


def claim_uid_range(registry: Path, span: tuple[int, int], data_dir: Path) -> int:
    """Register `span` for this process; the held descriptor (close it via release)."""
    registry.mkdir(parents=True, exist_ok=True, mode=0o755)
    lock = os.open(registry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for microseconds by whoever has it
        for entry in registry.iterdir():
            other = _parse(entry.name)
            if other is None:
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if other[0] <= span[1] and span[0] <= other[1]:
                        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                        raise JobdError(
                            f"--job-uids {span[0]}-{span[1]} overlaps {other[0]}-{other[1]} "
                            f"of the jobd running on this host ({owner or 'unknown'}); give "
                            "this server a --job-uids range of its own"
                        ) from None
                    continue
                entry.unlink(missing_ok=True)  # its server is gone
            finally:
                os.close(fd)
        path = registry / f"{span[0]}-{span[1]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"pid {os.getpid()}, --data-dir {data_dir}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(lock)


def release_uid_range(registry: Path, span: tuple[int, int], fd: int) -> None:
    try:
        (registry / f"{span[0]}-{span[1]}").unlink(missing_ok=True)
    finally:
        os.close(fd)
