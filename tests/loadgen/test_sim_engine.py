"""The simulator with the real reference engine core (emulated executor)."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen.capacity import ideal_bound_rps
from loadgen.config import RunConfig, load_workload
from loadgen.sim import run_sim
from tests.loadgen.fakes import LeastWaiting

SMALL_GROUPS = {"num_groups": 4, "prompts_per_group": 8, "system_prompt_len": 1024,
                "question_len": 64, "output_len": 32}


def _config(**overrides: Any) -> RunConfig:
    base: dict[str, Any] = dict(trace="shared_prefix", trace_format="synthetic", rate=20.0,
                                max_requests=32, instances=2, seed=3, slo_ttft_s=1.0,
                                workload_params=SMALL_GROUPS)
    base.update(overrides)
    return RunConfig(**base)


def test_smoke_with_reference_engine() -> None:
    summary = run_sim(_config(), policy_factory=lambda c: LeastWaiting())
    assert summary["completed"] == 32 and summary["errors"] == 0
    # 4 groups share a 1,024-token prefix: at most 4 x 2 instances first-time misses.
    assert summary["cache_hit_rate"] > 0.5
    assert 0 < summary["ttft_p50"] <= summary["ttft_p99"] < 1.0
    assert summary["tpot_p50"] > 0.0065  # at least the H100 profile's iteration floor
    assert summary["load_imbalance"] >= 1.0
    assert sum(p["requests"] for p in summary["per_instance"]) == 32
    assert summary["wall_seconds"] < 10


def test_reference_engine_runs_are_deterministic() -> None:
    first = run_sim(_config(), policy_factory=lambda c: LeastWaiting())
    second = run_sim(_config(), policy_factory=lambda c: LeastWaiting())
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second


def test_ideal_bound_beats_what_the_engine_sustains() -> None:
    config = _config(max_requests=64, workload_params={**SMALL_GROUPS, "prompts_per_group": 16})
    requests = load_workload(config)
    bound = ideal_bound_rps(requests, 2, "h100-llama3-8b")
    # Every group's prefix is computed once in the oracle: hit rate (64 - 4) * 1024 / all.
    assert bound["ideal_cache_hit_rate"] == pytest.approx(60 * 1024 / (64 * 1088))
    saturated = run_sim(_config(max_requests=64, rate=1000.0,
                                workload_params={**SMALL_GROUPS, "prompts_per_group": 16}),
                        policy_factory=lambda c: LeastWaiting())
    assert saturated["throughput_rps"] < bound["ideal_bound_rps"]


@pytest.mark.parametrize("policy", ["round_robin", "dualmap"])
def test_gateway_policies_run_unchanged(policy: str) -> None:
    summary = run_sim(_config(policy=policy, instances=4, max_requests=32))
    assert summary["completed"] == 32 and summary["policy"] == policy
    assert sum(summary["decisions"].values()) == 32
    if policy == "dualmap":
        # Affinity keeps each group's requests on its ring homes: prefixes are reused.
        assert summary["cache_hit_rate"] > 0.6
