"""The dashboard's admin actions on a live gateway over real Redis (fake registry entries)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from instances.launcher import free_port
from proto.registry import InstanceRecord
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.policy.interfaces import RoutingRequest
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread, wait_until

IDS = ("a", "b", "c")


async def _register(redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=60)
    try:
        for instance_id in IDS:
            await store.heartbeat(InstanceRecord(instance_id, f"http://127.0.0.1:1/{instance_id}",
                                                 "m", load={"report_time": 0.0}))
    finally:
        await store.close()


@pytest.fixture
def gateway(redis_url: str, namespace: str) -> Iterator[tuple[str, Gateway]]:
    asyncio.run(_register(redis_url, namespace))
    gw = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace, policy="dualmap",
                               refresh_interval_s=0.05, heartbeat_ttl_s=60))
    with serve_in_thread(create_gateway_app(gw), free_port()) as url:
        wait_until(lambda: len(gw.snapshot.instances) == len(IDS), timeout_s=10)
        yield url, gw


def _routed(gw: Gateway, count: int = 200) -> set[str]:
    rng = np.random.default_rng(0)
    chosen = set()
    for i in range(count):
        request = RoutingRequest(f"q{i}", rng.integers(0, 50_000, 600, dtype=np.int32), 4)
        chosen.add(gw.policy.route(request, gw.snapshot, 0.0).instance_id)
    return chosen


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_drain_takes_an_instance_out_of_routing_and_back(
        gateway: tuple[str, Gateway]) -> None:
    url, gw = gateway
    assert _routed(gw) == set(IDS)
    response = httpx.post(url + "/admin/instances/b/drain", json={"draining": True})
    assert response.status_code == 200 and response.json() == {"instance_id": "b",
                                                                "draining": True}
    wait_until(lambda: {v.instance_id for v in gw.snapshot.instances if v.draining} == {"b"},
               timeout_s=5)
    assert _routed(gw) == {"a", "c"}
    state = httpx.get(url + "/admin/dashboard/state").json()
    assert {r["id"]: r["draining"] for r in state["instances"]} == {"a": False, "b": True,
                                                                    "c": False}
    for ring in state["rings"]["rings"]:
        assert set(ring["share"]) == {"a", "c"}
    response = httpx.post(url + "/admin/instances/b/drain", json={"draining": False})
    assert response.json()["draining"] is False
    wait_until(lambda: not any(v.draining for v in gw.snapshot.instances), timeout_s=5)
    assert _routed(gw) == set(IDS)
    kinds = [e["kind"] for e in httpx.get(url + "/admin/dashboard/state").json()["events"]]
    assert "drain" in kinds and "undrain" in kinds


def test_drain_of_an_unknown_instance_is_a_404(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    response = httpx.post(url + "/admin/instances/nope/drain", json={"draining": True})
    assert response.status_code == 404
    assert _error(response)["code"] == "instance_not_found"


def test_policy_change_rebuilds_the_gateway_policy(gateway: tuple[str, Gateway]) -> None:
    url, gw = gateway
    response = httpx.post(url + "/admin/policy", json={"policy": "round_robin"})
    assert response.status_code == 200, response.text
    assert response.json()["previous"] == "dualmap"
    assert gw.policy.name == "round_robin" and gw.config.policy == "round_robin"
    assert _routed(gw, 6) <= set(IDS)
    state = httpx.get(url + "/admin/dashboard/state").json()
    assert state["policy"] == "round_robin" and state["rings"]["rings"] == []
    # With explicit parameters, checked like --policy-param.
    response = httpx.post(url + "/admin/policy",
                          json={"policy": "dualmap", "params": {"slo_factor": 0.25}})
    assert response.status_code == 200
    assert gw.policy.slo_bound_s == pytest.approx(0.25 * gw.config.slo_ttft_s)  # type: ignore[attr-defined]
    bad = httpx.post(url + "/admin/policy", json={"policy": "dualmap", "params": {"nope": 1}})
    assert bad.status_code == 400 and _error(bad)["code"] == "invalid_policy_params"
    unknown = httpx.post(url + "/admin/policy", json={"policy": "fastest"})
    assert unknown.status_code == 400 and _error(unknown)["code"] == "unknown_policy"
    assert gw.policy.name == "dualmap"


def test_admission_mode_changes_through_the_gateway(gateway: tuple[str, Gateway]) -> None:
    url, gw = gateway
    state = httpx.get(url + "/admin/dashboard/state").json()
    assert state["admission"]["enabled"] is False and state["admission"]["mode"] == "none"
    response = httpx.post(url + "/admin/admission", json={"mode": "laps"})
    assert response.status_code == 200, response.text
    assert gw.gate.admission.mode == "laps"
    state = httpx.get(url + "/admin/dashboard/state").json()
    assert state["admission"]["enabled"] is True
    assert set(state["admission"]["queued"]) == {"short", "long"}
    unknown = httpx.post(url + "/admin/admission", json={"mode": "fifo"})
    assert unknown.status_code == 400 and _error(unknown)["code"] == "unknown_admission_mode"
    assert httpx.post(url + "/admin/admission", json={"mode": "none"}).status_code == 200
    assert gw.gate.admission.mode == "none"


def test_migrate_of_an_unknown_request_says_so(gateway: tuple[str, Gateway]) -> None:
    # (A live migration from the admin API: tests/migration/test_gateway_drain.py.)
    url, _ = gateway
    response = httpx.post(url + "/admin/requests/some-request/migrate", json={"target": "a"})
    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "request_not_found" and "some-request" in error["message"]


def test_live_stream_pushes_about_once_a_second(gateway: tuple[str, Gateway]) -> None:
    url, _ = gateway
    arrivals = []
    with httpx.stream("GET", url + "/admin/dashboard/events", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((line, time.monotonic()))
                if len(arrivals) == 4:
                    break
    first = json.loads(arrivals[0][0][6:])
    assert "rings" in first and len(first["instances"]) == len(IDS)
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(arrivals[1:])]  # the first: at once
    assert all(0.5 < gap < 1.6 for gap in gaps), gaps
