"""Queue-depth scorer: fewer requests in flight scores higher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.policy.interfaces import InstanceView, RoutingRequest, Scorer
from router.policy.scorers import lower_is_better

if TYPE_CHECKING:
    from router.policy.base import TrackedPolicy


class QueueDepthScorer(Scorer):
    """``1 - requests / max requests`` over the candidates (``LoadBoard.requests``)."""

    name = "queue_depth"

    def __init__(self, policy: TrackedPolicy) -> None:
        self.policy = policy

    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]:
        board = self.policy.board
        return lower_is_better(
            {v.instance_id: float(board.requests[board.index[v.instance_id]]) for v in instances}
        )
