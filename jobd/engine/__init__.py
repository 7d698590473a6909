"""The jobd engine: jobs, their cgroups and their output, owned by one trio nursery.

Imports only the standard library, trio and trio-util; it knows nothing of gRPC, TLS or the
command line (an import-linter contract in pyproject.toml keeps it so).
"""

from ._cgroup import Layout, Mode, detect_layout
from ._errors import (
    AlreadyExists,
    CgroupError,
    FailedPrecondition,
    InvalidArgument,
    JobdError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ._manager import EngineConfig, JobManager, open_job_manager
from ._records import JobPage
from ._statistics import EngineStatistics
from ._types import Chunk, EndReason, JobInfo, Limits, Network, State, Stream, Usage

__all__ = [
    "AlreadyExists",
    "CgroupError",
    "Chunk",
    "EndReason",
    "EngineConfig",
    "EngineStatistics",
    "FailedPrecondition",
    "InvalidArgument",
    "JobInfo",
    "JobManager",
    "JobPage",
    "JobdError",
    "Layout",
    "Limits",
    "Mode",
    "Network",
    "NotFound",
    "ResourceExhausted",
    "State",
    "Stream",
    "Unavailable",
    "Usage",
    "detect_layout",
    "open_job_manager",
]
