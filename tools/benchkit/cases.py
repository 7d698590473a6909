"""The seven benchmark sections. Each measures jobd and its baseline in the same run,
alternating, `repeats` times, and returns rows holding the medians, the ratio (median of the
per-repeat ratios) and the target verdict."""

from __future__ import annotations

import os
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .env import (
    Jobd,
    cpu_seconds,
    open_jobd,
    open_peer,
    open_sync_peer,
    proc_status,
    reset_peak_rss,
    run_workers,
)

MiB = 1024 * 1024
MB = 1e6


@dataclass(frozen=True)
class Sizes:
    repeats: int
    stream_bytes: int
    seq_n: int
    fanout_bytes: int
    starts: int
    unary_seconds: float
    scale_jobs: int
    status_calls: int
    list_calls: int
    stop_repeats: int
    memory_bytes: int
    fanouts: tuple[int, ...] = (1, 10, 100)
    # The one reader (the fan-out's baseline) takes 64 MiB in ~0.3 s and swung 2x between
    # repeats: each repeat measures it this many times and takes the median.
    fanout_one_runs: int = 3
    tree: int = 200


FULL = Sizes(
    repeats=3, stream_bytes=512 * MiB, seq_n=120_000_000, fanout_bytes=64 * MiB, starts=200,
    unary_seconds=5.0, scale_jobs=1000, status_calls=1000, list_calls=50, stop_repeats=3,
    memory_bytes=2048 * MiB,
)  # fmt: skip
QUICK = Sizes(
    repeats=1, stream_bytes=64 * MiB, seq_n=10_000_000, fanout_bytes=16 * MiB, starts=20,
    unary_seconds=2.0, scale_jobs=100, status_calls=200, list_calls=20, stop_repeats=1,
    memory_bytes=256 * MiB,
)  # fmt: skip


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    samples: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ctx:
    workdir: Path
    certs: Path
    sizes: Sizes
    log: Callable[[str], None]

    def client(self, target: str, **more: Any) -> dict[str, Any]:
        return {"target": target, "certs": str(self.certs), **more}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def mbps(r: dict[str, float]) -> float:
    return r["bytes"] / (r["t1"] - r["t0"]) / MB


async def start_job(ctx: Ctx, target: str, command: list[str]) -> str:
    [ids] = await run_workers(
        "start_many", [ctx.client(target, command=command, n=1, concurrency=1)]
    )
    job_id: str = ids[0]
    return job_id


# ------------------------------------------------------------------ 1. stream throughput


async def stream(ctx: Ctx) -> list[Row]:
    """Start + follow of one command to its end, sync grpcio client: jobd against the trio pipe
    (A), the sync grpcio peer sending messages of up to 1 MiB (S, issue 12's baseline) and the
    grpc.aio peer (B), alternating in each repeat."""
    z = ctx.sizes
    commands = {
        "head -c": ["head", "-c", str(z.stream_bytes), "/dev/zero"],
        "seq": ["seq", "1", str(z.seq_n)],
    }
    rows = []
    async with open_jobd(ctx.workdir, ctx.certs) as jobd, open_peer(ctx.certs) as peer, \
            open_sync_peer(ctx.certs) as speer:  # fmt: skip
        for name, command in commands.items():
            rates: dict[str, list[float]] = {"A": [], "S": [], "B": [], "jobd": []}
            for i in range(z.repeats):
                got = {
                    "A": (await run_workers("pipe", [{"command": command}]))[0],
                    "S": (await run_workers(
                        "s_stream", [ctx.client(speer.target, command=command)]))[0],
                    "jobd": (await run_workers(
                        "s_stream", [ctx.client(jobd.target, command=command)]))[0],
                    "B": (await run_workers(
                        "s_stream", [ctx.client(peer.target, command=command)]))[0],
                }  # fmt: skip
                if len({r["bytes"] for r in got.values()}) != 1:
                    raise AssertionError(f"byte counts differ: {got}")
                for who, r in got.items():
                    rates[who].append(mbps(r))
                rj = got["jobd"]
                ctx.log(
                    f"stream {name} #{i}: jobd {rates['jobd'][-1]:.0f} MB/s "
                    f"({rj['messages']} msgs, biggest {rj['biggest']}), "
                    f"sync peer {rates['S'][-1]:.0f} ({got['S']['messages']} msgs), "
                    f"pipe {rates['A'][-1]:.0f}, grpc.aio {rates['B'][-1]:.0f}"
                )
            size = f"{got['A']['bytes'] / MiB:.0f} MiB"
            j = rates["jobd"]
            for who, label, target, need in (
                ("S", "S: sync grpcio 1 MiB", ">= 1.2x S", 1.2),
                ("A", "A: trio pipe", "", None),
                ("B", "B: grpc.aio 64 KiB", "", None),
            ):
                base = rates[who]
                ratio = median([x / y for x, y in zip(j, base, strict=True)])
                rows.append(Row(
                    "1 stream", f"{name} {size}: jobd vs {label.split(':')[1].strip()}",
                    median(j), "MB/s", median(base), label, ratio, target,
                    None if need is None else ratio >= need, [j, base],
                ))  # fmt: skip
    return rows


