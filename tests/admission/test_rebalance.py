"""Hotspot rebalancing of router-queued requests: planning order and the control loop."""

from __future__ import annotations

import numpy as np

from router.admission import build_admission
from router.admission.laps import LapsAdmission
from router.admission.rebalancer import HotspotRebalancer, apply_moves
from router.policy.dualmap import DualMapPolicy
from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest
from router.policy.rebalance import QueuedRequest, plan_rebalance

S = 1e-3  # seconds per token in the hand-made fleets


def _q(rid: str, instance: str, at: float, size: int = 100,
       candidates: tuple[str, ...] = ()) -> QueuedRequest:
    return QueuedRequest(RoutingRequest(rid, list(range(size))), instance, at, candidates)


def test_cheapest_moves_go_first_and_the_other_home_is_preferred() -> None:
    # a is a hotspot: 1,000 engine tokens + 900 queued (1.9 s > 1.2 s). "warm" has 300 of
    # its 400 tokens cached on a (moving it costs 300 more tokens elsewhere);
    # "cold" and "cold2" cost the same anywhere: they move first, newest first.
    queued = [_q("warm", "a", 9.0, 400, ("a", "b")), _q("cold", "a", 9.1, 400, ("a", "c")),
              _q("cold2", "a", 9.2, 400, ("a", "b"))]
    engine = {"a": 1000, "b": 200, "c": 0, "d": 0}
    queued_tokens = {"a": 100 + 400 + 400}

    def own(q: QueuedRequest, instance: str) -> int:
        return 100 if (q.request.request_id == "warm" and instance == "a") else 400

    def predict(instance: str, delta: float) -> float:
        return (engine[instance] + queued_tokens.get(instance, 0) + delta) * S

    moves = plan_rebalance(queued, ["a", "b", "c", "d"], predict, own, slo_ttft_s=1.2,
                           now=10.0, max_wait_s=3.0)
    plan = [(m.request_id, m.decision.instance_id, m.trigger) for m in moves]
    # cold2's other home b (0.6 s) is within the bound: preferred over the idle c or d.
    assert plan == [("cold2", "b", "ttft"), ("cold", "c", "ttft")]
    # The hotspot cleared: 1,000 + 900 - 800 tokens = 1.1 s <= 1.2 s, so "warm" stays.
    assert all(m.decision.reason == "rebalance" for m in moves)
    assert moves[0].decision.candidates == ("a", "b")


def test_a_request_waiting_too_long_moves_even_without_ttft_pressure() -> None:
    queued = [_q("old", "a", 5.0), _q("new", "a", 9.8)]
    moves = plan_rebalance(queued, ["a", "b"], lambda i, d: (200 + d) * S if i == "a" else d * S,
                           lambda q, i: 100, slo_ttft_s=3.0, now=10.0, max_wait_s=3.0)
    assert [(m.request_id, m.trigger) for m in moves] == [("old", "wait")]


def _fleet(n: int) -> ClusterSnapshot:
    return ClusterSnapshot(1, tuple(InstanceView(f"i{k:02d}") for k in range(n)))


def test_the_control_loop_clears_a_hotspot_of_queued_requests_and_sends_each_once() -> None:
    """One conversation prefix pinned to its home (no SLO switch), a small admission budget:
    requests pile up in the router at the home; the rebalancer moves them away until the
    home's predicted TTFT is within the SLO; every request is released exactly once."""
    rng = np.random.default_rng(3)
    # One key: one home; the paper's trigger (a hotspot past the SLO itself).
    policy = DualMapPolicy(slo_ttft_s=1.0, slo_aware=False, prefill_s_per_token=1e-4,
                           adaptive_key=False, rebalance_ttft_factor=1.0)
    admission = build_admission("laps", budget_tokens=2000, max_wait_s=60.0, long_age_s=60.0)
    assert isinstance(admission, LapsAdmission)
    snap = _fleet(8)
    prefix = rng.integers(0, 256, 1024).astype(np.int32)
    sent: dict[str, str] = {}
    home = None
    for k in range(30):
        tokens = np.concatenate([prefix, rng.integers(0, 256, 1000).astype(np.int32)])
        request = RoutingRequest(f"r{k}", tokens)
        decision = policy.route(request, snap, 0.01 * k)
        policy.on_dispatched(request, decision, 0.01 * k)
        home = home or decision.instance_id
        assert decision.instance_id == home
        for release in admission.submit(request, decision, 0.01 * k):
            assert release.request_id not in sent
            sent[release.request_id] = release.instance_id
    assert home is not None
    assert len(admission.queued(home)) == 29  # one in flight, the rest queued at the home
    assert policy.predicted_ttft(home, 0) > 1.0  # a hotspot

    rebalancer = HotspotRebalancer(admission, policy)
    before = policy.predicted_ttft(home, 0)
    moves = rebalancer.plan_moves(0.5, snap)
    assert moves and all(m.from_instance == home and m.decision.instance_id != home
                         for m in moves)
    # No more moves than needed: each takes its 1,000 uncached tokens (0.1 s) off the home
    # (the prefix is cached there, and the cache view's record of a queued prompt is not
    # mistaken for work already done).
    assert before - (len(moves) - 1) * 0.1 > 1.0 >= before - len(moves) * 0.1 - 1e-9
    for release in apply_moves(admission, policy, moves, 0.5):
        assert release.request_id not in sent
        sent[release.request_id] = release.instance_id
    assert policy.predicted_ttft(home, 0) <= 1.0  # cleared
    assert rebalancer.plan_moves(0.6, snap) == []  # and nothing more to do
    # Moved requests were released on idle instances; the rest wait at home.
    assert {i for i in sent.values() if i != home}
    assert len(sent) + len(admission.queued()) == 30
    counters = admission.counters()
    assert counters["moves"] == {"rebalance_ttft": len(moves)}
    # Applying the same plan again changes nothing (those requests are no longer queued
    # there, or were released): nothing is sent twice.
    again = apply_moves(admission, policy, moves, 0.7)
    assert all(r.request_id not in sent for r in again)
