"""Registry: named policies, parameter checking, declarative (named and pipeline) config."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.dualmap import DualMapPolicy
from router.policy.pipeline import PipelinePolicy
from router.policy.registry import (
    POLICY_NAMES,
    accepted_params,
    build_policy,
    policy_from_config,
)
from tests.routing.util import dispatch, request, snapshot, tokens


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_named_policy_builds_routes_and_takes_feedback(name: str) -> None:
    rng = np.random.default_rng(0)
    policy = build_policy(name)
    assert policy.name == name
    snap = snapshot(4)
    for k in range(20):
        decision = dispatch(policy, request(f"r{k}", tokens(rng, 1200)), snap, now=k)
        assert decision.instance_id in {v.instance_id for v in snap.instances}
        assert decision.reason
        policy.on_first_token(f"r{k}", decision.instance_id, 0.05, 0, k + 0.5)
        policy.on_finished(f"r{k}", decision.instance_id, k + 1.0)


def test_parameters_are_checked() -> None:
    policy = build_policy("dualmap", slo_ttft_s=2.0, key_blocks=3)
    assert isinstance(policy, DualMapPolicy) and policy.slo_ttft_s == 2.0
    assert build_policy("dualmap_no_slo").name == "dualmap_no_slo"
    assert "slo_aware" not in accepted_params("dualmap_no_slo")
    assert {"seed"} == accepted_params("power_of_two")
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("random")
    with pytest.raises(ValueError, match="unknown parameter"):
        build_policy("round_robin", seed=1)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_policy("dualmap_no_slo", slo_aware=True)


def test_named_config_form() -> None:
    policy = policy_from_config({"policy": "power_of_two", "params": {"seed": 4}})
    assert policy.name == "power_of_two"
    with pytest.raises(ValueError):
        policy_from_config({"policy": "dualmap", "scorers": []})
    with pytest.raises(ValueError):
        policy_from_config({"policy": "dualmap", "params": [1]})


def test_pipeline_config_form() -> None:
    policy = policy_from_config({
        "name": "cache_then_load",
        "filters": ["healthy"],
        "scorers": [{"name": "prefix_cache", "weight": 2.0},
                    {"name": "pending_tokens", "weight": 1},
                    "queue_depth", "kv_free", "predicted_ttft"],
        "picker": {"name": "max_score"},
        "params": {"cache_capacity_tokens": 100_000},
    })
    assert isinstance(policy, PipelinePolicy) and policy.name == "cache_then_load"
    assert [s.name for s in policy.scorers] == [
        "prefix_cache", "pending_tokens", "queue_depth", "kv_free", "predicted_ttft"]
    assert policy.cache.default_capacity_blocks == 100_000 // 16


@pytest.mark.parametrize("config", [
    {"scorers": ["prefix_cache"]},  # no picker
    {"scorers": ["nope"], "picker": "max_score"},
    {"scorers": ["prefix_cache"], "picker": "nope"},
    {"filters": ["nope"], "scorers": [], "picker": "max_score"},
    {"scorers": [{"weight": 1}], "picker": "max_score"},
    {"scorers": [{"name": "kv_free", "weight": -1}], "picker": "max_score"},
    {"scorers": ["kv_free", "kv_free"], "picker": "max_score"},
    {"scorers": [], "picker": "max_score", "params": {"slo_ttft_s": 1}},
    {"scorers": [], "picker": "max_score", "extra": 1},
])
def test_malformed_pipeline_configs_are_rejected(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        policy_from_config(config)
