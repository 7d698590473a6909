"""Load-generating client processes. Each runs as `bench.py --worker KIND JSON`: it sets up
(connects), prints "ready", waits for a "go" line on stdin, does its work and prints one JSON
line. Clients are grpcio (C-core) against jobd and the peer alike, so the client side is the
same for both; the pipe and spawn baselines are trio, as jobd is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import trio

from jobd.v1 import jobd_pb2 as pb
from jobd.v1 import jobd_pb2_grpc as pb_grpc

Args = dict[str, Any]


def _ready() -> str:
    """Say we are set up; wait for the "go" line. Its second word, if any, is a job id."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    words = sys.stdin.readline().split()
    return words[1] if len(words) > 1 else ""


async def _aready() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, _ready)


def _credentials(args: Args) -> grpc.ChannelCredentials:
    """The CA and the user's key and certificate from the bench's certs dir."""
    certs = args["certs"]
    user = args.get("user", "alice")

    def read(name: str) -> bytes:
        with open(os.path.join(certs, name), "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read(f"{user}.key"),
        certificate_chain=read(f"{user}.pem"),
    )


def channel(args: Args) -> grpc.aio.Channel:
    """An mTLS channel of its own (never a shared subchannel: one channel = one connection)."""
    creds = _credentials(args)
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    return grpc.aio.secure_channel(args["target"], creds, options)


async def _connected(args: Args, n: int = 1) -> list[tuple[grpc.aio.Channel, Any]]:
    pairs = []
    for _ in range(n):
        ch = channel(args)
        await asyncio.wait_for(ch.channel_ready(), 15)
        pairs.append((ch, pb_grpc.JobServiceStub(ch)))  # type: ignore[no-untyped-call]
    return pairs


async def _drain(stub: Any, job_id: str, offset: int = 0) -> dict[str, float]:
    """Follow a job's output to its end: bytes, messages, start and end (CLOCK_MONOTONIC,
    which is system-wide, so figures from several processes line up)."""
    t0 = time.monotonic()
    size = messages = 0
    async for chunk in stub.Output(pb.OutputRequest(id=job_id, follow=True, offset=offset)):
        size += len(chunk.data)
        messages += 1
    return {"bytes": size, "messages": messages, "t0": t0, "t1": time.monotonic()}


async def w_stream(args: Args) -> Any:
    """Start the command and follow its output to the end (jobd or the peer)."""
    [(ch, stub)] = await _connected(args)
    await _aready()
    t0 = time.monotonic()
    job = await stub.Start(pb.StartRequest(command=args["command"]))
    result = await _drain(stub, job.id)
    result["t0"] = t0
    await ch.close()
    return result


async def w_follow(args: Args) -> Any:
    """n concurrent followers of one job on this process's one connection."""
    [(ch, stub)] = await _connected(args)
    job_id = await _aready() or args["job_id"]
    cpu0 = time.process_time()
    results = await asyncio.gather(*(_drain(stub, job_id) for _ in range(args["n"])))
    # This process's CPU (all its threads: grpc's too) while it followed, on the first result.
    results[0]["cpu"] = time.process_time() - cpu0
    await ch.close()
    return results


async def w_starts(args: Args) -> Any:
    """Start latency: n Start calls one after another (each job stopped, untimed, after)."""
    [(ch, stub)] = await _connected(args)
    await _aready()
    latencies = []
    for _ in range(args["n"]):
        t0 = time.perf_counter()
        job = await stub.Start(
            pb.StartRequest(command=args["command"], network=args.get("network", 0))
        )
        latencies.append(time.perf_counter() - t0)
        assert job.state == pb.RUNNING, job
        await stub.Stop(pb.StopRequest(id=job.id, grace={}))
        await asyncio.sleep(args.get("pause", 0))  # untimed: lets the server refill its pool
    await ch.close()
    return latencies


async def w_start_many(args: Args) -> Any:
    """Start n jobs, `concurrency` at a time; returns their ids."""
    [(ch, stub)] = await _connected(args)
    await _aready()
    ids: list[str] = []
    left = args["n"]

    async def starter() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            job = await stub.Start(pb.StartRequest(command=args["command"]))
            ids.append(job.id)

    await asyncio.gather(*(starter() for _ in range(args["concurrency"])))
    await ch.close()
    return ids


