"""Gateway against real engine processes: spreading, retries and dropping a dead replica."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from instances.launcher import free_port
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.fleet import engine_requests_served, gateway_fleet, serve_in_thread, wait_until

TTL_S = 1.5


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    with gateway_fleet(redis_url, namespace, 2, speedup=50.0, heartbeat_ttl_s=TTL_S,
                       policy="round_robin") as fleet:
        yield fleet


def _complete(url: str, prompt: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=30,
                      json={"model": "llmfleet-emulated", "prompt": prompt, "max_tokens": 4})


def test_round_robin_spreads_and_counts_decisions(fleet: dict[str, Any]) -> None:
    url = fleet["url"]
    served_by = {_complete(url, f"p{i}").headers["x-llmfleet-instance"] for i in range(6)}
    assert served_by == {"engine-0", "engine-1"}
    for engine in fleet["supervisor"].engines:
        assert engine_requests_served(engine.spec.url) == 3
    metrics = httpx.get(url + "/metrics").text
    assert 'llmfleet_routing_decisions_total{policy="round_robin",reason="round_robin"} 6.0' \
        in metrics


def test_dead_replica_is_dropped_within_ttl_and_no_request_fails(
        fleet: dict[str, Any]) -> None:
    url = fleet["url"]
    victim = fleet["supervisor"].engines[0]
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    # Requests right after the crash are retried on the survivor, never failed.
    for i in range(6):
        response = _complete(url, f"after crash {i}")
        assert response.status_code == 200, response.text
        assert response.headers["x-llmfleet-instance"] == "engine-1"

    def dropped() -> bool:
        ids = [v["instance_id"] for v in httpx.get(url + "/admin/instances").json()["instances"]
               if v["healthy"]]
        return ids == ["engine-1"]

    # Gone from the registry (not just locally suspected) within its TTL plus one refresh.
    gateway: Gateway = fleet["gateway"]
    took = wait_until(lambda: asyncio.run(_fresh_ids(gateway)) == ["engine-1"],
                      timeout_s=TTL_S + 1.0)
    assert took <= TTL_S + 0.5
    wait_until(dropped, timeout_s=1.0)


async def _fresh_ids(gateway: Gateway) -> list[str]:
    from router.state import ClusterStateStore

    store = ClusterStateStore(gateway.config.redis_url, gateway.config.namespace)
    try:
        return [r.instance_id for r in await store.live_instances()]
    finally:
        await store.close()


def test_no_replica_gives_503(redis_url: str, namespace: str) -> None:
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    policy="round_robin"))
    with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
        response = _complete(url, "anyone?")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_healthy_replica"
        assert httpx.get(url + "/health").status_code == 503


def test_every_replica_failing_gives_503_that_says_how(redis_url: str, namespace: str) -> None:
    # Two registered replicas that refuse connections: both are tried, and the client is
    # told they failed (and how), not that none was healthy.
    from proto.registry import InstanceRecord
    from router.state import ClusterStateStore

    async def register() -> None:
        store = ClusterStateStore(redis_url, namespace, 30.0)
        for name in ("ghost-0", "ghost-1"):
            await store.heartbeat(InstanceRecord(
                instance_id=name, url=f"http://127.0.0.1:{free_port()}", model="ghostly"))
        await store.close()

    asyncio.run(register())
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    policy="round_robin"))
    with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
        response = httpx.post(url + "/v1/completions", timeout=30,
                              json={"model": "ghostly", "prompt": "anyone?", "max_tokens": 4})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["message"].startswith("All replicas failed: ghost-")


def test_replica_dying_mid_stream_ends_stream_with_error_event(fleet: dict[str, Any]) -> None:
    # Without token replay nothing can continue the stream (tests/migration covers replay).
    fleet["gateway"].relay.resumer.replay = False
    url = fleet["url"]
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "prompt": "a long answer please", "max_tokens": 20000, "stream": True}) as response:
        assert response.status_code == 200
        serving = response.headers["x-llmfleet-instance"]
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        victim = next(e for e in fleet["supervisor"].engines if e.spec.instance_id == serving)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "upstream_stream_broken"
    assert error["message"].endswith("it could not be continued: token replay is off")
    # and the fleet keeps serving
    assert _complete(url, "still there?").status_code == 200


def test_replica_dying_before_a_non_streamed_answer_is_retried(fleet: dict[str, Any]) -> None:
    import concurrent.futures

    url = fleet["url"]
    engines = fleet["supervisor"].engines
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, url + "/v1/completions", timeout=60, json={
            "prompt": "answer slowly", "max_tokens": 20000})

        def serving() -> Any:
            for engine in engines:
                if httpx.get(engine.spec.url + "/load").json()["num_running"] == 1:
                    return engine
            return None

        wait_until(lambda: serving() is not None, timeout_s=10, interval_s=0.01)
        victim = serving()
        victim.proc.send_signal(signal.SIGKILL)
        response = future.result()
    assert response.status_code == 200, response.text
    assert response.headers["x-llmfleet-instance"] != victim.spec.instance_id
    assert response.json()["usage"]["completion_tokens"] == 20000


def test_clients_reusing_a_request_id_do_not_collide(fleet: dict[str, Any]) -> None:
    import concurrent.futures

    def call(_: int) -> httpx.Response:
        return httpx.post(fleet["url"] + "/v1/completions", timeout=30,
                          headers={"x-request-id": "same-id"},
                          json={"prompt": "hello", "max_tokens": 200})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, range(4)))
    assert [r.status_code for r in responses] == [200] * 4
