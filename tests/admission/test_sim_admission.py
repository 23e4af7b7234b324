"""The simulator with router-side admission: the same objects as the gateway, end to end."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen.config import RunConfig, load_workload
from loadgen.sim import Simulator, run_sim


def _config(admission: str, **fields: Any) -> RunConfig:
    base: dict[str, Any] = {
        "trace": "zipf", "trace_format": "synthetic", "max_requests": 150, "rate": 40.0,
        "instances": 4, "policy": "dualmap", "slo_ttft_s": 1.0, "admission": admission,
        "workload_params": {"zipf_exponent": 1.3, "num_prefixes": 20, "prefix_len": 2048},
        "admission_params": {"budget_tokens": 4096},
    }
    base.update(fields)
    if admission == "none":
        base["admission_params"] = {}
    return RunConfig(**base)


def _without_wall(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


@pytest.mark.parametrize("admission", ["none", "laps", "laps-spatial"])
def test_sim_with_admission_serves_every_request_once_and_reports_it(admission: str) -> None:
    config = _config(admission)
    summary = run_sim(config)
    assert summary["requests"] == summary["completed"] == 150
    assert summary["admission"] == admission
    counters = summary["admission_counters"]
    assert counters["mode"] == admission
    assert counters["submitted"] == 150
    assert sum(counters["released"].values()) == 150  # each released exactly once
    for key in ("ttft_p50_short", "ttft_p99_short", "ttft_p99_long", "short_requests",
                "rebalance", "slo_attainment", "load_imbalance"):
        assert key in summary
    if admission == "none":
        assert summary["rebalance"] is False
    else:
        assert summary["rebalance"] is True  # dualmap plans moves: on by default
        assert counters["queued"] == {"short": 0, "long": 0}
        assert set(counters["released_by_class"]) == {"short", "long"}
        # Bounded wait: goodput order (the default) releases by defer_max_s = 10 x the SLO.
        assert counters["order"] == "goodput"
        assert counters["wait_s_max"]["long"] <= 10 * config.slo_ttft_s + 1e-9


def test_rebalancing_moves_queued_requests_in_the_sim() -> None:
    # dualmap_no_slo pins each prefix to its home; the Zipf head, with long unique
    # suffixes, makes a hotspot.
    hot = {"zipf_exponent": 1.3, "num_prefixes": 20, "prefix_len": 2048,
           "suffix_len_mean": 3000.0}
    config = _config("laps", policy="dualmap_no_slo", rebalance=True, rate=60.0,
                     workload_params=hot, policy_params={"rebalance_ttft_factor": 1.0})
    summary = run_sim(config)
    moves = summary["admission_counters"]["moves"]
    assert sum(moves.values()) > 0
    assert summary["completed"] == 150
    off = run_sim(_config("laps", policy="dualmap_no_slo", rebalance=False, rate=60.0,
                          workload_params=hot))
    assert off["admission_counters"]["moves"] == {}


def test_rebalancing_needs_queues_and_a_planning_policy() -> None:
    with pytest.raises(ValueError, match="rebalancing needs"):
        Simulator(_config("none", rebalance=True), load_workload(_config("none")))
    with pytest.raises(ValueError, match="rebalancing needs"):
        Simulator(_config("laps", policy="least_loaded", rebalance=True),
                  load_workload(_config("none")))


def test_sim_with_admission_is_deterministic() -> None:
    first = run_sim(_config("laps-spatial"))
    second = run_sim(_config("laps-spatial"))
    assert _without_wall(first) == _without_wall(second)


def test_sim_with_goodput_order_serves_every_request_once_within_the_deferral_bound() -> None:
    # About twice this fleet's capacity (4 instances, 1 s SLO, long unique suffixes):
    # requests wait past the SLO, are deferred behind those still on time, and each leaves
    # the queue once, by its bound; more requests meet the SLO than in arrival order.
    hot = {"zipf_exponent": 1.3, "num_prefixes": 20, "prefix_len": 2048,
           "suffix_len_mean": 3000.0}
    summaries = {order: run_sim(_config(
        "laps", rate=80.0, max_requests=300, workload_params=hot,
        admission_params={"budget_tokens": 4096, "order": order, "defer_max_s": 4.0}))
        for order in ("fifo", "goodput")}
    summary = summaries["goodput"]
    assert summary["completed"] == 300
    counters = summary["admission_counters"]
    assert counters["order"] == "goodput"
    assert counters["deferrals"] > 0 and counters["released"]["deferred"] > 0
    assert sum(counters["released"].values()) == 300
    assert counters["queued"] == {"short": 0, "long": 0} and counters["deferred_queued"] == 0
    assert max(counters["wait_s_max"].values()) <= 4.0 + 1e-9
    fifo = summaries["fifo"]
    assert fifo["admission_counters"]["released"]["deferred"] == 0
    assert summary["slo_attainment"] > fifo["slo_attainment"] + 0.1