async def w_unary(args: Args) -> Any:
    """Status calls per second: `conns` connections, `concurrency` callers on each, for
    `seconds` after a warm-up."""
    pairs = await _connected(args, args["conns"])
    await _aready()
    request = pb.JobRequest(id=args["job_id"])
    count = 0
    measuring = False
    stop_at = time.monotonic() + args["warmup"] + args["seconds"]

    async def caller(stub: Any) -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            await stub.Status(request)
            if measuring:
                count += 1

    tasks = [
        asyncio.ensure_future(caller(stub)) for _, stub in pairs for _ in range(args["concurrency"])
    ]
    await asyncio.sleep(args["warmup"])
    measuring = True
    t0 = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    for ch, _ in pairs:
        await ch.close()
    return {"calls": count, "seconds": elapsed}


async def w_latency(args: Args) -> Any:
    """Latency of n sequential calls of one method (Status or List)."""
    [(ch, stub)] = await _connected(args)
    await _aready()
    if args["method"] == "Status":
        call: Callable[[], Any] = lambda: stub.Status(pb.JobRequest(id=args["job_id"]))  # noqa: E731
    else:
        call = lambda: stub.List(pb.ListRequest())  # noqa: E731
    for _ in range(min(20, args["n"])):  # warm-up
        await call()
    latencies = []
    for _ in range(args["n"]):
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)
    await ch.close()
    return latencies


