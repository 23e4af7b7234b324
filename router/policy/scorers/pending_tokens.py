"""Pending-tokens scorer: fewer uncached prefill + decode tokens pending scores higher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.policy.interfaces import InstanceView, RoutingRequest, Scorer
from router.policy.scorers import lower_is_better

if TYPE_CHECKING:
    from router.policy.base import TrackedPolicy


class PendingTokensScorer(Scorer):
    """``1 - pending / max pending`` over the candidates (``LoadBoard.pending_tokens``)."""

    name = "pending_tokens"

    def __init__(self, policy: TrackedPolicy) -> None:
        self.policy = policy

    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]:
        board = self.policy.board
        pending = board.pending_tokens()
        return lower_is_better(
            {v.instance_id: float(pending[board.index[v.instance_id]]) for v in instances}
        )
