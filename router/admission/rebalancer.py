"""Hotspot rebalancing of router-queued requests, as the control loop runs it.

``HotspotRebalancer.plan_moves(now, snapshot)`` is the one interface the control loop calls
each period (``ControlAction``); live migration of running requests can plug in next to it
with the same shape. Planning is the policy's (``DualMapPolicy.plan_rebalance``: its cache
view and learned TTFT model, ``router.policy.rebalance``); ``apply_moves`` carries a plan
out: the policy is told (``on_dispatched`` with the move's decision: its in-flight load and
cache view follow the request) and the admission re-queues the request, skipping any that
was released in the meantime (never sent twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.admission.interfaces import Admission, NotQueued, Release
from router.policy.interfaces import ClusterSnapshot, RoutingPolicy
from router.policy.rebalance import Move, QueuedRequest


class RebalancingPolicy(Protocol):
    def plan_rebalance(
        self, queued: Sequence[QueuedRequest], snapshot: ClusterSnapshot, now: float
    ) -> list[Move]: ...


class HotspotRebalancer:
    """Plans moves of queued requests off hotspots (see the module docstring).

    With spatial pools, a move that would take a request out of its class's pool is
    dropped (the pools are the point of that mode). Only ``admission.movable(now)`` is
    considered (goodput order leaves out requests that already missed the SLO)."""

    def __init__(self, admission: Admission, policy: RebalancingPolicy) -> None:
        self.admission = admission
        self.policy = policy
        self.planned = 0

    def plan_moves(self, now: float, snapshot: ClusterSnapshot) -> list[Move]:
        queued = self.admission.movable(now)
        if not queued:
            return []
        moves = self.policy.plan_rebalance(queued, snapshot, now)
        pools_of = getattr(self.admission, "pools", None)
        if moves and pools_of is not None:
            pools: dict[str, frozenset[str]] = pools_of(snapshot)
            klass = {q.request.request_id: q.klass for q in queued}
            moves = [m for m in moves
                     if m.decision.instance_id in pools.get(klass[m.request_id], frozenset())]
        self.planned += len(moves)
        return moves


def supports_rebalancing(policy: RoutingPolicy) -> bool:
    """Whether ``policy`` can plan moves (DualMap can)."""
    return callable(getattr(policy, "plan_rebalance", None))


def apply_moves(admission: Admission, policy: RoutingPolicy, moves: Sequence[Move],
                now: float) -> list[Release]:
    """Carry out ``moves``; returns the releases they caused. A move whose request is no
    longer queued is skipped."""
    requests = {q.request.request_id: q.request for q in admission.queued()}
    releases: list[Release] = []
    for move in moves:
        request = requests.get(move.request_id)
        if request is None:
            continue
        try:
            moved = admission.move(move.request_id, move.decision, now,
                                   reason=f"rebalance_{move.trigger}")
        except NotQueued:
            continue
        policy.on_dispatched(request, move.decision, now)
        releases.extend(moved)
    return releases
