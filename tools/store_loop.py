"""How long the event loop is held by the job store (a measurement, not a test): an engine in
this process runs N `true` jobs, C at a time, while a trio Instrument times every step of the
store's writer task (queueing, its commits on the loop's thread or dispatch to a worker
thread, waking the waiters) and the commits are timed apart.

    sudo .venv/bin/python tools/store_loop.py --jobs 2000
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from jobd.engine import EngineConfig, _store, open_job_manager


class _StepTimer(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self.others: list[float] = []
        self._began = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._began
        (self.steps if task.name.endswith("Records.run") else self.others).append(took)


async def _run(jobs: int, concurrency: int, timer: _StepTimer) -> None:
    commits: list[float] = []
    apply = _store.Store.apply

    def timed(self: _store.Store, ops: Sequence[_store.Op], *, wait: bool = True) -> None:
        t = time.perf_counter()
        apply(self, ops, wait=wait)
        commits.append(time.perf_counter() - t)

    _store.Store.apply = timed  # type: ignore[method-assign]
    first = 2_000_000_000 + secrets.randbelow(100_000) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig(
            data_dir=Path(tmp) / "data", cgroup_name=f"jobd-storeloop-{secrets.token_hex(4)}",
            job_uids=(first, first + 999), uid_registry=Path(tmp) / "uids",
        )  # fmt: skip
        async with open_job_manager(config) as engine:
            trio.lowlevel.add_instrument(timer)
            began = time.perf_counter()
            limit = trio.Semaphore(concurrency)

            async def one() -> None:
                async with limit:
                    job = await engine.start("alice", ["true"])
                    await engine.wait(job.id)

            async with trio.open_nursery() as nursery:
                for _ in range(jobs):
                    await limit.acquire()
                    limit.release()
                    nursery.start_soon(one)
            took = time.perf_counter() - began
            trio.lowlevel.remove_instrument(timer)
    steps = sorted(timer.steps)
    print(f"{jobs} jobs in {took:.1f} s; {len(commits)} commits (batches) for {2 * jobs} writes")
    print(
        f"writer task steps on the event loop: {len(steps)}, median "
        f"{statistics.median(steps) * 1e6:.0f} us, p99 {steps[int(len(steps) * 0.99)] * 1e6:.0f}"
        f" us, max {steps[-1] * 1e6:.0f} us"
    )
    others = sorted(timer.others)
    print(
        f"every other task's steps, for comparison (machine load, GIL): median "
        f"{statistics.median(others) * 1e6:.0f} us, p99 {others[int(len(others) * 0.99)] * 1e6:.0f}"
        f" us, max {others[-1] * 1e6:.0f} us"
    )
    commits.sort()
    print(
        f"commits in the worker thread: median {statistics.median(commits) * 1e3:.2f} ms, "
        f"max {commits[-1] * 1e3:.2f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    trio.run(_run, args.jobs, args.concurrency, _StepTimer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
