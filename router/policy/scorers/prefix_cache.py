"""Prefix-cache scorer: the share of the prompt an instance probably has cached."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.policy.interfaces import InstanceView, RoutingRequest, Scorer

if TYPE_CHECKING:
    from router.policy.cache_tracking import CacheTrackingPolicy


class PrefixCacheScorer(Scorer):
    """``cached prefix tokens / prompt tokens`` from the policy's cache view."""

    name = "prefix_cache"

    def __init__(self, policy: CacheTrackingPolicy) -> None:
        self.policy = policy

    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]:
        prepared = self.policy.prepare(request)
        total = max(1, prepared.num_tokens)
        return {
            v.instance_id: self.policy.cached_tokens(prepared, v.instance_id) / total
            for v in instances
        }
