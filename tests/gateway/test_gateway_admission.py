"""LAPS admission in the live gateway: requests queue at the admit seam and all get served."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.gateway import Gateway
from tests.fleet import gateway_fleet


@pytest.fixture
def laps_fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    # A small in-flight prefill budget so that a burst really queues at the gateway.
    with gateway_fleet(redis_url, namespace, 2, speedup=20.0, heartbeat_ttl_s=2.0,
                       policy="dualmap", admission="laps",
                       admission_params={"budget_tokens": 4096}) as fleet:
        yield fleet


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


@pytest.mark.e2e
def test_a_burst_queues_and_every_request_is_served_once(laps_fleet: dict[str, Any]) -> None:
    url = laps_fleet["url"]

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i: int) -> tuple[int, str]:
                # Longs (6k-token prompts) and shorts (a few hundred) mixed.
                prompt = (f"doc {i} " + "x" * 6000) if i % 3 == 0 else f"question {i} " * 30
                if i % 2:
                    r = await client.post(url + "/v1/completions", json={
                        "prompt": prompt, "max_tokens": 8})
                    return r.status_code, r.json()["choices"][0]["text"]
                text = ""
                async with client.stream("POST", url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                        "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += line
                return r.status_code, text

            return await asyncio.gather(*(one(i) for i in range(24)))

    results = asyncio.run(burst())
    assert [status for status, _ in results] == [200] * 24
    assert all(text for _, text in results)
    gateway: Gateway = laps_fleet["gateway"]
    counters = gateway.gate.admission.counters()
    assert counters["submitted"] == 24
    assert sum(counters["queued"].values()) == 0  # nothing left behind
    assert sum(counters["released"].values()) == 24  # each released exactly once
    assert max(counters["wait_s_max"].values()) > 0  # the burst did queue at the gateway
    assert gateway.gate.inflight == {}
    metrics = httpx.get(url + "/metrics").text
    assert _metric(metrics, "llmfleet_admission_queue_wait_seconds_count") == 24
