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

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from migration.coordinator import MigrationCoordinator
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.fleet import serve_in_thread, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PROMPT = "Once upon a time, in a fleet of replicas far away, " * 4
MAX_TOKENS = 300  # ~2 s of H100 decode: time to move it


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    specs = [EngineSpec(instance_id=f"engine-{i}", port=free_port(), speedup=1.0,
                        redis_url=redis_url, namespace=namespace, heartbeat_ttl_s=1.5)
             for i in range(2)]
    supervisor = EngineSupervisor(specs, restart=False)
    supervisor.start()
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    policy="round_robin", heartbeat_ttl_s=1.5,
                                    refresh_interval_s=0.1))
    try:
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            wait_until(lambda: len([r for r in gateway.records.values() if r.migration]) == 2,
                       timeout_s=15)
            yield {"url": url, "supervisor": supervisor, "gateway": gateway}
    finally:
        supervisor.stop()


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
