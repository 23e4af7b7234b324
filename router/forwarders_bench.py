"""``llmfleet bench forwarders``: which HTTP client should the gateway forward with?

The gateway's forwarding client is on every request's path twice (request out, answer
back), so its CPU cost is the gateway's. This bench sends the same requests, from one
process, through each candidate client to the same backend (a minimal uvicorn server in
another process that answers at once, so the client is all that is measured) and reports
the client process's CPU time per request and the latency, for a plain JSON answer and a
streamed one (SSE, ``--chunks`` events). Candidates: ``httpx`` (what the gateway used),
``aiohttp``, and ``upstream`` (``router.upstream``: asyncio protocol + httptools, what it
uses now). Rounds are interleaved and each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from instances.launcher import free_port

DEFAULT_OUT = Path("docs/results/forwarders.json")
CLIENTS = ("httpx", "aiohttp", "upstream")

_BACKEND = r'''
import sys, uvicorn
CHUNKS = int(sys.argv[2])
PLAIN = b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"hello world"}]}'
EVENT = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(CHUNKS):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(PLAIN)).encode())]})
        await send({"type": "http.response.body", "body": PLAIN})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, http="httptools", loop="uvloop")
'''
BODY = json.dumps({"model": "m", "prompt": "x" * 512, "max_tokens": 16}).encode()


@contextlib.contextmanager
def backend(chunks: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _BACKEND, str(port), str(chunks)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url + "/plain", content=b"{}", timeout=1)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("bench backend did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


Call = Callable[[str], Awaitable[int]]


async def _clients(url: str) -> tuple[dict[str, Call], Callable[[], Awaitable[None]]]:
    """One warm client of each kind; a call POSTs BODY to ``path`` and reads the whole
    answer chunk by chunk (as a relay would), returning the bytes received."""
    import aiohttp

    from router.upstream import UpstreamClient

    hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=256,
                                               max_keepalive_connections=256))
    ah = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    up = UpstreamClient()
    headers = {"content-type": "application/json"}
    raw_headers = [(b"content-type", b"application/json")]

    async def call_httpx(path: str) -> int:
        request = hx.build_request("POST", url + path, content=BODY, headers=headers)
        response = await hx.send(request, stream=True)
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
        await response.aclose()
        return size

    async def call_aiohttp(path: str) -> int:
        size = 0
        async with ah.post(url + path, data=BODY, headers=headers) as response:
            async for chunk in response.content.iter_any():
                size += len(chunk)
        return size

    async def call_upstream(path: str) -> int:
        response = await up.pool(url).request(b"POST", path, raw_headers, BODY)
        size = 0
        async for chunk in response.chunks():
            size += len(chunk)
        return size

    async def close() -> None:
        await hx.aclose()
        await ah.close()
        up.close()

    return {"httpx": call_httpx, "aiohttp": call_aiohttp, "upstream": call_upstream}, close


async def _round(call: Call, path: str, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            if await call(path) <= 0:
                raise RuntimeError("empty answer")
            latencies.append(time.perf_counter() - t0)

    per = requests // concurrency
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    latencies.sort()
    n = len(latencies)
    return {"cpu_us_per_request": cpu / n * 1e6, "latency_ms_p50": latencies[n // 2] * 1e3,
            "requests_per_second": n / wall}


async def _measure(url: str, requests: int, rounds: int, concurrencies: list[int],
                   progress: tqdm) -> dict[str, Any]:
    calls, close = await _clients(url)
    try:
        for call in calls.values():  # warm the pools and code paths
            for path in ("/plain", "/stream"):
                await asyncio.gather(*(call(path) for _ in range(max(concurrencies))))
        samples: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for kind in ("plain", "stream"):
                for concurrency in concurrencies:
                    for name, call in calls.items():
                        samples.setdefault((name, kind, concurrency), []).append(
                            await _round(call, "/" + kind, requests, concurrency))
                        progress.update(1)
    finally:
        await close()
    results: dict[str, Any] = {}
    for (name, kind, concurrency), rows in samples.items():
        entry: dict[str, Any] = {key: round(statistics.median(r[key] for r in rows), 2)
                                 for key in rows[0]}
        entry["cpu_us_per_request_rounds"] = [round(r["cpu_us_per_request"], 1) for r in rows]
        results.setdefault(name, {}).setdefault(kind, {})[f"c{concurrency}"] = entry
    return results


def run(requests: int = 2000, rounds: int = 5, chunks: int = 64,
        concurrencies: tuple[int, ...] = (1, 32), out: Path | None = DEFAULT_OUT
        ) -> dict[str, Any]:
    import uvloop

    total = rounds * 2 * len(concurrencies) * len(CLIENTS)
    with backend(chunks) as url, tqdm(total=total, desc="bench forwarders",
                                      file=sys.stderr) as progress:
        results = uvloop.run(_measure(url, requests, rounds, list(concurrencies), progress))
    base = results["httpx"]
    ratios = {name: {kind: {c: round(results[name][kind][c]["cpu_us_per_request"]
                                     / base[kind][c]["cpu_us_per_request"], 3)
                            for c in base[kind]} for kind in base} for name in results}
    report = {
        "bench": "forwarders",
        "what": "client-process CPU per request (us) and latency through each HTTP client "
                "to the same instant backend; medians over interleaved rounds",
        "requests_per_round": requests, "rounds": rounds, "stream_chunks": chunks,
        "results": results, "cpu_ratio_vs_httpx": ratios,
        "chosen": min(CLIENTS, key=lambda n: results[n]["plain"]["c1"]["cpu_us_per_request"]),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def register_bench(bench_subparsers: Any) -> None:
    parser = bench_subparsers.add_parser(
        "forwarders", help="CPU and latency of HTTP clients the gateway could forward with")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=64, help="SSE events per streamed answer")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = run(args.requests, args.rounds, args.chunks, out=args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, kinds in report["results"].items():
            print(name, {k: v["c1"]["cpu_us_per_request"] for k, v in kinds.items()})
    return 0
