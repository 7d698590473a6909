"""An exclusive, non-blocking flock on a directory, held by an open descriptor: the kernel
drops it when the holder dies, so a crashed jobd never leaves a stale lock. Standard library
only.

    fd = lock_directory(path)      # None: someone else holds it
    ...
    os.close(fd)                   # releases it
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_directory(path: Path) -> int | None:
    """The locked descriptor, or None when another process holds the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
