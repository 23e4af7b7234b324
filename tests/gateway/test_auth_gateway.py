"""API keys through real gateways: two replicas, one key table in Redis (issue 9)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from instances.launcher import free_port
from proto.registry import InstanceRecord
from router.auth import KeyStore
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread

ADMIN = "admin-token-for-tests-0123456789"


async def _backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"choices": []}'})


def test_two_gateways_enforce_keys_and_honour_a_revocation_within_a_second(
        redis_url: str, namespace: str) -> None:
    async def setup() -> tuple[str, str]:
        store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=120)
        await store.heartbeat(InstanceRecord("b-0", backend_url, "m", api="openai"))
        await store.close()
        async with KeyStore(redis_url, namespace) as keys:
            await keys.set_admin_token(ADMIN)
            return await keys.create("ci")

    def gateway_app() -> Any:
        return create_gateway_app(Gateway(GatewayConfig(redis_url=redis_url,
                                                        namespace=namespace, auth=True)))

    with serve_in_thread(_backend, free_port()) as backend_url:
        key_id, secret = asyncio.run(setup())
        with serve_in_thread(gateway_app(), free_port()) as url_a, \
                serve_in_thread(gateway_app(), free_port()) as url_b:
            urls = (url_a, url_b)
            good = {"authorization": f"Bearer {secret}"}
            for url in urls:
                for path in ("/v1/completions", "/v1/chat/completions"):
                    body: dict[str, Any] = {"prompt": "x"} if "chat" not in path else {
                        "messages": [{"role": "user", "content": "x"}]}
                    assert httpx.post(url + path, json=body, timeout=10).status_code == 401
                    assert httpx.post(url + path, json=body, timeout=10, headers={
                        "authorization": "Bearer sk-llmfleet-nope"}).status_code == 401
                    assert httpx.post(url + path, json=body, headers=good,
                                      timeout=10).status_code == 200
                assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
                assert httpx.get(url + "/v1/models", headers=good, timeout=10).status_code == 200
                # Admin routes take the admin token, never an API key.
                assert httpx.get(url + "/admin/instances", headers=good,
                                 timeout=10).status_code == 403
                assert httpx.get(url + "/admin/instances", timeout=10,
                                 headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
                assert httpx.get(url + "/health", timeout=10).status_code == 200

            async def revoke() -> None:
                async with KeyStore(redis_url, namespace) as keys:
                    await keys.revoke(key_id)

            asyncio.run(revoke())
            revoked_at = time.monotonic()
            refused_after: dict[str, float] = {}
            while len(refused_after) < 2 and time.monotonic() - revoked_at < 5:
                for url in urls:
                    if url not in refused_after and httpx.post(
                            url + "/v1/completions", json={"prompt": "x"}, headers=good,
                            timeout=10).status_code == 401:
                        refused_after[url] = time.monotonic() - revoked_at
                time.sleep(0.02)
            assert set(refused_after) == set(urls)
            assert max(refused_after.values()) < 1.0, refused_after
