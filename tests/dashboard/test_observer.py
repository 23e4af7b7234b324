"""FleetObserver: events by diffing, windowed TTFT quantiles, ring arcs, the decision hook."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from router.dashboard.observer import RING_BINS, FleetObserver, histogram_quantile
from router.fleet_params import build_fleet_policy, fleet_policy_params
from router.metrics import GatewayMetrics
from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _views(n: int, **changes: Any) -> tuple[InstanceView, ...]:
    return tuple(InstanceView(instance_id=f"i{k:02d}", url=f"http://127.0.0.1:{9000 + k}",
                              **changes) for k in range(n))


def _gateway(policy_name: str = "dualmap", n: int = 4, **params: Any) -> SimpleNamespace:
    policy = build_fleet_policy(policy_name, fleet_policy_params(3.0, None), params)
    snapshot = ClusterSnapshot(1, _views(n))
    policy.adopt(snapshot)
    return SimpleNamespace(
        snapshot=snapshot, policy=policy, metrics=GatewayMetrics(), is_leader=False,
        records={v.instance_id: SimpleNamespace(api="vllm", model="m", load={})
                 for v in snapshot.instances},
        config=SimpleNamespace(gateway_id="gw-test", slo_ttft_s=3.0))


def _observer(gateway: SimpleNamespace) -> tuple[FleetObserver, Clock]:
    clock = Clock()
    return FleetObserver(gateway, clock=clock, wall=clock), clock


def _route(gateway: SimpleNamespace, observer: FleetObserver, count: int, seed: int = 0
           ) -> list[Any]:
    """Route ``count`` prompts as the gateway does: decide, tell the observer, dispatch."""
    rng = random.Random(seed)
    decisions = []
    for i in range(count):
        tokens = np.array([rng.randrange(50_000) for _ in range(64)], dtype=np.int32)
        request = RoutingRequest(f"r{seed}-{i}", tokens, 4)
        decision = gateway.policy.route(request, gateway.snapshot, 0.0)
        observer.on_decision(request.request_id, decision)
        gateway.policy.on_dispatched(request, decision, 0.0)
        gateway.metrics.decisions.labels(policy=gateway.policy.name,
                                         reason=decision.reason).inc()
        decisions.append(decision)
    return decisions


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.5, float("inf"))
    assert histogram_quantile(0.5, bounds, (0, 0, 0, 0)) is None
    # 10 observations in (0.1, 0.2]: the median is the middle of that bucket.
    assert histogram_quantile(0.5, bounds, (0, 10, 10, 10)) == pytest.approx(0.15)
    # 90 at or below 0.1, 10 in (0.2, 0.5]: p99 is 90 % of the way through the last one.
    assert histogram_quantile(0.99, bounds, (90, 90, 100, 100)) == pytest.approx(0.47)
    # Beyond the last finite bound: its lower edge, as Prometheus answers.
    assert histogram_quantile(0.99, bounds, (0, 0, 0, 5)) == 0.5


def test_events_are_found_by_diffing_snapshots_and_leader_ids() -> None:
    gateway = _gateway(n=3)
    observer, clock = _observer(gateway)
    observer.tick("gw-a", True)
    assert [e.kind for e in observer.events] == ["observe"]

    def step(snapshot: ClusterSnapshot, leader: str | None = "gw-a") -> list[str]:
        before = len(observer.events)
        gateway.snapshot = snapshot
        clock.t += 1
        observer.tick(leader, True)
        return [f"{e.kind}:{e.instance_id or ''}" for e in list(observer.events)[before:]]

    views = list(gateway.snapshot.instances)
    assert step(ClusterSnapshot(1, (*views, InstanceView("i03")))) == ["join:i03"]
    views.append(InstanceView("i03"))
    views[0] = replace(views[0], healthy=False)
    assert step(ClusterSnapshot(1, tuple(views))) == ["down:i00"]
    views[1] = replace(views[1], draining=True)
    assert step(ClusterSnapshot(1, tuple(views))) == ["drain:i01"]
    assert step(ClusterSnapshot(2, tuple(views[1:]))) == ["leave:i00", "epoch:"]
    assert step(ClusterSnapshot(2, tuple(views[1:])), leader="gw-b") == ["leader:"]
    views[1] = replace(views[1], draining=False)
    assert step(ClusterSnapshot(2, tuple(views[1:])), leader="gw-b") == ["undrain:i01"]
    gateway.metrics.retries.inc(2)
    assert step(gateway.snapshot, leader="gw-b") == ["failover:"]
    assert "2 request(s) failed over" in observer.events[-1].message
    # Nothing changed: nothing logged.
    assert step(gateway.snapshot, leader="gw-b") == []


def test_series_rates_and_windowed_ttft_from_the_gateway_counters() -> None:
    gateway = _gateway()
    observer, clock = _observer(gateway)
    requests = gateway.metrics.requests.labels(endpoint="/v1/completions", status="200")
    for second in range(30):
        requests.inc(5)
        # TTFT 40 ms for the first 15 s, then 2 s: the 10 s window follows the change.
        for _ in range(5):
            gateway.metrics.ttft.observe(0.04 if second < 15 else 2.0)
        observer.tick()
        clock.t += 1.0
    series = observer.build_state()["series"]
    assert len(series["t"]) == 29
    assert series["rps"][-1] == pytest.approx(5.0)
    assert 0.025 < series["ttft_p50"][10] <= 0.05
    assert 1.5 < series["ttft_p50"][-1] <= 3.0
    assert series["ttft_p99"][-1] >= series["ttft_p50"][-1]
    # Built again: the same points, not recomputed differently.
    assert observer.build_state()["series"] == series


def test_ring_arcs_cover_both_rings_and_follow_routability() -> None:
    gateway = _gateway(n=4)
    observer, _ = _observer(gateway)
    rings = observer.build_state()["rings"]
    assert [len(r["arcs"]) > 4 for r in rings["rings"]] == [True, True]
    for ring in rings["rings"]:
        assert sum(bins for _, bins, _ in ring["arcs"]) == RING_BINS
        assert sum(ring["share"].values()) == pytest.approx(1.0)
        assert set(ring["share"]) == {"i00", "i01", "i02", "i03"}
        for share in ring["share"].values():  # 160 points each: close to a quarter
            assert 0.12 < share < 0.38
    version = observer.rings.version
    observer.build_state()
    assert observer.rings.version == version  # unchanged fleet: not recomputed
    # Draining i02: its arcs pass to others, on both rings.
    views = tuple(replace(v, draining=v.instance_id == "i02") for v in gateway.snapshot.instances)
    gateway.snapshot = ClusterSnapshot(1, views)
    gateway.policy.adopt(gateway.snapshot)
    rings = observer.build_state()["rings"]
    assert observer.rings.version == version + 1
    for ring in rings["rings"]:
        assert "i02" not in ring["share"]
        assert sum(ring["share"].values()) == pytest.approx(1.0)


def test_ring_arcs_agree_with_routing() -> None:
    """Where a key lands on the picture is where DualMap sends it (its first home).

    The picture has half-degree slices; with DualMap's 160 points per instance the arcs
    are finer than that, so here the rings get 8 points per instance, arcs wider than a
    slice, and only keys in a slice that holds an arc boundary may disagree."""
    gateway = _gateway(n=8, vnodes_per_weight=8)
    observer, _ = _observer(gateway)
    observer.tick()
    decisions = _route(gateway, observer, 300)
    state = observer.build_state()
    rings = state["rings"]
    recent = state["recent"]
    assert len(recent) == 64 and all(r["position"] is not None for r in recent)
    by_id = {f"r0-{i}": d for i, d in enumerate(decisions)}
    agree = 0
    for row in recent:
        bin_index = int(row["position"] * RING_BINS)
        owner = next(o for start, bins, o in rings["rings"][0]["arcs"]
                     if start <= bin_index < start + bins)
        agree += rings["members"][owner] == by_id[row["id"]].candidates[0]
    assert agree >= 0.9 * len(recent)


def test_decision_hook_is_bounded_and_state_is_json() -> None:
    gateway = _gateway(n=4)
    clock = Clock()
    observer = FleetObserver(gateway, recent=100, clock=clock, wall=clock)
    observer.tick()
    _route(gateway, observer, 250)
    assert len(observer._decisions) == 100
    state = json.loads(json.dumps(observer.build_state()))
    assert [r["id"] for r in state["instances"]] == ["i00", "i01", "i02", "i03"]
    assert sum(r["routed_per_s"] for r in state["instances"]) == pytest.approx(100 / 10)
    assert state["admission"] == {"enabled": False, "mode": "none",
                                  "modes": ["none", "laps", "laps-spatial"]}
    assert state["migrations"]["enabled"] is False
    assert state["policy"] == "dualmap"


def test_policies_without_rings_say_so() -> None:
    gateway = _gateway("round_robin", n=3)
    observer, _ = _observer(gateway)
    observer.tick()
    _route(gateway, observer, 5)
    state = observer.build_state()
    assert state["rings"]["rings"] == []
    assert all(r["position"] is None for r in state["recent"])


def test_prefix_hit_rate_is_windowed_from_load_reports() -> None:
    gateway = _gateway(n=1)
    observer, clock = _observer(gateway)
    record = gateway.records["i00"]
    for second in range(25):
        # 50 % hits for 10 s, then 100 %: the 10 s window shows the recent rate.
        hits = 50.0 * second if second < 10 else 500.0 + 100.0 * (second - 10)
        record.load = {"prefix_cache_queries": 100.0 * second, "prefix_cache_hits": hits}
        observer.tick()
        clock.t += 1
    row = observer.build_state()["instances"][0]
    assert row["prefix_hit_rate"] == pytest.approx(1.0)  # cumulative it would be ~0.83
