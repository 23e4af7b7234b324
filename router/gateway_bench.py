"""``llmfleet bench gateway``: what the gateway adds to a request, against direct calls.

Two replicas run fast (``--speedup``, so the engine's own time is small), a gateway runs as
its own process (``llmfleet gateway``, uvicorn) or as a Ray Serve deployment (``--mode ray``),
and one client alternates rounds of direct calls (round-robin over the replicas) with rounds
through the gateway, at the same concurrency, so both see the same machine noise. Reported:

- ``added_latency_ms_p50/p99``: gateway latency percentile minus direct percentile;
- ``cpu_ms_per_request``: CPU seconds the gateway's processes used per request routed;
- ``requests_per_second``: throughput through the gateway at that concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from instances.launcher import EngineSpec, EngineSupervisor
from instances.server import free_port
from router.embedded_redis import embedded_redis

DEFAULT_OUT = Path("docs/results/gateway.json")


async def _round(client: httpx.AsyncClient, urls: list[str], requests: int,
                 concurrency: int, prompt: list[int], max_tokens: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            url = urls[i % len(urls)]
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/completions",
                                  json={"prompt": prompt, "max_tokens": max_tokens})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _gateway_processes(mode: str, gateway_proc: subprocess.Popen[bytes] | None
                       ) -> list[psutil.Process]:
    if mode == "uvicorn":
        assert gateway_proc is not None
        return [psutil.Process(gateway_proc.pid)]
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:llmfleet" in cmd or "ProxyActor" in cmd or "haproxy" in cmd:
            procs.append(proc)
    return procs


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def _gateway(mode: str, redis_url: str, policy: str) -> Iterator[tuple[str, Any]]:
    port = free_port()
    if mode == "uvicorn":
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "gateway", "--redis-url", redis_url,
             "--port", str(port), "--policy", policy],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield f"http://127.0.0.1:{port}", proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # never leave a gateway behind
                proc.kill()
                proc.wait()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")  # as llmfleet up runs it
    import ray
    from ray import serve

    from router.gateway import GatewayConfig
    from router.serve_app import build_gateway_application

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_gateway_application(GatewayConfig(redis_url=redis_url, policy=policy)),
                  name="llmfleet", route_prefix="/")
        yield f"http://127.0.0.1:{port}", None
    finally:
        serve.shutdown()
        ray.shutdown()


def run(mode: str, requests: int, rounds: int, concurrency: int, prompt_tokens: int,
        max_tokens: int, speedup: float, policy: str) -> dict[str, Any]:
    prompt = [(i * 37) % 256 for i in range(prompt_tokens)]
    with embedded_redis() as redis_url:
        specs = [EngineSpec(instance_id=f"bench-{i}", port=free_port(), speedup=speedup,
                            redis_url=redis_url) for i in range(2)]
        supervisor = EngineSupervisor(specs, restart=False)
        supervisor.start()
        try:
            with _gateway(mode, redis_url, policy) as (url, proc):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        health = httpx.get(url + "/health", timeout=2)
                        if health.status_code == 200 and \
                                health.json().get("healthy_instances") == 2:
                            break
                    time.sleep(0.2)
                gateway_procs = _gateway_processes(mode, proc)
                return asyncio.run(_measure(url, [s.url for s in specs], gateway_procs, mode,
                                            requests, rounds, concurrency, prompt, max_tokens,
                                            speedup, policy))
        finally:
            supervisor.stop()


async def _measure(gateway_url: str, engine_urls: list[str], gateway_procs: list[psutil.Process],
                   mode: str, requests: int, rounds: int, concurrency: int, prompt: list[int],
                   max_tokens: int, speedup: float, policy: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    direct: list[float] = []
    through: list[float] = []
    gateway_wall = 0.0
    gateway_cpu = 0.0
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        # Warm both paths (connections, JIT-free but cache-warm code paths).
        await _round(client, engine_urls, concurrency * 2, concurrency, prompt, max_tokens)
        await _round(client, [gateway_url], concurrency * 2, concurrency, prompt, max_tokens)
        for _ in range(rounds):
            direct += await _round(client, engine_urls, requests, concurrency, prompt,
                                   max_tokens)
            cpu0 = _cpu_seconds(gateway_procs)
            t0 = time.perf_counter()
            through += await _round(client, [gateway_url], requests, concurrency, prompt,
                                    max_tokens)
            gateway_wall += time.perf_counter() - t0
            gateway_cpu += _cpu_seconds(gateway_procs) - cpu0
    d50, d99 = np.percentile(direct, [50, 99])
    g50, g99 = np.percentile(through, [50, 99])
    return {
        "benchmark": "gateway",
        "mode": mode,
        "policy": policy,
        "concurrency": concurrency,
        "requests": len(through),
        "prompt_tokens": len(prompt),
        "max_tokens": max_tokens,
        "engine_speedup": speedup,
        "direct_latency_ms_p50": d50 * 1e3,
        "direct_latency_ms_p99": d99 * 1e3,
        "gateway_latency_ms_p50": g50 * 1e3,
        "gateway_latency_ms_p99": g99 * 1e3,
        "added_latency_ms_p50": (g50 - d50) * 1e3,
        "added_latency_ms_p99": (g99 - d99) * 1e3,
        "cpu_ms_per_request": gateway_cpu / len(through) * 1e3,
        "requests_per_second": len(through) / gateway_wall,
        "cpu_count": os.cpu_count(),
    }


def register_bench(bench_subparsers: Any) -> None:
    parser = bench_subparsers.add_parser(
        "gateway", help="latency and CPU the gateway adds, against direct calls")
    parser.add_argument("--mode", choices=("uvicorn", "ray", "both"), default="both")
    parser.add_argument("--requests", type=int, default=400, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--speedup", type=float, default=100.0)
    parser.add_argument("--policy", default="dualmap")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    modes = ["uvicorn", "ray"] if args.mode == "both" else [args.mode]
    results = {m: run(m, args.requests, args.rounds, args.concurrency, args.prompt_tokens,
                      args.max_tokens, args.speedup, args.policy) for m in modes}
    out = {"results": results, "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
