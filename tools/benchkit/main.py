"""Command line of `just bench`: pick the sizes and sections, run them, print the table and
write it as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

from jobd import pki

from .cases import FULL, QUICK, SECTIONS, Ctx, Row

ROOT = Path(__file__).resolve().parent.parent.parent


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(rows: list[Row]) -> str:
    head = ["section", "metric", "jobd", "unit", "baseline", "(which)", "ratio", "target", "ok"]
    body = [
        [
            r.section, r.metric, _fmt(r.value), r.unit, _fmt(r.baseline), r.baseline_name,
            "" if r.ratio is None else f"{r.ratio:.2f}x", r.target,
            "" if r.ok is None else ("yes" if r.ok else "NO"),
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    names = args.only or list(SECTIONS)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        workdir = Path(tmp)
        certs = workdir / "certs"
        pki.write_dev_pki(certs)
        ctx = Ctx(workdir, certs, sizes, log)
        for name in names:
            log(f"section {name}")
            rows += await SECTIONS[name](ctx)
    elapsed = time.monotonic() - started
    print(table(rows))
    verdicts = [r.ok for r in rows if r.ok is not None]
    print(
        f"\n{sum(verdicts)}/{len(verdicts)} targets hold; {elapsed:.0f} s; "
        f"{'quick' if args.quick else 'full'} run, {sizes.repeats} repeat(s), medians"
    )
    result = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "seconds": elapsed,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "sizes": sizes.__dict__,
        "rows": [r.as_dict() for r in rows],
    }
    out = args.out or ROOT / "bench-results" / (
        f"bench-{result['mode']}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        from .workers import run_worker

        return run_worker(argv[1], argv[2])
    if argv[:1] == ["--peer"]:
        from .peer import run_peer

        return run_peer(argv[1])
    if argv[:1] == ["--sync-peer"]:
        from .syncpeer import run_sync_peer

        return run_sync_peer(argv[1], argv[2], argv[3])
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (CI smoke)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument(
        "--repeats", type=_positive, metavar="N",
        help="repeats of each case (default 3, 1 with --quick): each repeat runs jobd and its "
        "baseline once, alternated; more repeats steady the medians of a noisy machine",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON file (default: bench-results/...)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the benchmark runs a real jobd with cgroups: run it as root")
    return trio.run(run, args)
