"""Hotspot-aware rebalancing of requests still queued in the router (pure planning).

Requests wait in the router's per-instance admission queues until their instance has room.
When an instance turns into a hotspot, moving its *queued* requests elsewhere is free (no KV
to migrate), which is DualMap's first line of defence before live migration. An instance is
a hotspot when the predicted TTFT of the last request in its router queue exceeds the SLO,
or when its oldest queued request has waited longer than ``max_wait_s`` (3 s in DualMap):
the instance is not taking work at the rate it was given.

``plan_rebalance`` only plans: it returns ``Move``s and changes nothing. The caller (the
gateway's control loop) re-queues each moved request and calls ``on_dispatched`` with the
move's decision once it is really sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.policy.interfaces import Decision, RoutingRequest


@dataclass(frozen=True)
class QueuedRequest:
    """A request routed to ``instance_id`` and still waiting in the router's queue there."""

    request: RoutingRequest
    instance_id: str
    enqueued_at: float


@dataclass(frozen=True)
class Move:
    """Re-queue ``request_id`` from ``from_instance`` to ``decision.instance_id``."""

    request_id: str
    from_instance: str
    decision: Decision


def plan_rebalance(
    queued: Sequence[QueuedRequest],
    targets: Sequence[str],
    predict_ttft: Callable[[str, float], float],
    own_tokens: Callable[[QueuedRequest, str], int],
    *,
    slo_ttft_s: float,
    now: float,
    max_wait_s: float = 3.0,
) -> list[Move]:
    """Plan moves of queued requests off hotspot instances.

    ``predict_ttft(instance, tokens)`` is the predicted TTFT of a request that has ``tokens``
    uncached tokens of router-queued work plus its own in front of it on ``instance`` (the
    instance's engine-side backlog is the callee's business); ``own_tokens(q, instance)`` is
    ``q``'s uncached tokens there. Hotspots are visited in id order; from each, requests
    that waited past ``max_wait_s`` go first (oldest first), then the newest ones, each to
    the target with the lowest predicted TTFT if that beats its TTFT where it is, until the
    instance is no longer a hotspot. Later moves see the planned effect of earlier ones.
    """
    by_instance: dict[str, list[QueuedRequest]] = {}
    for q in sorted(queued, key=lambda q: (q.enqueued_at, q.request.request_id)):
        by_instance.setdefault(q.instance_id, []).append(q)
    backlog: dict[str, float] = {
        instance_id: float(sum(own_tokens(q, instance_id) for q in queue))
        for instance_id, queue in by_instance.items()
    }
    moves: list[Move] = []
    for source in sorted(by_instance):
        queue = by_instance[source]
        stale = [q for q in queue if now - q.enqueued_at > max_wait_s]
        if not stale and predict_ttft(source, backlog[source]) <= slo_ttft_s:
            continue
        fresh = [q for q in reversed(queue) if now - q.enqueued_at <= max_wait_s]
        for position, q in enumerate(stale + fresh):
            here = predict_ttft(source, backlog[source])
            if position >= len(stale) and here <= slo_ttft_s:
                break
            best: str | None = None
            best_ttft = here
            for target in targets:
                if target == source:
                    continue
                ttft = predict_ttft(target, backlog.get(target, 0.0) + own_tokens(q, target))
                if ttft < best_ttft:
                    best, best_ttft = target, ttft
            if best is None:
                continue
            moved_tokens = own_tokens(q, best)
            backlog[source] -= own_tokens(q, source)
            backlog[best] = backlog.get(best, 0.0) + moved_tokens
            decision = Decision(
                best,
                "rebalance",
                candidates=(source, best),
                predicted_ttft_s=best_ttft,
                cached_tokens_estimate=len(q.request.token_ids) - moved_tokens,
            )
            moves.append(Move(q.request.request_id, source, decision))
    return moves
