"""Servers put behind the gateway through the admin API join and leave the fleet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.fleet import serve_in_thread, wait_until


@pytest.fixture
def unregistered_server() -> Iterator[str]:
    """A reference engine that does not register itself: a server the fleet did not start."""
    spec = EngineSpec(instance_id="outside", port=free_port(), speedup=50.0)
    supervisor = EngineSupervisor([spec], restart=False)
    supervisor.start()
    try:
        yield f"http://127.0.0.1:{spec.port}"
    finally:
        supervisor.stop()


def _healthy(url: str) -> list[str]:
    rows = httpx.get(url + "/admin/instances", timeout=5).json()["instances"]
    return [r["instance_id"] for r in rows if r["healthy"]]


@pytest.mark.e2e
def test_backend_added_and_removed_by_the_admin_api(redis_url: str, namespace: str,
                                                    unregistered_server: str) -> None:
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    heartbeat_ttl_s=1.5, refresh_interval_s=0.1))
    with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        added = httpx.post(url + "/admin/backends", json={
            "url": unregistered_server, "instance_id": "ext-1"}).json()
        assert added == {"instance_id": "ext-1", "url": unregistered_server}
        listed: dict[str, Any] = httpx.get(url + "/admin/backends").json()
        assert listed["backends"] == [{"instance_id": "ext-1", "url": unregistered_server}]
        wait_until(lambda: _healthy(url) == ["ext-1"], timeout_s=15)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200 and r.headers["x-llmfleet-instance"] == "ext-1"
        assert httpx.delete(url + "/admin/backends/ext-1").json()["removed"] is True
        wait_until(lambda: _healthy(url) == [], timeout_s=15)
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 503


@pytest.mark.parametrize(("body", "param"), [
    ({"url": "ftp://x"}, "url"),
    ({"url": "http://127.0.0.1:1", "kind": "tgi"}, "kind"),
    ({"kind": "vllm"}, "url"),
])
def test_bad_backends_are_refused(redis_url: str, namespace: str, body: dict[str, Any],
                                  param: str) -> None:
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace))
    with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
        r = httpx.post(url + "/admin/backends", json=body)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == param
        missing = httpx.delete(url + "/admin/backends/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "backend_not_found"
