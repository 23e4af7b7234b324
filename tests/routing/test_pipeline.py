"""PipelinePolicy: filters, then weighted scorers, then the picker, over shared state."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.interfaces import Decision, InstanceView, NoInstanceAvailable
from router.policy.registry import policy_from_config
from tests.routing.util import dispatch, request, snapshot_of, tokens


def _views() -> list[InstanceView]:
    return [InstanceView("a", waiting_prefill_tokens=4000), InstanceView("b"),
            InstanceView("c", healthy=False)]


def test_weights_decide_between_cache_and_load() -> None:
    rng = np.random.default_rng(0)
    prompt = tokens(rng, 2000)
    snap = snapshot_of(_views())
    for cache_weight, expected in [(3.0, "a"), (0.5, "b")]:
        policy = policy_from_config({"scorers": [
            {"name": "prefix_cache", "weight": cache_weight},
            {"name": "pending_tokens", "weight": 1.0}], "picker": "max_score"})
        policy.on_dispatched(request("seed", prompt), Decision("a", "x"), 0.0)
        policy.on_finished("seed", "a", 0.0)
        decision = policy.route(request("r", prompt), snap, 1.0)
        assert (decision.instance_id, decision.reason) == (expected, "score")
        assert decision.candidates == ("a", "b")  # c was filtered out


def test_state_follows_dispatches() -> None:
    rng = np.random.default_rng(1)
    policy = policy_from_config({"scorers": ["queue_depth"], "picker": "max_score"})
    snap = snapshot_of([InstanceView("a"), InstanceView("b")])
    chosen = [dispatch(policy, request(f"r{k}", tokens(rng, 10)), snap).instance_id
              for k in range(4)]
    assert chosen == ["a", "b", "a", "b"]


def test_everything_filtered_out_raises() -> None:
    policy = policy_from_config({"scorers": ["kv_free"], "picker": "max_score"})
    with pytest.raises(NoInstanceAvailable):
        policy.route(request("r", [1]), snapshot_of([InstanceView("a", healthy=False)]), 0)
