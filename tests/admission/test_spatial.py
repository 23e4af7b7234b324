"""Spatial LAPS: adaptive pools, routing within a class's pool."""

from __future__ import annotations

import itertools

import numpy as np

from router.admission import LONG, SHORT, build_admission
from router.admission.decide import route
from router.admission.spatial import SpatialLapsAdmission
from router.policy.dualmap import DualMapPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, InstanceView, RoutingRequest


def _snapshot(n: int = 8) -> ClusterSnapshot:
    return ClusterSnapshot(1, tuple(InstanceView(f"i{k:02d}") for k in range(n)))


def _spatial(**params: object) -> SpatialLapsAdmission:
    defaults: dict[str, object] = {"adaptive_boundary": False, "work_decay": 0.9,
                                   "initial_long_share": 0.25}
    defaults.update(params)
    admission = build_admission("laps-spatial", **defaults)
    assert isinstance(admission, SpatialLapsAdmission)
    return admission


def _submit(admission: SpatialLapsAdmission, rid: str, tokens: int, now: float) -> None:
    admission.submit(RoutingRequest(rid, list(range(tokens))), Decision("i00", "x"), now)


def test_the_split_follows_each_class_load_one_instance_at_a_time() -> None:
    admission = _spatial()
    snap = _snapshot(8)
    assert len(admission.pools(snap)[LONG]) == 2  # 25 % of 8 to start
    sizes = []
    for k in range(60):  # long-heavy traffic: the long pool grows, step by step
        _submit(admission, f"l{k}", 5000, k * 0.01)
        _submit(admission, f"s{k}", 100, k * 0.01)
        sizes.append(len(admission.pools(snap)[LONG]))
    assert sizes[-1] == 7  # never the whole fleet: the short pool keeps one
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(sizes))
    for k in range(200):  # now almost only shorts: it shrinks back, to one at least
        _submit(admission, f"t{k}", 200, 1.0 + k * 0.01)
        sizes.append(len(admission.pools(snap)[LONG]))
    assert sizes[-1] == 1
    pools = admission.pools(snap)
    assert pools[LONG] | pools[SHORT] == {v.instance_id for v in snap.instances}
    assert not pools[LONG] & pools[SHORT]
    assert admission.counters()["pool_changes"] == 5 + 6  # 2 -> 7 -> 1


def test_restrict_shows_the_other_pool_as_draining_and_is_reused() -> None:
    admission = _spatial()
    snap = _snapshot(8)
    restricted = admission.restrict(snap, SHORT)
    assert restricted is not None
    assert [v.instance_id for v in restricted.instances if not v.draining] == [
        f"i{k:02d}" for k in range(2, 8)]
    assert admission.restrict(snap, SHORT) is restricted  # same snapshot: same object


def test_dualmap_draws_its_homes_within_the_class_pool() -> None:
    rng = np.random.default_rng(1)
    admission = _spatial(work_decay=0.999)
    policy = DualMapPolicy(slo_ttft_s=100.0)  # no SLO switch: homes only
    snap = _snapshot(8)
    pools = admission.pools(snap)
    for k in range(40):
        long = k % 2 == 0
        tokens = rng.integers(0, 256, 3000 if long else 100).astype(np.int32)
        request = RoutingRequest(f"r{k}", tokens)
        decision = route(policy, admission, request, snap, float(k))
        policy.on_dispatched(request, decision, float(k))
        pool = pools[LONG if long else SHORT]
        assert decision.instance_id in pool
        assert all(c in pool for c in decision.candidates)


def test_a_short_follow_up_stays_with_its_cache_in_the_long_pool() -> None:
    rng = np.random.default_rng(2)
    admission = _spatial(work_decay=0.999)
    policy = DualMapPolicy(slo_ttft_s=100.0)
    snap = _snapshot(8)
    first = rng.integers(0, 256, 4000).astype(np.int32)
    request = RoutingRequest("t0", first)
    decision = route(policy, admission, request, snap, 0.0)
    policy.on_dispatched(request, decision, 0.0)
    assert decision.instance_id in admission.pools(snap)[LONG]
    follow = np.concatenate([first, rng.integers(0, 256, 100).astype(np.int32)])
    again = route(policy, admission, RoutingRequest("t1", follow), snap, 1.0)
    assert again.instance_id == decision.instance_id and again.cached_tokens_estimate > 0
