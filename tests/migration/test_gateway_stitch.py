"""Through the real gateway (engine processes, Redis registry, the gateway's relay): a
stream keeps going, token-identical, when its request is live-migrated, and when the
replica serving it is killed mid-stream (token replay on the survivor)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from migration.coordinator import MigrationCoordinator
from router.gateway import Gateway
from tests.fleet import gateway_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PROMPT = "Once upon a time, in a fleet of replicas far away, " * 4
MAX_TOKENS = 300  # ~2 s of H100 decode: time to move it


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    with gateway_fleet(redis_url, namespace, 2, speedup=1.0,
                       policy="round_robin") as fleet:
        yield fleet


def _expected_text(fleet: dict[str, Any]) -> str:
    engine = fleet["supervisor"].engines[0].spec.url
    body = {"model": "llmfleet-emulated", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    return str(httpx.post(engine + "/v1/completions", json=body, timeout=60)
               .json()["choices"][0]["text"])


def _text(events: list[bytes]) -> tuple[str, int]:
    text, done = "", 0
    for event in b"".join(events).split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = json.loads(event[6:])
            text += "".join(c.get("text", "") for c in chunk["choices"])
        done += event == b"data: [DONE]"
    return text, done


async def _stream(url: str, on_chunk: Any) -> tuple[list[bytes], str]:
    body = {"model": "llmfleet-emulated", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
            "stream": True}
    received: list[bytes] = []
    async with httpx.AsyncClient(timeout=60) as client, client.stream(
            "POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        serving = response.headers["x-llmfleet-instance"]
        request_id = response.headers["x-request-id"]
        async for data in response.aiter_raw():
            received.append(data)
            await on_chunk(len(received), serving, request_id)
    return received, serving


async def test_stream_through_the_gateway_follows_a_live_migration(
    fleet: dict[str, Any],
) -> None:
    expected = _expected_text(fleet)
    gateway: Gateway = fleet["gateway"]
    coordinator = MigrationCoordinator()
    moved: list[Any] = []

    async def on_chunk(count: int, serving: str, request_id: str) -> None:
        if count == 5 and not moved:
            records = gateway.records
            target = next(i for i in records if i != serving)
            moved.append(await coordinator.migrate(
                request_id, records[serving].migration, records[target].migration))

    received, _ = await _stream(fleet["url"], on_chunk)
    await coordinator.close()
    assert moved and moved[0].committed, moved
    text, done = _text(received)
    assert text == expected and done == 1
    assert b"llmfleet.migrated" not in b"".join(received)
    assert gateway.relay.resumer.resumed["migration"] == 1  # type: ignore[union-attr]


async def test_stream_through_the_gateway_survives_its_replica_dying(
    fleet: dict[str, Any],
) -> None:
    expected = _expected_text(fleet)
    gateway: Gateway = fleet["gateway"]
    engines = {e.spec.instance_id: e for e in fleet["supervisor"].engines}

    async def on_chunk(count: int, serving: str, request_id: str) -> None:
        if count == 20:
            proc = engines[serving].proc
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)

    received, _ = await _stream(fleet["url"], on_chunk)
    text, done = _text(received)
    assert text == expected and done == 1
    assert gateway.relay.resumer.resumed["replay"] == 1  # type: ignore[union-attr]
