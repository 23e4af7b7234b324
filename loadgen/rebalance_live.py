"""Freeness rebalancing on vs off, live: a KV hotspot on one replica behind the real gateway.

``python -m loadgen.rebalance_live --json --out docs/results/migration-rebalance.json``

Each run starts an embedded Redis, ``--engines`` emulated reference-engine replicas (real
time) with ``--blocks`` KV blocks each, and ``llmfleet gateway`` (a child process, round
robin) with ``--migration-rebalance on`` or ``off``. Every replica but ``engine-0`` is
drained through the admin API while ``--streams`` long streams start, so all of them run on
``engine-0``; once every stream has its first token the others are taken back. Their
answers together need more KV than ``engine-0`` has: without rebalancing it preempts and
recomputes; with it, the gateway's control loop live-migrates streams to the freer
replicas. Measured from the moment the others come back: the time until the last stream
ends (makespan), the mean time a stream takes from its start, ``engine-0``'s preemptions,
the migrations the gateway committed and their mean downtime (its ``/metrics``), and that
every stream ended whole (``max_tokens`` completion tokens, no error). On and off runs
alternate, ``--rounds`` times each; medians and on/off ratios are reported.

This is the case rebalancing is for (one replica crowded, others free); it says nothing of
a workload a load-aware router already keeps balanced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PARAMS = {"threshold": 6.0, "period_s": 0.2, "max_per_source": 2, "cooldown_s": 30.0}


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of the first Prometheus sample ``name`` carrying ``labels`` (0 if none),
    read with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _wait_ready(url: str, engines: int, proc: subprocess.Popen[bytes],
                timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(url + "/health", timeout=2.0).json()
            if health.get("healthy_instances", 0) >= engines:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready after {timeout_s}s")


@contextlib.contextmanager
def _fleet(redis_url: str, namespace: str, engines: int, blocks: int, rebalance: bool,
           params: dict[str, Any], log_dir: str) -> Iterator[tuple[str, list[str]]]:
    """Replicas and a gateway; yields (gateway URL, engine URLs)."""
    from instances.launcher import EngineSpec, EngineSupervisor, free_port, stop_process

    heartbeat_ttl_s = 1.5  # load reports every 0.5 s
    specs = [EngineSpec(instance_id=f"engine-{i}", port=free_port(), redis_url=redis_url,
                        namespace=namespace, heartbeat_ttl_s=heartbeat_ttl_s,
                        extra_args=["--num-gpu-blocks", str(blocks)])
             for i in range(engines)]
    supervisor = EngineSupervisor(specs, log_dir=log_dir, restart=False)
    port = free_port()
    command = [sys.executable, "-m", "router.cli", "gateway", "--redis-url", redis_url,
               "--port", str(port), "--namespace", namespace, "--policy", "round_robin",
               "--heartbeat-ttl", repr(heartbeat_ttl_s),
               "--migration-rebalance", "on" if rebalance else "off"]
    for key, value in params.items():
        command += ["--migration-param", f"{key}={value}"]
    with contextlib.ExitStack() as stack:
        stack.callback(supervisor.stop)
        supervisor.start()
        log = stack.enter_context(open(os.path.join(log_dir, "gateway.log"), "ab"))
        gateway = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})

        stack.callback(stop_process, gateway, signal.SIGINT, 10.0)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, engines, gateway)
        yield url, [spec.url for spec in specs]


async def _hotspot(url: str, engines: int, streams: int, max_tokens: int
                   ) -> dict[str, Any]:
    """Pin ``streams`` streams to engine-0, take the others back, wait for the ends."""
    others = [f"engine-{i}" for i in range(1, engines)]
    started = asyncio.Semaphore(0)
    ends: list[tuple[float, float]] = []  # (start, end) per stream
    tokens: list[int] = []
    errors: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"{i}: a long answer about fleets of replicas, caches and queues. ",
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, first, raw = time.monotonic(), True, b""
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.headers.get("x-llmfleet-instance") != "engine-0":
                errors.append(f"stream {i} went to {response.headers.get('x-llmfleet-instance')}")
            async for data in response.aiter_raw():
                raw += data
                if first and b'"text":"' in raw:
                    first = False
                    started.release()
        ends.append((t0, time.monotonic()))
        for event in raw.split(b"\n\n"):
            if event.startswith(b"data: {"):
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    errors.append(str(chunk["error"]))
                if chunk.get("usage"):
                    tokens.append(int(chunk["usage"]["completion_tokens"]))
            elif event.strip() and event != b"data: [DONE]":
                errors.append(event[:80].decode(errors="replace"))

    async with httpx.AsyncClient(timeout=120) as client:
        for instance_id in others:
            await client.post(url + f"/admin/instances/{instance_id}/drain",
                              json={"draining": True})
        await asyncio.sleep(1.0)  # the gateway's next refreshes see them draining
        tasks = [asyncio.ensure_future(one(client, i)) for i in range(streams)]
        for _ in range(streams):
            await asyncio.wait_for(started.acquire(), timeout=60)
        back = time.monotonic()
        for instance_id in others:
            await client.post(url + f"/admin/instances/{instance_id}/drain",
                              json={"draining": False})
        await asyncio.gather(*tasks)
    return {
        "makespan_s": max(end for _, end in ends) - back,
        "mean_stream_s": statistics.mean(end - start for start, end in ends),
        "whole_streams": sum(t == max_tokens for t in tokens),
        "errors": errors,
    }


def run_once(redis_url: str, rebalance: bool, args: argparse.Namespace, params: dict[str, Any],
             log_dir: str, run: int) -> dict[str, Any]:
    namespace = f"rebalance{run}"
    with _fleet(redis_url, namespace, args.engines, args.blocks, rebalance, params,
                log_dir) as (url, engine_urls):
        result = asyncio.run(_hotspot(url, args.engines, args.streams, args.max_tokens))
        gateway_metrics = httpx.get(url + "/metrics", timeout=10).text
        engine_metrics = httpx.get(engine_urls[0] + "/metrics", timeout=10).text
    downtime_count = _metric(gateway_metrics, "llmfleet_migration_downtime_seconds_count")
    downtime_sum = _metric(gateway_metrics, "llmfleet_migration_downtime_seconds_sum")
    return {
        "rebalance": "on" if rebalance else "off",
        **result,
        "preemptions_engine0": _metric(engine_metrics, "vllm:num_preemptions_total"),
        "migrations_committed": _metric(gateway_metrics, "llmfleet_migrations_total",
                                        outcome="committed", reason="freeness"),
        "migrations_not_committed": sum(
            _metric(gateway_metrics, "llmfleet_migrations_total", outcome=o, reason="freeness")
            for o in ("aborted", "failed")),
        "mean_downtime_ms": 1000 * downtime_sum / downtime_count if downtime_count else None,
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode and on/off ratios of the medians."""
    keys = ("makespan_s", "mean_stream_s", "preemptions_engine0", "migrations_committed")
    medians = {mode: {k: statistics.median(r[k] for r in runs if r["rebalance"] == mode)
                      for k in keys} for mode in ("on", "off")}
    return {"median": medians,
            "on_over_off": {k: medians["on"][k] / medians["off"][k]
                            for k in ("makespan_s", "mean_stream_s") if medians["off"][k]}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.rebalance_live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=3)
    p.add_argument("--blocks", type=int, default=96, help="KV blocks (of 16 tokens) per replica")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3, help="on and off runs each, alternating")
    p.add_argument("--migration-param", action="append", metavar="KEY=VALUE",
                   help=f"rebalancing parameter (default {DEFAULT_PARAMS})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from router.embedded_redis import embedded_redis
    from router.up import parse_params

    args = build_parser().parse_args(argv)
    params = {**DEFAULT_PARAMS, **parse_params(args.migration_param, "--migration-param")}
    workdir = tempfile.mkdtemp(prefix="llmfleet-rebalance-")
    runs: list[dict[str, Any]] = []
    with embedded_redis(workdir) as redis_url:
        for _ in range(args.rounds):
            for rebalance in (False, True):
                runs.append(run_once(redis_url, rebalance, args, params, workdir,
                                     len(runs)))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {
        "command": "python -m loadgen.rebalance_live " + " ".join(argv or sys.argv[1:]),
        "config": {"engines": args.engines, "blocks_per_engine": args.blocks,
                   "block_size": 16, "streams": args.streams, "max_tokens": args.max_tokens,
                   "rounds": args.rounds, "policy": "round_robin", "migration_params": params},
        "runs": runs,
        **summarize(runs),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for mode, values in result["median"].items():
            print(mode, values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
