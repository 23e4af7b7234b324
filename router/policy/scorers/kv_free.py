"""KV-free scorer: the share of the KV cache an instance reported free."""

from __future__ import annotations

from router.policy.interfaces import InstanceView, RoutingRequest, Scorer


class KVFreeScorer(Scorer):
    """``1 - kv_usage`` from the last load report (stateless)."""

    name = "kv_free"

    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]:
        return {v.instance_id: min(1.0, max(0.0, 1.0 - v.kv_usage)) for v in instances}
