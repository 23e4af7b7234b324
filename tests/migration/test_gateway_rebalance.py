"""Freeness rebalancing through the real gateway (issue 11): Llumnix's policy in the control
loop moves running streams off a replica short of KV blocks.

Three emulated engine processes with small KV caches behind a gateway with
``migration_rebalance`` on. Every stream is pinned to ``engine-0`` (the two others are
drained while the streams start, then taken back), so ``engine-0`` runs out of free blocks
per request as the answers grow; the gateway's control loop live-migrates some of its
streams to the freer replicas. Every client stream stays whole (the exact unmigrated text,
every token once), no client sees an error, and ``/metrics`` counts the moves with reason
``freeness``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proto import byte_tokenizer
from router.gateway import Gateway
from tests.fleet import gateway_fleet, wait_until
from tests.migration.fleet import reference_tokens
from tests.sse import StreamAnswer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STREAMS = 8
MAX_TOKENS = 320  # ~3 s of modelled decode at speedup 1
# 96 blocks of 16 tokens per replica: 8 answers of ~24 blocks each need twice what
# engine-0 has, the three replicas together have room for them.
ENGINE_BLOCKS = 96
PARAMS = {"threshold": 6.0, "period_s": 0.2, "max_per_source": 2, "cooldown_s": 30.0}


def _prompt(i: int) -> str:
    return f"{i}: a long answer about fleets of replicas, caches and queues. "


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    with gateway_fleet(redis_url, namespace, 3, speedup=1.0, policy="round_robin",
                       engine_args=("--num-gpu-blocks", str(ENGINE_BLOCKS)),
                       migration_rebalance=True, migration_params=PARAMS) as fleet:
        yield fleet


def _expected(i: int) -> str:
    """The unmigrated answer, from an engine core of our own (virtual time)."""
    return byte_tokenizer.decode(reference_tokens(
        byte_tokenizer.encode(_prompt(i)), MAX_TOKENS, 0.0, "reference", executor="emulated"))


async def _stream(client: httpx.AsyncClient, url: str, i: int, answer: StreamAnswer) -> None:
    body = {"prompt": _prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        answer.serving = response.headers["x-llmfleet-instance"]
        async for data in response.aiter_raw():
            answer.absorb(data)
    assert answer.raw == b"", answer.raw  # the stream ended on an event boundary


def _drain(url: str, instance_id: str, draining: bool) -> None:
    r = httpx.post(url + f"/admin/instances/{instance_id}/drain",
                   json={"draining": draining}, timeout=10)
    assert r.status_code == 200, r.text


def test_freeness_rebalancing_moves_streams_off_a_crowded_replica(
    fleet: dict[str, Any],
) -> None:
    url, gateway = fleet["url"], fleet["gateway"]
    assert isinstance(gateway, Gateway)
    others = ("engine-1", "engine-2")
    for instance_id in others:
        _drain(url, instance_id, True)
    wait_until(lambda: {v.instance_id for v in gateway.snapshot.instances if v.draining}
               == set(others), timeout_s=10)
    answers = [StreamAnswer() for _ in range(STREAMS)]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [asyncio.ensure_future(_stream(client, url, i, answer))
                       for i, answer in enumerate(answers)]
            # Every stream decoding on engine-0, then the others come back: engine-0 is
            # the crowded one and they are empty.
            for _ in range(500):
                if len(gateway.streams) == STREAMS and all(
                        c.first_token_at is not None for c in gateway.streams.values()):
                    break
                await asyncio.sleep(0.02)
            else:
                raise TimeoutError("the streams did not all start")
            for instance_id in others:
                await asyncio.to_thread(_drain, url, instance_id, False)
            await asyncio.gather(*streams)

    asyncio.run(main())
    assert {a.serving for a in answers} == {"engine-0"}
    for i, answer in enumerate(answers):
        assert not answer.errors, answer.errors
        assert answer.done == 1
        assert answer.completion_tokens == MAX_TOKENS
        assert answer.text == _expected(i), i
    moves = [r for r in gateway.migrations.recent() if r.trigger == "freeness"]
    committed = [r for r in moves if r.state == "committed"]
    # Some streams left engine-0 for the freer replicas; not every one (it keeps some).
    assert committed, moves
    assert any(r.source == "engine-0" and r.target in others for r in committed), committed
    assert len({r.request_id for r in committed if r.source == "engine-0"}) < STREAMS
    # The cooldown: no request moved twice (nothing ping-pongs).
    assert len({r.request_id for r in moves}) == len(moves)
    assert not [r for r in gateway.migrations.recent() if r.trigger != "freeness"]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    counted = re.search(r'llmfleet_migrations_total\{outcome="committed",reason="freeness"\} '
                        r"([0-9.]+)", metrics)
    assert counted is not None and float(counted.group(1)) == len(committed)
