"""Two gateway processes reading the same Redis state make identical routing decisions."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from router.state import ClusterStateStore, InstanceRecord


async def _register(redis_url: str, namespace: str, n: int) -> None:
    store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=60)
    try:
        for i in range(n):
            await store.heartbeat(InstanceRecord(f"engine-{i:02d}", f"http://127.0.0.1:{i}",
                                                 "m", weight=1.0 + (i % 3)))
        await store.publish_ring([(f"engine-{i:02d}", 1.0 + (i % 3)) for i in range(n)])
    finally:
        await store.close()


def _run(redis_url: str, namespace: str, policy: str, seed: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.gateway.gateway_decisions", redis_url, namespace, policy,
         "10000", str(seed)], capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_two_gateway_processes_agree_on_10k_decisions(redis_url: str, namespace: str) -> None:
    asyncio.run(_register(redis_url, namespace, 12))
    first = _run(redis_url, namespace, "dualmap", seed=7)
    second = _run(redis_url, namespace, "dualmap", seed=7)
    assert first["epoch"] == second["epoch"] == 1
    assert first["digest"] == second["digest"]
    counts = first["counts"]
    assert isinstance(counts, dict) and len(counts) == 12  # every replica is used
