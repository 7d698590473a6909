"""The engine's one exception tree. Messages are for people: they say what is wrong and,
where there is one, the fix. The server maps each class to a gRPC status in one place."""

from __future__ import annotations

import errno


class JobdError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidArgument(JobdError):
    """The request cannot be carried out as given; nothing was created or changed."""


class NotFound(JobdError):
    """No job has this id."""


class Unavailable(JobdError):
    """The engine is shutting down and takes no new work."""


class CgroupError(JobdError):
    """cgroups are missing, unusable, or not writable by this process."""


class ResourceExhausted(JobdError):
    """A quota, or the data dir, cannot take more; the message names which and the fix."""


class FailedPrecondition(JobdError):
    """The job is not in a state that allows this (e.g. removing one that still runs)."""


class AlreadyExists(JobdError):
    """The name is taken (a job name is unique among its owner's kept jobs)."""


def exhausted(what: str, exc: OSError) -> JobdError:
    """An OSError on a Start: RESOURCE_EXHAUSTED naming the cause when the host ran out of
    something; else a server failure that says what failed."""
    causes = {
        errno.EMFILE: "jobd has too many open files (raise its LimitNOFILE / ulimit -n)",
        errno.ENFILE: "the host has too many open files (fs.file-max)",
        errno.ENOSPC: "no space or inodes left on the data dir's filesystem",
        errno.EDQUOT: "the data dir's disk quota is exhausted",
        errno.ENOMEM: "the host is out of memory",
        errno.EAGAIN: "the host cannot create more processes or threads now",
    }
    cause = causes.get(exc.errno or 0)
    if cause is None:
        return JobdError(f"cannot {what}: {exc}")
    return ResourceExhausted(f"cannot {what}: {cause} ({exc.strerror})")
