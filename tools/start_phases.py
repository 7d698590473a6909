"""Where a Start's time goes (a measurement, not a test): an engine in this process starts N
`true` jobs, back to back or GAP seconds apart, and each phase of `JobManager.start` is timed
by wrapping the engine's own functions (the record's durable write, the leaf, the output
files, handing the spec to the shim, the shim's verdict). Prints the median and mean of each
phase, the first 3 Starts left out. Needs root (real cgroups).

    sudo .venv/bin/python tools/start_phases.py --starts 40 --gap 0.15
    sudo .venv/bin/python tools/start_phases.py --starts 80          # back to back
    sudo .venv/bin/python tools/start_phases.py --starts 150 --concurrent 50 --gap 0.3  # waves
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from jobd.engine import (
    EngineConfig,
    _cgroup,
    _manager,
    _records,
    _retention,
    _shimpool,
    open_job_manager,
)

WARM_UP = 3
TIMES: dict[str, list[float]] = collections.defaultdict(list)


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace `owner.name` by a wrapper that adds each call's duration to TIMES[label]."""
    real: Callable[..., Any] = getattr(owner, name)
    if inspect.iscoroutinefunction(real):

        @functools.wraps(real)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await real(*args, **kwargs)
            finally:
                TIMES[label].append(time.perf_counter() - began)

        setattr(owner, name, timed_async)
    else:

        @functools.wraps(real)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                TIMES[label].append(time.perf_counter() - began)

        setattr(owner, name, timed)


PHASES = (
    (_manager.JobManager, "start", "Start, in all"),
    (_records.Records, "write_durably", "record committed (worker thread)"),
    (_manager.JobManager, "_leaf_for", "leaf: spare's limits, or a new leaf"),
    (_cgroup.JobCgroup, "create", "leaf created (also the pool's spares)"),
    (_retention.OutputSpace, "create", "output dir and files created"),
    (_shimpool.ShimPool, "take", "pool take"),
    (_shimpool.ShimPool, "new_shim", "new shim (zygote's fork, or a boot)"),
    (_shimpool.Shim, "hand", "spec handed to the shim"),
    (_shimpool.Shim, "verdict", "shim's verdict (joined, exec'd)"),
)


async def _run(starts: int, gap: float, prefix: str, concurrent: int) -> None:
    with tempfile.TemporaryDirectory(prefix="jobd-start-phases-") as tmp:
        first = 3_000_000 + secrets.randbelow(1_000_000) * 1000
        config = EngineConfig(
            data_dir=Path(tmp) / "data",
            cgroup_name=f"{prefix}-{secrets.token_hex(4)}",
            job_uids=(first, first + 999),
            uid_registry=Path(tmp) / "uid-ranges",
        )
        async with open_job_manager(config) as engine:
            if concurrent <= 1:
                for _ in range(starts):
                    await engine.start("alice", ["true"])
                    await trio.sleep(gap)
                return
            waves: list[float] = []
            idle: list[int] = []
            for _ in range(max(1, starts // concurrent)):
                pool = engine._shims
                idle.append(pool.idle_count.value if pool is not None else 0)
                began = time.perf_counter()
                async with trio.open_nursery() as wave:
                    for _ in range(concurrent):
                        wave.start_soon(engine.start, "alice", ["true"])
                waves.append(time.perf_counter() - began)
                await trio.sleep(gap)
            print("waves (ms):", " ".join(f"{w * 1e3:.0f}" for w in waves),
                  "; idle shims at each wave:", " ".join(map(str, idle)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between Starts")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="Starts at once per wave (waves GAP seconds apart)")
    parser.add_argument("--cgroup-prefix", default="jobd-start-phases",
                        help="the engine's cgroup tree is named PREFIX-<random>")
    parser.add_argument("--pool", type=int, default=0,
                        help="the shim pool's size (default: the engine's own)")
    args = parser.parse_args(argv)
    if args.pool:
        init = _shimpool.ShimPool.__init__
        _shimpool.ShimPool.__init__ = functools.partialmethod(  # type: ignore[method-assign,assignment]
            init, size=args.pool)
    for owner, name, label in PHASES:
        if hasattr(owner, name):  # (an older engine may lack a phase)
            _timed(owner, name, label)
    trio.run(_run, args.starts, args.gap, args.cgroup_prefix, args.concurrent)
    for _owner, _name, label in PHASES:
        values = TIMES.get(label, [])[WARM_UP:]
        if values:
            print(f"{label:40s} p50 {statistics.median(values) * 1e3:7.2f} ms"
                  f"  mean {statistics.mean(values) * 1e3:7.2f} ms  n={len(values)}")


if __name__ == "__main__":
    main()