async def w_stall(args: Args) -> Any:
    """A follower that takes one message and then reads nothing until told to go away."""
    [(ch, stub)] = await _connected(args)
    job_id = await _aready() or args["job_id"]
    call = stub.Output(pb.OutputRequest(id=job_id, follow=True))
    first = await call.read()
    sys.stdout.write("stalled\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    call.cancel()
    await ch.close()
    return {"first": len(first.data)}


async def w_stop_tree(args: Args) -> Any:
    """Stop latency of a job with a process tree: start it, wait for its "ready" line, time
    the Stop call. Repeated; returns the latencies."""
    [(ch, stub)] = await _connected(args)
    await _aready()
    latencies = []
    for _ in range(args["repeats"]):
        job = await stub.Start(pb.StartRequest(command=args["command"]))
        seen = b""
        async for chunk in stub.Output(pb.OutputRequest(id=job.id, follow=True)):
            seen += chunk.data
            if b"ready" in seen:
                break
        t0 = time.perf_counter()
        stopped = await stub.Stop(pb.StopRequest(id=job.id, grace={"seconds": args["grace"]}))
        latencies.append(time.perf_counter() - t0)
        assert stopped.state == pb.STOPPED, stopped
    await ch.close()
    return latencies


# ------------------------------------------------------------------ sync grpcio clients


def sync_channel(args: Args) -> grpc.Channel:
    """A synchronous grpcio mTLS channel of its own, with grpcio's default 4 MiB receive
    limit (the limit jobd's output messages must stay within)."""
    creds = _credentials(args)
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    ch = grpc.secure_channel(args["target"], creds, options)
    grpc.channel_ready_future(ch).result(timeout=15)
    return ch


def s_stream(args: Args) -> Any:
    """Start the command and follow its output to the end, with the sync client."""
    ch = sync_channel(args)
    stub = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
    _ready()
    t0 = time.monotonic()
    job = stub.Start(pb.StartRequest(command=args["command"]))
    size = messages = biggest = 0
    for chunk in stub.Output(pb.OutputRequest(id=job.id, follow=True)):
        size += len(chunk.data)
        biggest = max(biggest, len(chunk.data))
        messages += 1
    ch.close()
    return {"bytes": size, "messages": messages, "biggest": biggest, "t0": t0,
            "t1": time.monotonic()}  # fmt: skip


def s_starts(args: Args) -> Any:
    """Start latency with the sync client: n Starts of `command` one after another ("back to
    back"), `gap` seconds apart ("spaced"), or in waves of `concurrent` at once; the jobs are
    left to end by themselves (`true`). Returns every latency in seconds."""
    ch = sync_channel(args)
    stub = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
    request = pb.StartRequest(command=args["command"])
    for _ in range(3):  # warm-up: first calls on the connection
        stub.Start(request)
    time.sleep(0.3)
    _ready()
    latencies: list[float] = []
    wave = args.get("concurrent", 1)
    for _ in range(args["n"] // wave):
        if wave == 1:
            t0 = time.perf_counter()
            stub.Start(request)
            latencies.append(time.perf_counter() - t0)
        else:
            latencies += _wave(stub, request, wave)
            time.sleep(0.3)  # let the waves' jobs end before the next
        if args.get("gap"):
            time.sleep(args["gap"])
    ch.close()
    return latencies


def _wave(stub: Any, request: pb.StartRequest, wave: int) -> list[float]:
    """`wave` Starts sent at once; each one's latency from the common send time."""
    done = threading.Event()
    lock = threading.Lock()
    got: list[float] = []
    t0 = time.perf_counter()

    def finished(_: Any) -> None:
        with lock:
            got.append(time.perf_counter() - t0)
            if len(got) == wave:
                done.set()

    calls = [stub.Start.future(request) for _ in range(wave)]
    for call in calls:
        call.add_done_callback(finished)
    done.wait(60)
    for call in calls:
        call.result()  # raises if a Start failed
    return got


def s_unary(args: Args) -> Any:
    """Status calls per second on one sync connection: `concurrency` threads calling back to
    back, for `seconds` after a warm-up."""
    ch = sync_channel(args)
    stub = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
    request = pb.JobRequest(id=args["job_id"])
    _ready()
    count = 0
    lock = threading.Lock()
    measure_from = time.monotonic() + args["warmup"]
    stop_at = measure_from + args["seconds"]

    def caller() -> None:
        nonlocal count
        mine = 0
        while (now := time.monotonic()) < stop_at:
            stub.Status(request)
            if now >= measure_from:
                mine += 1
        with lock:
            count += mine

    threads = [threading.Thread(target=caller) for _ in range(args["concurrency"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.close()
    return {"calls": count, "seconds": args["seconds"]}


# ------------------------------------------------------------------ trio baselines


async def w_pipe(args: Args) -> Any:
    """Baseline A: the command's pipe read directly by a trio process (the local limit)."""
    await trio.to_thread.run_sync(_ready)
    t0 = time.monotonic()
    size = messages = 0
    proc = await trio.lowlevel.open_process(args["command"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    async with proc.stdout:
        while data := await proc.stdout.receive_some(65536):
            size += len(data)
            messages += 1
    await proc.wait()
    return {"bytes": size, "messages": messages, "t0": t0, "t1": time.monotonic()}


async def w_spawn(args: Args) -> Any:
    """Baseline for Start: `trio.lowlevel.open_process` of the same command (returns once it
    has exec'd), killed and reaped untimed."""
    await trio.to_thread.run_sync(_ready)
    latencies = []
    for _ in range(args["n"]):
        t0 = time.perf_counter()
        proc = await trio.lowlevel.open_process(
            args["command"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        latencies.append(time.perf_counter() - t0)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                await pipe.aclose()
    return latencies


ASYNCIO_WORKERS = {
    "stream": w_stream,
    "follow": w_follow,
    "starts": w_starts,
    "start_many": w_start_many,
    "unary": w_unary,
    "latency": w_latency,
    "stall": w_stall,
    "stop_tree": w_stop_tree,
}
TRIO_WORKERS = {"pipe": w_pipe, "spawn": w_spawn}
SYNC_WORKERS = {"s_stream": s_stream, "s_starts": s_starts, "s_unary": s_unary}


def run_worker(kind: str, raw: str) -> int:
    args = json.loads(raw)
    if kind in TRIO_WORKERS:
        result = trio.run(TRIO_WORKERS[kind], args)
    elif kind in SYNC_WORKERS:
        result = SYNC_WORKERS[kind](args)
    else:
        result = asyncio.run(ASYNCIO_WORKERS[kind](args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
