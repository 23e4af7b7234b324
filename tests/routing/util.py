"""Helpers shared by the routing tests: snapshots, prompts and a tiny feedback driver."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    InstanceView,
    RoutingPolicy,
    RoutingRequest,
)
from router.policy.pipeline import PipelinePolicy

# A hand-made fleet for the scorer tests: a busy, b lightly loaded, c idle.
SCORER_VIEWS = (
    InstanceView("a", num_running=4, waiting_prefill_tokens=3000, kv_usage=0.75),
    InstanceView("b", num_running=1, waiting_prefill_tokens=1000, kv_usage=0.25),
    InstanceView("c", kv_usage=0.0),
)


def ids(n: int) -> list[str]:
    return [f"i{k:02d}" for k in range(n)]


def snapshot(n: int = 4, epoch: int = 1, **fields: Any) -> ClusterSnapshot:
    """``n`` identical healthy instances ``i00..``; ``fields`` set every view's fields."""
    return ClusterSnapshot(epoch, tuple(InstanceView(i, **fields) for i in ids(n)))


def snapshot_of(views: Iterable[InstanceView], epoch: int = 1) -> ClusterSnapshot:
    return ClusterSnapshot(epoch, tuple(sorted(views, key=lambda v: v.instance_id)))


def tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n).astype(np.int32)


def request(request_id: str, token_ids: Sequence[int] | np.ndarray, max_tokens: int = 16
            ) -> RoutingRequest:
    return RoutingRequest(request_id, token_ids, max_tokens)


def dispatch(policy: RoutingPolicy, req: RoutingRequest, snap: ClusterSnapshot,
             now: float = 0.0) -> Decision:
    """Route and dispatch (what the gateway does when the instance has room)."""
    decision = policy.route(req, snap, now)
    policy.on_dispatched(req, decision, now)
    return decision


def scorer_state() -> PipelinePolicy:
    """Pipeline state synced to ``SCORER_VIEWS`` (1e-4 s per prefill token)."""
    policy = PipelinePolicy(prefill_s_per_token=1e-4)
    policy.sync(snapshot_of(SCORER_VIEWS))
    return policy
