"""In-flight budgets: when every replica is at its budget the gateway answers 429."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from instances.launcher import free_port
from proto.registry import InstanceRecord
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread, wait_until


class HeldBackend:
    """Holds every answer until released; counts what it is holding."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        self.holding += 1
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.holding -= 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"choices": []}'})


def test_full_budgets_answer_429_with_retry_after(redis_url: str, namespace: str) -> None:
    backends = [HeldBackend(), HeldBackend()]
    with serve_in_thread(backends[0], free_port()) as url_a, \
            serve_in_thread(backends[1], free_port()) as url_b:
        async def register() -> None:
            store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=120)
            for i, url in enumerate((url_a, url_b)):
                await store.heartbeat(InstanceRecord(f"held-{i}", url, "m", api="openai"))
            await store.close()

        asyncio.run(register())
        gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                        policy="round_robin", max_inflight_per_instance=2))
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            results: list[int] = []

            def call() -> None:
                results.append(httpx.post(url + "/v1/completions", json={"prompt": "x"},
                                          timeout=30).status_code)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            # Both replicas at their budget of 2 (the gateway spread the 4 over both).
            wait_until(lambda: sum(b.holding for b in backends) == 4, 10)
            assert sorted(b.holding for b in backends) == [2, 2]
            busy = httpx.post(url + "/v1/completions", json={"prompt": "y"}, timeout=10)
            assert busy.status_code == 429
            assert int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
            for b in backends:
                b.release.set()
            for t in threads:
                t.join(10)
            assert results == [200] * 4
            # Room again once they finished.
            assert httpx.post(url + "/v1/completions", json={"prompt": "z"},
                              timeout=10).status_code == 200
