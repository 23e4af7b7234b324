"""How many emulated replicas this machine runs at real-time fidelity.

For each fleet size K, start K ``llmfleet engine`` processes (emulated executor, speedup 1),
keep ``concurrency`` non-streaming requests in flight against each, and read every engine's
loop statistics over a measurement window. An engine keeps real time when its iterations
end on their modelled deadlines: ``lateness = busy real time / modelled time - 1`` over the
window (0.05: its tokens come 5 % slower than the device it emulates). The fleet is within
tolerance when the worst engine's lateness is at most 5 %.

    llmfleet bench realtime --json   (or: python -m instances.realtime_bench --json)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import httpx

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from proto.defaults import DEFAULT_PROFILE

RESULTS = os.path.join("docs", "results", "engine-realtime.json")
MIN_BUSY = 0.5  # device seconds per real second each replica must have had


async def _drive(urls: list[str], concurrency: int, prompt_tokens: int, max_tokens: int,
                 seconds: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
    limits = httpx.Limits(max_connections=len(urls) * concurrency + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        stop = time.monotonic() + seconds
        done = 0
        errors = 0

        async def worker(url: str, w: int) -> None:
            nonlocal done, errors
            i = 0
            while time.monotonic() < stop:
                # Distinct prompts: no prefix-cache hits, every request pays its prefill.
                prompt = [(w * 7919 + i * 31 + k) % 256 for k in range(prompt_tokens)]
                i += 1
                try:
                    r = await client.post(url + "/v1/completions",
                                          json={"prompt": prompt, "max_tokens": max_tokens})
                    r.raise_for_status()
                    done += 1
                except httpx.HTTPError:
                    errors += 1  # a fleet this size cannot even answer: not real time

        warm = [asyncio.create_task(worker(u, w)) for u in urls for w in range(concurrency)]
        await asyncio.sleep(min(2.0, seconds / 4))  # reach steady state before measuring
        async def loop_stats(url: str) -> dict[str, Any]:
            stats: dict[str, Any] = (await client.get(url + "/load")).json()["loop"]
            stats["read_at"] = time.monotonic()  # each replica's own window, no read skew
            return stats

        before = [await loop_stats(u) for u in urls]
        await asyncio.gather(*warm)
        after = [await loop_stats(u) for u in urls]
        return before, after, done, errors


def measure(k: int, seconds: float, concurrency: int, prompt_tokens: int,
            max_tokens: int, profile: str | None) -> dict[str, Any]:
    specs = [EngineSpec(instance_id=f"rt-{i}", port=free_port(), profile=profile)
             for i in range(k)]
    supervisor = EngineSupervisor(specs, restart=False)
    supervisor.start()
    try:
        before, after, done, errors = asyncio.run(_drive([s.url for s in specs], concurrency,
                                                 prompt_tokens, max_tokens, seconds))
    finally:
        supervisor.stop()
    lateness = []
    busy = []
    for b, a in zip(before, after, strict=True):
        device = a["device_s"] - b["device_s"]
        wall = a["wall_s"] - b["wall_s"]
        lateness.append(wall / device - 1.0 if device > 0 else 0.0)
        busy.append(device / (a["read_at"] - b["read_at"]))
    lateness.sort()
    return {"replicas": k, "requests": done, "errors": errors,
            "lateness_median": lateness[len(lateness) // 2],
            "lateness_max": lateness[-1], "busy_min": min(busy),
            "busy_median": sorted(busy)[len(busy) // 2], "seconds": seconds}


def run(sizes: list[int], seconds: float, concurrency: int, prompt_tokens: int,
        max_tokens: int, tolerance: float, profile: str | None) -> dict[str, Any]:
    rows = []
    for k in sizes:
        row = measure(k, seconds, concurrency, prompt_tokens, max_tokens, profile)
        rows.append(row)
        print(f"replicas={k:3d} lateness median={row['lateness_median']:.3%} "
              f"max={row['lateness_max']:.3%} busy min={row['busy_min']:.2f} "
              f"errors={row['errors']}", file=sys.stderr,
              flush=True)
        if row["errors"] or row["lateness_max"] > 4 * tolerance:
            break  # far past the limit; larger fleets only get worse
    # A size counts only if every replica was really driven (busy at least MIN_BUSY of the
    # window): above some size the load generator, on the same cores, cannot keep them all
    # busy, and an idle replica keeps real time trivially.
    within = [r["replicas"] for r in rows
              if not r["errors"] and r["lateness_max"] <= tolerance and r["busy_min"] >= MIN_BUSY]
    return {
        "benchmark": "engine_realtime",
        "cpu_count": os.cpu_count(),
        "profile": profile or DEFAULT_PROFILE,
        "concurrency_per_replica": concurrency,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "tolerance": tolerance,
        "min_busy": MIN_BUSY,
        "max_realtime_replicas": max(within) if within else 0,
        "rows": rows,
    }


def fidelity_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The part of a real-time result that ``engine-fidelity.json`` carries."""
    return {
        "max_realtime_replicas": result["max_realtime_replicas"],
        "tolerance": result["tolerance"],
        "cpu_count": result["cpu_count"],
        "profile": result["profile"],
        "source": "docs/results/engine-realtime.json (python -m instances.realtime_bench)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,2,4,8,12,16,20,24,32")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=RESULTS)


def register_bench(bench_subparsers: Any) -> None:
    """``llmfleet bench realtime``."""
    parser = bench_subparsers.add_parser(
        "realtime", help="how many emulated replicas this machine runs in real time")
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    result = run([int(s) for s in args.sizes.split(",")], args.seconds, args.concurrency,
                 args.prompt_tokens, args.max_tokens, args.tolerance, args.profile)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        fidelity = os.path.join(os.path.dirname(args.out) or ".", "engine-fidelity.json")
        if os.path.exists(fidelity):  # keep the engine's fidelity report complete
            with open(fidelity) as f:
                report = json.load(f)
            report["realtime"] = fidelity_summary(result)
            with open(fidelity, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(result, indent=2 if not args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
