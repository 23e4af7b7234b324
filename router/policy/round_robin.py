"""Round robin: each dispatch goes to the next routable instance in instance-id order."""

from __future__ import annotations

import bisect

from router.policy.base import PreparedPrompt, TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest


class RoundRobinPolicy(TrackedPolicy):
    """Cycles through routable instances sorted by id.

    The cursor is the id of the last instance dispatched to (moved by ``on_dispatched``, so
    ``route`` itself is pure); the next decision takes the first routable id after it,
    wrapping around. Instances joining or leaving do not reset the cycle.
    """

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        ids = self.board.eligible_ids
        i = 0 if self._last is None else bisect.bisect_right(ids, self._last) % len(ids)
        return Decision(ids[i], "round_robin")

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        self._last = decision.instance_id
