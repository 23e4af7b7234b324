"""KV events in vLLM's wire format: engine publishes over ZMQ, the gateway's view follows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import httpx

from instances.engine.block_manager import compute_block_hashes
from instances.engine.factory import build_engine_core
from instances.launcher import EngineSpec, EngineSupervisor, free_port
from instances.server import EngineServerConfig, create_engine_app
from proto.kv_events import KVEvent, KVEventSubscriber, decode_batch, encode_batch
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.policy.base import PreparedPrompt
from tests.fleet import serve_in_thread, wait_until


def test_wire_format_round_trip() -> None:
    events = [KVEvent("BlockStored", (1, 2), None, tuple(range(32)), 16),
              KVEvent("BlockRemoved", (1,)), KVEvent("AllBlocksCleared")]
    ts, decoded = decode_batch(encode_batch(12.5, events))
    assert ts == 12.5 and decoded == events


def test_engine_publishes_block_hashes_of_its_prompt() -> None:
    core = build_engine_core("emulated", num_gpu_blocks=2048, enable_kv_events=True)
    config = EngineServerConfig(instance_id="engine-kv", kv_events_endpoint="tcp://127.0.0.1:*")
    app = create_engine_app(core, config, speedup=50)
    prompt = "A shared system prompt that spans a few KV blocks. " * 4
    received: list[tuple[str, KVEvent]] = []

    def sink(instance_id: str, events: Iterable[KVEvent]) -> None:
        received.extend((instance_id, e) for e in events)

    async def scenario(url: str, endpoint: str) -> None:
        subscriber = KVEventSubscriber(sink)
        subscriber.sync({"engine-kv": endpoint})
        await asyncio.sleep(0.3)  # let the SUB socket join before anything is published
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/v1/completions",
                                  json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200
        for _ in range(100):
            if any(e.kind == "BlockStored" for _, e in received):
                break
            await asyncio.sleep(0.02)
        await subscriber.close()

    with serve_in_thread(app, free_port()) as url:
        asyncio.run(scenario(url, app.state.kv_events_endpoint))
    stored = [h for i, e in received if e.kind == "BlockStored" and i == "engine-kv"
              for h in e.block_hashes]
    expected = compute_block_hashes(list(prompt.encode()), 16)
    assert stored[: len(expected)] == expected


def test_gateway_view_becomes_precise_from_events(redis_url: str, namespace: str) -> None:
    spec = EngineSpec(instance_id="engine-0", port=free_port(), speedup=50.0,
                      redis_url=redis_url, namespace=namespace,
                      extra_args=["--kv-events-endpoint", "tcp://127.0.0.1:*"])
    supervisor = EngineSupervisor([spec], restart=False)
    supervisor.start()
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace, policy="dualmap",
                                    refresh_interval_s=0.1))
    prompt = "Tell me everything about prefix caching, please. " * 6
    try:
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout_s=10)
            wait_until(lambda: gateway.records["engine-0"].kv_events != "", timeout_s=5)
            time.sleep(0.5)  # subscriber connected before the first publish
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200
            wait_until(lambda: "llmfleet_kv_event_batches_total 0.0" not in
                       httpx.get(url + "/metrics").text, timeout_s=5)
            policy: Any = gateway.policy
            prepared = PreparedPrompt(list(prompt.encode()))
            cached = policy.cache.cached_tokens("engine-0", policy.prefix_hashes(prepared))
            assert cached >= (len(prompt) // 16 - 1) * 16
            assert policy.cache._caches["engine-0"].precise  # fed by events, not guesses
    finally:
        supervisor.stop()
