"""Hotspot-aware rebalancing of requests still queued in the router (pure planning).

Requests wait in the router's per-instance admission queues (``router.admission``) until
their instance has room. When an instance turns into a hotspot, moving its *queued* requests
elsewhere is free (no KV to migrate), which is DualMap's first line of defence before live
migration. An instance is a hotspot when the predicted TTFT of a request queued last there
exceeds the bound (the SLO, as in DualMap), or when its oldest queued request has waited
longer than ``max_wait_s`` (3 s in DualMap): the instance is not taking work at the rate it
was given.

``plan_rebalance`` only plans: it returns ``Move``s and changes nothing. The caller (the
control loop, ``router.admission.rebalancer``) re-queues each moved request (admission
``move``) and tells the policy (``on_dispatched`` with the move's decision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.policy.interfaces import Decision, RoutingRequest


@dataclass(frozen=True)
class QueuedRequest:
    """A request routed to ``instance_id`` and still waiting in the router's queue there;
    ``candidates`` are the homes its routing decision named (DualMap's c1, c2); ``klass``
    its admission class (``short``/``long``, empty if none)."""

    request: RoutingRequest
    instance_id: str
    enqueued_at: float
    candidates: tuple[str, ...] = ()
    klass: str = ""


@dataclass(frozen=True)
class Move:
    """Re-queue ``request_id`` from ``from_instance`` to ``decision.instance_id``;
    ``trigger`` says why its source was a hotspot (``ttft`` or ``wait``)."""

    request_id: str
    from_instance: str
    decision: Decision
    trigger: str = "ttft"


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

    ``predict_ttft(instance, delta)`` is the predicted TTFT of a request queued last on
    ``instance`` (everything the callee knows is ahead: the engine's backlog and the
    router-queued requests) after ``delta`` uncached tokens of planned moves (negative when
    work left it); ``own_tokens(q, instance)`` is ``q``'s uncached tokens there.

    Hotspots are visited in id order. From each, requests that waited past ``max_wait_s``
    go first (oldest first), then the others **cheapest first**: by the uncached tokens the
    move adds (its cached prefix lost), ties to the newest. Each goes to its other candidate
    if that one's predicted TTFT with it stays within the bound and beats staying, else to
    the target with the lowest predicted TTFT if that beats staying; the rest stay. Moves
    stop when the instance is no longer a hotspot. Later moves see the planned effect of
    earlier ones.
    """
    by_instance: dict[str, list[QueuedRequest]] = {}
    for q in sorted(queued, key=lambda q: (q.enqueued_at, q.request.request_id)):
        by_instance.setdefault(q.instance_id, []).append(q)
    plan = _Plan(targets, predict_ttft, own_tokens, slo_ttft_s)
    for source in sorted(by_instance):
        queue = by_instance[source]
        stale = [q for q in queue if now - q.enqueued_at > max_wait_s]
        if not stale and plan.ttft(source) <= slo_ttft_s:
            continue
        trigger = "wait" if stale else "ttft"
        cost_here = {q.request.request_id: own_tokens(q, source) for q in queue}
        # Cheapest first: the extra prefill a move causes (its cached prefix lost), against
        # the cheapest other place; ties to the newest.
        fresh = sorted(
            (q for q in queue if now - q.enqueued_at <= max_wait_s),
            key=lambda q: (plan.cheapest_elsewhere(q, source) - cost_here[q.request.request_id],
                           -q.enqueued_at))
        for position, q in enumerate(stale + fresh):
            here = plan.ttft(source)
            if position >= len(stale) and here <= slo_ttft_s:
                break
            plan.move(q, source, here, cost_here[q.request.request_id],
                      "wait" if position < len(stale) else trigger)
    return plan.moves


class _Plan:
    """Moves planned so far and their effect on each instance's predicted TTFT."""

    def __init__(
        self,
        targets: Sequence[str],
        predict_ttft: Callable[[str, float], float],
        own_tokens: Callable[[QueuedRequest, str], int],
        slo_ttft_s: float,
    ) -> None:
        self.targets = list(targets)
        self.target_set = frozenset(targets)
        self.predict_ttft = predict_ttft
        self.own_tokens = own_tokens
        self.slo_ttft_s = slo_ttft_s
        self.delta: dict[str, float] = {}
        self.moves: list[Move] = []

    def ttft(self, instance_id: str, extra: float = 0.0) -> float:
        return self.predict_ttft(instance_id, self.delta.get(instance_id, 0.0) + extra)

    def cheapest_elsewhere(self, q: QueuedRequest, source: str) -> int:
        return min((self.own_tokens(q, t) for t in self.targets if t != source),
                   default=self.own_tokens(q, source))

    def best_target(self, q: QueuedRequest, source: str,
                    here: float) -> tuple[str, float, int] | None:
        for other in q.candidates:  # the other home first: it may hold the prefix
            if other == source or other not in self.target_set:
                continue
            tokens = self.own_tokens(q, other)
            value = self.ttft(other, tokens)
            if value <= self.slo_ttft_s and value < here:
                return other, value, tokens
        best: tuple[str, float, int] | None = None
        for target in self.targets:
            if target == source:
                continue
            tokens = self.own_tokens(q, target)
            value = self.ttft(target, tokens)
            if value < (here if best is None else best[1]):
                best = (target, value, tokens)
        return best

    def move(self, q: QueuedRequest, source: str, here: float, cost_here: int,
             trigger: str) -> None:
        choice = self.best_target(q, source, here)
        if choice is None:
            return
        target, value, tokens = choice
        self.delta[source] = self.delta.get(source, 0.0) - cost_here
        self.delta[target] = self.delta.get(target, 0.0) + tokens
        decision = Decision(target, "rebalance", candidates=(source, target),
                            predicted_ttft_s=value,
                            cached_tokens_estimate=len(q.request.token_ids) - tokens)
        self.moves.append(Move(q.request.request_id, source, decision, trigger))
