"""Predicted-TTFT scorer: lower predicted time to first token scores higher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.policy.interfaces import InstanceView, RoutingRequest, Scorer
from router.policy.scorers import lower_is_better

if TYPE_CHECKING:
    from router.policy.cache_tracking import CacheTrackingPolicy


class PredictedTTFTScorer(Scorer):
    """``1 - ttft / max ttft``, ttft = (queued + own uncached tokens) × learned s/token."""

    name = "predicted_ttft"

    def __init__(self, policy: CacheTrackingPolicy) -> None:
        self.policy = policy

    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]:
        policy = self.policy
        prepared = policy.prepare(request)
        ttfts = {}
        for view in instances:
            own = prepared.num_tokens - policy.cached_tokens(prepared, view.instance_id)
            ttfts[view.instance_id] = policy.predicted_ttft(view.instance_id, own)
        return lower_is_better(ttfts)
