"""The discrete-event simulator, driven by small engine fakes with known behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen.config import RunConfig
from loadgen.request import Segment, TraceRequest, segment_key
from loadgen.sim import Simulator, run_sim
from tests.loadgen.fakes import (
    LeastWaiting,
    RoundRobin,
    batching_engines,
    constant_engines,
)


def _evenly_spaced(count: int, gap_s: float, prompt_len: int = 32) -> list[TraceRequest]:
    return [
        TraceRequest(f"r{i}", i * gap_s, prompt_len, 1,
                     segments=(Segment(segment_key("t", i), prompt_len),))
        for i in range(count)
    ]


def _without_wall(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_ttft_is_queueing_plus_service_on_a_single_fifo_server() -> None:
    # Arrivals every 0.1 s, service 0.15 s: request k waits k * 0.05 s before its turn.
    config = RunConfig(instances=1, slo_ttft_s=0.3)
    simulator = Simulator(config, _evenly_spaced(5, 0.1), engine_factory=constant_engines(0.15),
                          policy_factory=lambda c: RoundRobin())
    result = simulator.run()
    ttfts = sorted(o.ttft_s for o in result.outcomes if o.ttft_s is not None)
    assert ttfts == pytest.approx([0.15, 0.2, 0.25, 0.3, 0.35])
    assert result.end_time_s == pytest.approx(0.75)
    assert result.instances[0].busy_s == pytest.approx(0.75)


def test_summary_counts_slo_and_balance() -> None:
    config = RunConfig(instances=2, slo_ttft_s=0.3)
    summary = run_sim(config, requests=_evenly_spaced(10, 0.1),
                      engine_factory=constant_engines(0.15),
                      policy_factory=lambda c: RoundRobin())
    # Round robin over 2 servers: each gets an arrival every 0.2 s > 0.15 s, no queueing.
    assert summary["requests"] == 10
    assert summary["completed"] == 10
    assert summary["slo_attainment"] == 1.0
    assert summary["ttft_p50"] == pytest.approx(0.15)
    assert summary["load_imbalance"] == pytest.approx(1.0)
    assert summary["request_imbalance"] == pytest.approx(1.0)
    assert [p["requests"] for p in summary["per_instance"]] == [5, 5]
    for key in ("requests", "slo_attainment", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50",
                "throughput_rps", "cache_hit_rate", "load_imbalance", "wall_seconds"):
        assert key in summary


def test_policy_hooks_are_called_in_order() -> None:
    policy = RoundRobin()
    run_sim(RunConfig(instances=2), requests=_evenly_spaced(3, 0.5),
            engine_factory=constant_engines(0.1), policy_factory=lambda c: policy)
    for rid in ("r0", "r1", "r2"):
        events = [c for c in policy.calls if c.endswith(":" + rid)]
        assert events == [f"dispatch:{rid}", f"first:{rid}", f"finished:{rid}"]


def test_load_aware_policy_sees_engine_stats() -> None:
    # Two requests at once: the second must see the first queued on i00 and pick i01.
    requests = _evenly_spaced(2, 0.0)
    summary = run_sim(RunConfig(instances=2), requests=requests,
                      engine_factory=constant_engines(1.0),
                      policy_factory=lambda c: LeastWaiting())
    assert [p["requests"] for p in summary["per_instance"]] == [1, 1]
    assert summary["ttft_p99"] == pytest.approx(1.0)


def test_batching_engine_prefix_hits_reach_the_summary() -> None:
    shared = Segment(segment_key("sys"), 256)
    requests = [
        TraceRequest(f"q{i}", i * 0.05, 288, 4,
                     segments=(shared, Segment(segment_key("q", i), 32)))
        for i in range(8)
    ]
    summary = run_sim(RunConfig(instances=1), requests=requests,
                      engine_factory=batching_engines, policy_factory=lambda c: RoundRobin())
    # The first request misses; the other 7 hit the 256-token shared prefix.
    assert summary["cache_hit_rate"] == pytest.approx(7 * 256 / (8 * 288))
    assert summary["completed"] == 8
    assert summary["tpot_p50"] > 0


def test_same_seed_gives_same_json_except_wall_time() -> None:
    config = RunConfig(trace="multiturn", trace_format="synthetic", rate=4.0, max_requests=120,
                       instances=3, seed=11,
                       workload_params={"system_prompt_len": 256, "user_len_mean": 64,
                                        "output_len_mean": 16, "think_time_mean_s": 2.0})
    first = run_sim(config, engine_factory=batching_engines,
                    policy_factory=lambda c: LeastWaiting())
    second = run_sim(config, engine_factory=batching_engines,
                     policy_factory=lambda c: LeastWaiting())
    assert _without_wall(first) == _without_wall(second)
    other_seed = run_sim(RunConfig(**{**config.__dict__, "seed": 12}),
                         engine_factory=batching_engines,
                         policy_factory=lambda c: LeastWaiting())
    assert _without_wall(other_seed) != _without_wall(first)


def test_early_stop_when_attainment_is_already_lost() -> None:
    # One server, service 1 s, arrivals every 0.1 s: nearly everyone misses a 1.5 s SLO.
    config = RunConfig(instances=1, slo_ttft_s=1.5)
    summary = run_sim(config, requests=_evenly_spaced(200, 0.1),
                      engine_factory=constant_engines(1.0),
                      policy_factory=lambda c: RoundRobin(), early_stop_attainment=0.9)
    assert summary["early_stopped"] is True
    assert summary["completed"] < 40
    assert summary["slo_attainment"] < 0.9
