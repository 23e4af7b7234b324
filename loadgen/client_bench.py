"""CPU per request of the load generator's live client: the httpx client it used before
(stdlib JSON encode inside the TTFT window, ``aiter_lines`` + ``json.loads`` per event) vs
the current one (``loadgen.runner.send_one``: ``router.upstream`` + orjson).

Both send the same long-prompt streaming completions, from this one process, to one
emulated replica in another process (fast ``--speedup`` so the replica's time is small);
rounds alternate between the clients and each figure is the median over rounds of the
client process's CPU seconds per request (``time.process_time``) and of its TTFT. Each
event loop (asyncio, uvloop) is measured in turn: the old client ran on asyncio, the load
generator now runs on uvloop. Requests are sent one at a time, so every streamed token is
its own socket read (the costly case; many concurrent streams share wake-ups).

``python -m loadgen.client_bench --out docs/results/loadgen-client.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvloop

from instances.launcher import EngineProcess, EngineSpec, free_port
from loadgen.metrics import RequestOutcome
from loadgen.request import TraceRequest, unique_segments
from loadgen.runner import client_pool, completion_body, send_one
from proto.headers import INSTANCE_HEADER, REQUEST_ID_HEADER

DEFAULT_OUT = Path("docs/results/loadgen-client.json")
CLIENTS = ("httpx", "upstream")
Send = Callable[[TraceRequest, RequestOutcome], Awaitable[None]]


async def _send_one_httpx(client: httpx.AsyncClient, url: str, request: TraceRequest,
                          outcome: RequestOutcome, model: str) -> None:
    """The load generator's client before it moved to ``router.upstream`` (baseline only)."""
    body = completion_body(request, model, True)
    start = time.perf_counter()
    last: float | None = None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600.0,
                             headers={REQUEST_ID_HEADER: request.request_id}) as response:
        outcome.instance_id = response.headers.get(INSTANCE_HEADER)
        if response.status_code != 200:
            outcome.error = f"HTTP {response.status_code}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                outcome.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            if any(choice.get("text") for choice in chunk.get("choices") or ()):
                now = time.perf_counter()
                if last is None:
                    outcome.ttft_s = now - start
                else:
                    outcome.inter_token_s.append(now - last)
                last = now
    outcome.e2e_s = time.perf_counter() - start


async def _round(send: Send, requests: list[TraceRequest]) -> dict[str, float]:
    outcomes = [RequestOutcome(r.request_id, 0.0, r.prompt_len, r.output_len) for r in requests]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for request, outcome in zip(requests, outcomes, strict=True):
        await send(request, outcome)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    failed = [o.error for o in outcomes if o.error or o.ttft_s is None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return {"cpu_us_per_request": cpu / len(requests) * 1e6,
            "wall_ms_per_request": wall / len(requests) * 1e3,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3,
            "output_tokens": statistics.median(o.output_tokens for o in outcomes)}


async def _measure(url: str, model: str, prompt_len: int, output_len: int, requests: int,
                   rounds: int) -> dict[str, list[dict[str, float]]]:
    batch = [TraceRequest(f"b{i}", 0.0, prompt_len, output_len,
                          segments=unique_segments("client-bench", i, prompt_len))
             for i in range(requests)]
    http = httpx.AsyncClient(timeout=None)
    pool = client_pool(url, 16)

    async def via_httpx(request: TraceRequest, outcome: RequestOutcome) -> None:
        await _send_one_httpx(http, url, request, outcome, model)

    async def via_upstream(request: TraceRequest, outcome: RequestOutcome) -> None:
        await send_one(pool, request, outcome, model, ignore_eos=True)

    sends: dict[str, Send] = {"httpx": via_httpx, "upstream": via_upstream}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENTS}
    try:
        for name in CLIENTS:  # warm-up: connections, imports, caches
            await _round(sends[name], batch[:5])
        for index in range(rounds):
            for name in CLIENTS if index % 2 == 0 else CLIENTS[::-1]:
                results[name].append(await _round(sends[name], batch))
    finally:
        await http.aclose()
        pool.close()
    return results


def run(prompt_len: int = 12288, output_len: int = 256, requests: int = 30, rounds: int = 5,
        speedup: float = 50.0, loops: Sequence[str] = ("asyncio", "uvloop")) -> dict[str, Any]:
    """Start one emulated replica, measure both clients on each event loop in turn, return
    the result JSON (medians per loop and client; ``old_over_new``: the load generator's
    client before (httpx on asyncio) over now (upstream on uvloop), where both were run)."""
    engine = EngineProcess(EngineSpec("client-bench", free_port(), speedup=speedup,
                                      extra_args=["--migration-port", "-1"]))
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    engine.start()
    try:
        engine.wait_healthy()
        for loop in loops:
            measure = _measure(engine.spec.url, engine.spec.model, prompt_len, output_len,
                               requests, rounds)
            raw[loop] = uvloop.run(measure) if loop == "uvloop" else asyncio.run(measure)
    finally:
        engine.stop()
    medians = {loop: {name: {key: round(statistics.median(r[key] for r in rows), 3)
                             for key in rows[0]} for name, rows in by_client.items()}
               for loop, by_client in raw.items()}
    result: dict[str, Any] = {
        "setup": {"prompt_tokens": prompt_len, "output_tokens": output_len,
                  "requests_per_round": requests, "rounds": rounds, "replica_speedup": speedup,
                  "sequential": True, "cpu": "client process only (time.process_time)",
                  "loadavg_before": loadavg_before,
                  "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "median": medians,
        "cpu_ratio_httpx_over_upstream": {
            loop: round(m["httpx"]["cpu_us_per_request"] / m["upstream"]["cpu_us_per_request"], 2)
            for loop, m in medians.items()},
    }
    if "asyncio" in medians and "uvloop" in medians:
        old, new = medians["asyncio"]["httpx"], medians["uvloop"]["upstream"]
        result["old_over_new"] = {
            "cpu_per_request": round(old["cpu_us_per_request"] / new["cpu_us_per_request"], 2),
            "ttft_p50_ms_saved": round(old["ttft_p50_ms"] - new["ttft_p50_ms"], 3)}
    result["rounds"] = raw
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prompt-len", type=int, default=12288)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--speedup", type=float, default=50.0)
    parser.add_argument("--loops", default="asyncio,uvloop",
                        help="event loops to measure on, in turn (asyncio, uvloop)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.prompt_len, args.output_len, args.requests, args.rounds, args.speedup,
                 [loop for loop in args.loops.split(",") if loop])
    result["command"] = "python -m loadgen.client_bench " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