# ------------------------------------------------------------------ 2. fan-out


async def fanout(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    command = ["head", "-c", str(z.fanout_bytes), "/dev/zero"]
    agg: dict[int, list[float]] = {n: [] for n in z.fanouts}
    slow: dict[int, list[float]] = {n: [] for n in z.fanouts}
    first_one: list[float] = []  # each repeat's first one-reader run alone (before round 5)
    # The server's CPU per MiB sent: its own cost, apart from the ratio, which on a small
    # machine also measures the followers' client processes sharing its cores.
    cost: dict[int, list[float]] = {n: [] for n in z.fanouts}
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
        for i in range(z.repeats):
            for n in z.fanouts:
                procs = min(n, 4)
                per = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
                argsets = [ctx.client(jobd.target, job_id="", n=k) for k in per]

                async def new_job() -> str:
                    return await start_job(ctx, jobd.target, command)

                runs = z.fanout_one_runs if n == 1 else 1
                rates, slows, costs = [], [], []
                for _ in range(runs):
                    # Each run starts with the previous runs' output written back: a 64 MiB
                    # job's writeback slowed the next one-reader run (first runs 10-40%
                    # faster than the two after them), which flattered the ratio.
                    await trio.to_thread.run_sync(os.sync)
                    cpu0 = cpu_seconds(jobd.pid)
                    results = [
                        r
                        for rs in await run_workers("follow", argsets, before_go=new_job)
                        for r in rs
                    ]
                    total = sum(r["bytes"] for r in results)
                    costs.append((cpu_seconds(jobd.pid) - cpu0) * 1000 / (total / MiB))
                    if total != n * z.fanout_bytes:
                        raise AssertionError(f"{n} followers got {total} bytes: {results[:3]}")
                    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
                    rates.append(total / span / MB)
                    slows.append(min(mbps(r) for r in results))
                if n == 1:
                    first_one.append(rates[0])
                agg[n].append(median(rates))
                slow[n].append(median(slows))
                cost[n].append(median(costs))
                ctx.log(
                    f"fan-out {n} #{i}: aggregate {agg[n][-1]:.0f} MB/s "
                    f"({', '.join(f'{r:.0f}' for r in rates)}), "
                    f"slowest {slow[n][-1]:.1f} MB/s, server CPU {cost[n][-1]:.2f} ms/MiB"
                )
    rows = []
    one = agg[z.fanouts[0]]
    for n in z.fanouts:
        ratio = median([x / y for x, y in zip(agg[n], one, strict=True)])
        rows.append(Row(
            "2 fan-out", f"{n} follower(s) of one {z.fanout_bytes // MiB} MiB job: aggregate",
            median(agg[n]), "MB/s", median(one), "1 reader", ratio,
            ">= 0.8x 1 reader" if n == 100 else "", ratio >= 0.8 if n == 100 else None, agg[n],
        ))  # fmt: skip
        rows.append(Row(
            "2 fan-out", f"{n} follower(s): slowest reader", median(slow[n]), "MB/s",
            samples=slow[n],
        ))  # fmt: skip
        rows.append(Row(
            "2 fan-out", f"{n} follower(s): server CPU per MiB sent (incl. the job's start)",
            median(cost[n]), "ms/MiB", samples=cost[n],
        ))  # fmt: skip
    # The same 100 followers against each repeat's first one-reader run alone, the baseline
    # before round 5, side by side: the median of runs must not be what moves the ratio.
    last = z.fanouts[-1]
    rows.append(Row(
        "2 fan-out", f"{last} follower(s) vs the first 1-reader run alone (before round 5)",
        median(agg[last]), "MB/s", median(first_one), "1 reader, 1 run",
        median([x / y for x, y in zip(agg[last], first_one, strict=True)]), samples=first_one,
    ))  # fmt: skip
    return rows


# ------------------------------------------------------------------ 3. start latency

START_MODES: dict[str, dict[str, Any]] = {  # name: s_starts arguments besides n
    "back to back": {},
    "150 ms apart": {"gap": 0.15},
    "50 concurrent": {"concurrent": 50},
}


async def start_latency(ctx: Ctx) -> list[Row]:
    """Start of `true` with the sync client, jobd against the sync grpcio peer (Popen of
    sh -c '...; exec setpriv ...'), alternating in each repeat; the trio spawn for scale."""
    z = ctx.sizes
    command = ["true"]
    counts = {
        "back to back": z.starts, "150 ms apart": z.starts // 4, "50 concurrent": 50 * z.repeats,
    }  # fmt: skip
    lat: dict[str, dict[str, list[list[float]]]] = {m: {"jobd": [], "S": []} for m in START_MODES}
    spawn: list[float] = []
    warm: dict[int, list[float]] = {0: [], 2: []}  # p50s with a booted shim waiting, by network
    async with open_jobd(ctx.workdir, ctx.certs) as jobd, open_sync_peer(ctx.certs) as speer:
        targets = {"jobd": jobd.target, "S": speer.target}
        for i in range(z.repeats):
            [sp] = await run_workers("spawn", [{"command": command, "n": z.starts}])
            spawn += sp
            for mode, extra in START_MODES.items():
                for who in ("S", "jobd"):
                    [got] = await run_workers("s_starts", [
                        ctx.client(targets[who], command=command, n=counts[mode], **extra)
                    ])  # fmt: skip
                    lat[mode][who].append(got)
                ctx.log(
                    f"start {mode} #{i}: jobd p50 {median(lat[mode]['jobd'][-1]) * 1e3:.2f} ms, "
                    f"sync peer {median(lat[mode]['S'][-1]) * 1e3:.2f} ms"
                )
            # With an untimed pause between starts the pool always has a booted shim: what a
            # Start itself costs, on the host network and in a network namespace of its own.
            for network in warm:
                [got] = await run_workers("starts", [ctx.client(
                    jobd.target, command=command, n=z.starts // 4, pause=0.05, network=network)])
                warm[network].append(median(got))
    rows = []
    for mode in START_MODES:
        j, p = lat[mode]["jobd"], lat[mode]["S"]
        for q, target, need in ((50, "<= 1.0x S", 1.0), (99, "<= 1.5x S", 1.5)):
            ratios = [pct(x, q) / pct(y, q) for x, y in zip(j, p, strict=True)]
            ratio = median(ratios)
            rows.append(Row(
                "3 start", f"Start p{q}, {mode} ({counts[mode]} x {z.repeats})",
                median([pct(x, q) for x in j]) * 1e3, "ms",
                median([pct(x, q) for x in p]) * 1e3, "S: Popen sh+setpriv", ratio, target,
                ratio <= need, ratios,
            ))  # fmt: skip
    rows.append(Row("3 start", "Start p50, warm shim pool", median(warm[0]) * 1e3, "ms"))
    rows.append(Row("3 start", "Start p50, warm pool, NETWORK_NONE", median(warm[2]) * 1e3, "ms",
                    median(warm[0]) * 1e3, "same, host network"))  # fmt: skip
    rows.append(Row("3 start", "trio open_process spawn p50 (for scale)",
                    median(spawn) * 1e3, "ms"))  # fmt: skip
    return rows


# ------------------------------------------------------------------ 4. unary rate


async def unary(ctx: Ctx) -> list[Row]:
    """Status of an ended job: sync client on one connection (back to back, and 4 threads) vs
    the sync grpcio peer; the grpc.aio client on 8 connections vs the grpc.aio peer."""
    z = ctx.sizes
    # shape: (worker, baseline, processes, argument overrides)
    shapes: dict[str, tuple[str, str, int, dict[str, Any]]] = {
        "1 connection, back to back": ("s_unary", "S", 1, {"concurrency": 1}),
        "1 connection, 4 threads": ("s_unary", "S", 1, {"concurrency": 4}),
        "8 connections (aio, 4 in flight each)": ("unary", "B", 2, {"conns": 4, "concurrency": 4}),
    }
    rates: dict[str, dict[str, list[float]]] = {s: {"jobd": [], "base": []} for s in shapes}
    async with open_jobd(ctx.workdir, ctx.certs) as jobd, open_peer(ctx.certs) as peer, \
            open_sync_peer(ctx.certs) as speer:  # fmt: skip
        targets = {"jobd": jobd.target, "B": peer.target, "S": speer.target}
        # An ended job: its Status is the RPC stack plus a lookup, as the peers' is.
        ids = {who: await start_job(ctx, t, ["true"]) for who, t in targets.items()}
        await trio.sleep(0.5)
        for i in range(z.repeats):
            for shape, (kind, base, procs, extra) in shapes.items():
                for who, key in ((base, "base"), ("jobd", "jobd")):
                    args = ctx.client(
                        targets[who], job_id=ids[who], seconds=z.unary_seconds, warmup=0.5,
                        **{"conns": 1, **extra},
                    )  # fmt: skip
                    results = await run_workers(kind, [args] * procs)
                    rates[shape][key].append(sum(r["calls"] / r["seconds"] for r in results))
                ctx.log(
                    f"unary {shape} #{i}: jobd {rates[shape]['jobd'][-1]:.0f}/s, "
                    f"{base} {rates[shape]['base'][-1]:.0f}/s"
                )
    rows = []
    for shape, (_, base, _, _) in shapes.items():
        j, p = rates[shape]["jobd"], rates[shape]["base"]
        ratio = median([x / y for x, y in zip(j, p, strict=True)])
        target = ">= 0.8x S" if base == "S" else ""
        rows.append(Row(
            "4 unary", f"Status calls/s, {shape}", median(j), "calls/s", median(p),
            "S: sync grpcio" if base == "S" else "B: grpc.aio", ratio, target,
            ratio >= 0.8 if base == "S" else None, [j, p],
        ))  # fmt: skip
    return rows


# ------------------------------------------------------------------ 5. scale


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _latencies(ctx: Ctx, jobd: Jobd, method: str, job_id: str, n: int) -> list[float]:
    [lat] = await run_workers(
        "latency", [ctx.client(jobd.target, method=method, job_id=job_id, n=n)]
    )
    result: list[float] = lat
    return result


async def scale(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    command = ["sleep", "3600"]
    # One user's 1000 jobs: past the default --max-jobs-per-user 100.
    async with open_jobd(ctx.workdir, ctx.certs, "--max-jobs-per-user", "0") as jobd:
        first = await start_job(ctx, jobd.target, command)
        idle_status = await _latencies(ctx, jobd, "Status", first, z.status_calls)
        idle_list = await _latencies(ctx, jobd, "List", first, z.list_calls)
        await trio.sleep(0.5)
        rss0, fds0 = jobd.rss(), _fds(jobd.pid)
        n = z.scale_jobs - 1
        with trio.fail_after(600):
            await run_workers(
                "start_many", [ctx.client(jobd.target, command=command, n=n, concurrency=8)]
            )
        await trio.sleep(1.0)
        rss1, fds1 = jobd.rss(), _fds(jobd.pid)
        load_status = await _latencies(ctx, jobd, "Status", first, z.status_calls)
        load_list = await _latencies(ctx, jobd, "List", first, z.list_calls)
        ctx.log(
            f"scale: RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB for {n} jobs, "
            f"fds {fds0} -> {fds1}"
        )
    per_job = (rss1 - rss0) / n / 1024
    s_idle, s_load = pct(idle_status, 99) * 1e3, pct(load_status, 99) * 1e3
    l_idle, l_load = pct(idle_list, 99) * 1e3, pct(load_list, 99) * 1e3
    jobs = z.scale_jobs
    return [
        Row("5 scale", f"server RSS per sleeping job ({jobs} jobs)", per_job, "KiB",
            target="<= 100 KiB", ok=per_job <= 100,
            samples=[f"RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB, fds {fds0} -> {fds1}"]),
        Row("5 scale", f"Status p99 with {jobs} jobs", s_load, "ms", s_idle, "1 job (idle)",
            s_load / s_idle, "<= 2x idle", s_load <= 2 * s_idle),
        Row("5 scale", f"List p99 of {jobs} jobs", l_load, "ms", l_idle, "List of 1 job",
            l_load / l_idle),
    ]  # fmt: skip


# ------------------------------------------------------------------ 6. stop latency


async def stop_tree(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    script = f"i=1; while [ $i -lt {z.tree} ]; do sleep 3600 & i=$((i+1)); done; echo ready; wait"
    command = ["sh", "-c", script]
    rows = []
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
        for grace, what in ((5, "SIGTERM (grace 5 s)"), (0, "SIGKILL (grace 0)")):
            [lat] = await run_workers(
                "stop_tree",
                [ctx.client(jobd.target, command=command, grace=grace, repeats=z.stop_repeats)],
            )
            ctx.log(f"stop {what}: {[round(x * 1e3, 1) for x in lat]} ms")
            rows.append(Row(
                "6 stop", f"Stop of a {z.tree}-process job, {what}: median", median(lat) * 1e3,
                "ms", samples=lat,
            ))  # fmt: skip
    return rows


# ------------------------------------------------------------------ 7. memory bound


async def memory_bound(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    command = ["head", "-c", str(z.memory_bytes), "/dev/zero"]
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
        await start_job(ctx, jobd.target, ["true"])  # warm: one job through every path
        await trio.sleep(0.5)
        idle = jobd.rss()
        reset_peak_rss(jobd.pid)
        sampled = idle
        from .env import Worker

        staller = await Worker.start("stall", **ctx.client(jobd.target, job_id=""))
        try:
            job_id = await start_job(ctx, jobd.target, command)
            await staller.go(job_id)
            await staller.expect("stalled")
            with trio.fail_after(600):
                while jobd_output_bytes(ctx, jobd, job_id) < z.memory_bytes:
                    sampled = max(sampled, jobd.rss())
                    await trio.sleep(0.02)
                for _ in range(25):
                    sampled = max(sampled, jobd.rss())
                    await trio.sleep(0.02)
            peak = proc_status(jobd.pid, "VmHWM")
            await staller.send("bye")
            await staller.result()
        finally:
            await staller.kill()
    ctx.log(f"memory: idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")
    return [
        Row("7 memory", f"server peak RSS, {z.memory_bytes // MiB} MiB job, 1 stalled follower",
            peak / MiB, "MiB", idle / MiB, "idle RSS", None, "<= 64 MiB", peak <= 64 * MiB,
            [f"sampled max {sampled / MiB:.1f} MiB"]),
    ]  # fmt: skip


def jobd_output_bytes(ctx: Ctx, jobd: Jobd, job_id: str) -> int:
    """Bytes of the job's output on disk: the data files of its segments
    (`output/<id>/<base>.out`, jobd/engine/_output.py)."""
    directory = ctx.workdir / jobd.cgroup_name / "output" / job_id
    total = 0
    for path in directory.glob("*.out") if directory.is_dir() else ():
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # a segment dropped meanwhile
            pass
    return total


SECTIONS: dict[str, Callable[[Ctx], Awaitable[list[Row]]]] = {
    "stream": stream,
    "fanout": fanout,
    "start": start_latency,
    "unary": unary,
    "scale": scale,
    "stop": stop_tree,
    "memory": memory_bound,
}
