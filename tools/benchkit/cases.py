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

from .env import Jobd, open_jobd, open_peer, proc_status, reset_peak_rss, run_workers

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
    tree: int = 200


FULL = Sizes(
    repeats=3, stream_bytes=1024 * MiB, seq_n=120_000_000, fanout_bytes=64 * MiB, starts=200,
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
    z = ctx.sizes
    commands = {
        "head -c": ["head", "-c", str(z.stream_bytes), "/dev/zero"],
        "seq": ["seq", "1", str(z.seq_n)],
    }
    rows = []
    async with open_jobd(ctx.workdir, ctx.certs) as jobd, open_peer(ctx.certs) as peer:
        for name, command in commands.items():
            a, b, j = [], [], []
            for i in range(z.repeats):
                [ra] = await run_workers("pipe", [{"command": command}])
                [rb] = await run_workers("stream", [ctx.client(peer.target, command=command)])
                [rj] = await run_workers("stream", [ctx.client(jobd.target, command=command)])
                if not ra["bytes"] == rb["bytes"] == rj["bytes"]:
                    raise AssertionError(f"byte counts differ: {ra} {rb} {rj}")
                a.append(mbps(ra))
                b.append(mbps(rb))
                j.append(mbps(rj))
                ctx.log(
                    f"stream {name} #{i}: jobd {j[-1]:.0f} MB/s ({rj['messages']} msgs), "
                    f"pipe {a[-1]:.0f}, grpcio {b[-1]:.0f}"
                )
            size = f"{ra['bytes'] / MiB:.0f} MiB"
            rows.append(Row(
                "1 stream", f"{name} {size}: jobd vs trio pipe (A)", median(j), "MB/s",
                median(a), "A: trio pipe", median([x / y for x, y in zip(j, a, strict=True)]),
                ">= 0.5x A", None, [j, a],
            ))  # fmt: skip
            rows.append(Row(
                "1 stream", f"{name} {size}: jobd vs grpcio peer (B)", median(j), "MB/s",
                median(b), "B: grpc.aio", median([x / y for x, y in zip(j, b, strict=True)]),
                ">= 1.0x B", None, [j, b],
            ))  # fmt: skip
    for row in rows:
        assert row.ratio is not None
        row.ok = row.ratio >= (0.5 if "(A)" in row.metric else 1.0)
    return rows


# ------------------------------------------------------------------ 2. fan-out


async def fanout(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    command = ["head", "-c", str(z.fanout_bytes), "/dev/zero"]
    agg: dict[int, list[float]] = {n: [] for n in z.fanouts}
    slow: dict[int, list[float]] = {n: [] for n in z.fanouts}
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
        for i in range(z.repeats):
            for n in z.fanouts:
                procs = min(n, 4)
                per = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
                argsets = [ctx.client(jobd.target, job_id="", n=k) for k in per]

                async def new_job() -> str:
                    return await start_job(ctx, jobd.target, command)

                results = [
                    r for rs in await run_workers("follow", argsets, before_go=new_job) for r in rs
                ]
                total = sum(r["bytes"] for r in results)
                assert total == n * z.fanout_bytes, (total, n)
                span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
                agg[n].append(total / span / MB)
                slow[n].append(min(mbps(r) for r in results))
                ctx.log(
                    f"fan-out {n} #{i}: aggregate {agg[n][-1]:.0f} MB/s, "
                    f"slowest {slow[n][-1]:.1f} MB/s"
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
    return rows


# ------------------------------------------------------------------ 3. start latency


async def start_latency(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    command = ["sleep", "60"]
    jobd_all: list[float] = []
    spawn_all: list[float] = []
    p50s: list[tuple[float, float]] = []
    warm_p50s: list[float] = []  # a booted shim always waiting in the pool
    none_p50s: list[float] = []  # the same, NETWORK_NONE: a network namespace per job
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
        for i in range(z.repeats):
            [sp] = await run_workers("spawn", [{"command": command, "n": z.starts}])
            [jl] = await run_workers(
                "starts", [ctx.client(jobd.target, command=command, n=z.starts)]
            )
            # With a pause between starts the pool always has a booted shim: what a Start
            # itself costs, on the host network and with a network namespace of its own.
            [wl] = await run_workers(
                "starts", [ctx.client(jobd.target, command=command, n=z.starts, pause=0.05)]
            )
            [nl] = await run_workers("starts", [ctx.client(
                jobd.target, command=command, n=z.starts, pause=0.05, network=2)])
            spawn_all += sp
            jobd_all += jl
            p50s.append((median(jl), median(sp)))
            warm_p50s.append(median(wl))
            none_p50s.append(median(nl))
            j50, s50 = p50s[-1]
            ctx.log(f"start #{i}: jobd p50 {j50 * 1e3:.1f} ms (warm pool "
                    f"{warm_p50s[-1] * 1e3:.1f} ms, NETWORK_NONE {none_p50s[-1] * 1e3:.1f} ms), "
                    f"spawn {s50 * 1e3:.1f} ms")
    j50 = median([j for j, _ in p50s]) * 1e3
    s50 = median([s for _, s in p50s]) * 1e3
    diff = median([(j - s) * 1e3 for j, s in p50s])
    return [
        Row("3 start", f"Start RPC p50 ({z.starts} starts x {z.repeats})", j50, "ms", s50,
            "trio open_process", None, "<= spawn + 3 ms", diff <= 3.0,
            [f"jobd-spawn p50 {diff:.2f} ms"]),
        Row("3 start", "Start RPC p99", pct(jobd_all, 99) * 1e3, "ms",
            pct(spawn_all, 99) * 1e3, "trio open_process"),
        Row("3 start", "Start RPC p50, warm shim pool", median(warm_p50s) * 1e3, "ms", s50,
            "trio open_process"),
        Row("3 start", "Start RPC p50, warm pool, NETWORK_NONE", median(none_p50s) * 1e3, "ms",
            median(warm_p50s) * 1e3, "same, host network"),
    ]  # fmt: skip


# ------------------------------------------------------------------ 4. unary rate


async def unary(ctx: Ctx) -> list[Row]:
    z = ctx.sizes
    shapes = {"1 connection": (1, 1), "8 connections": (2, 4)}  # (processes, conns each)
    rates: dict[str, dict[str, list[float]]] = {s: {"jobd": [], "peer": []} for s in shapes}
    async with open_jobd(ctx.workdir, ctx.certs) as jobd, open_peer(ctx.certs) as peer:
        # An ended job: its Status is the RPC stack plus a dict lookup, as the peer's is.
        ids = {
            "jobd": await start_job(ctx, jobd.target, ["true"]),
            "peer": await start_job(ctx, peer.target, ["true"]),
        }
        targets = {"jobd": jobd.target, "peer": peer.target}
        await trio.sleep(0.5)
        for i in range(z.repeats):
            for shape, (procs, conns) in shapes.items():
                for who in ("peer", "jobd"):
                    args = ctx.client(
                        targets[who], job_id=ids[who], conns=conns, concurrency=4,
                        seconds=z.unary_seconds, warmup=0.5,
                    )  # fmt: skip
                    results = await run_workers("unary", [args] * procs)
                    rate = sum(r["calls"] / r["seconds"] for r in results)
                    rates[shape][who].append(rate)
                ctx.log(
                    f"unary {shape} #{i}: jobd {rates[shape]['jobd'][-1]:.0f}/s, "
                    f"grpcio {rates[shape]['peer'][-1]:.0f}/s"
                )
    rows = []
    for shape in shapes:
        j, p = rates[shape]["jobd"], rates[shape]["peer"]
        ratio = median([x / y for x, y in zip(j, p, strict=True)])
        rows.append(Row(
            "4 unary", f"Status calls/s, {shape} (4 in flight each)", median(j), "calls/s",
            median(p), "grpc.aio peer", ratio, ">= 0.8x peer", ratio >= 0.8, [j, p],
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
    async with open_jobd(ctx.workdir, ctx.certs) as jobd:
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
            out = jobd_output_file(ctx, jobd, job_id)
            with trio.fail_after(600):
                while not (out.exists() and out.stat().st_size >= z.memory_bytes):
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


def jobd_output_file(ctx: Ctx, jobd: Jobd, job_id: str) -> Path:
    return ctx.workdir / jobd.cgroup_name / "output" / f"{job_id}.out"


SECTIONS: dict[str, Callable[[Ctx], Awaitable[list[Row]]]] = {
    "stream": stream,
    "fanout": fanout,
    "start": start_latency,
    "unary": unary,
    "scale": scale,
    "stop": stop_tree,
    "memory": memory_bound,
}
