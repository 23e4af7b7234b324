"""``sim laps`` plumbing: job order, partial results of an in-process run, searches capped
at the ideal bound, the goal's steady-state check."""

from __future__ import annotations

import copy
from typing import Any

from loadgen.laps_experiment import (
    STEADY_SPAN_OVER_E2E_P90,
    goal_check,
    idle_prefill_s,
    job_order,
    plan_steps,
    run_laps_experiment,
)


def test_job_order_puts_the_first_workload_then_dualmap_first() -> None:
    order = job_order(["long_tailed", "mooncake", "azure_conv"],
                      ["least_loaded", "dualmap", "cache_aware"])
    assert order[:3] == [("long_tailed", "least_loaded"), ("long_tailed", "dualmap"),
                         ("long_tailed", "cache_aware")]
    assert order[3:5] == [("mooncake", "dualmap"), ("azure_conv", "dualmap")]
    assert sorted(order) == sorted((w, p) for w in ["long_tailed", "mooncake", "azure_conv"]
                                   for p in ["least_loaded", "dualmap", "cache_aware"])


def test_plan_steps_do_the_goal_cells_first() -> None:
    order = job_order(["long_tailed", "mooncake"], ["dualmap", "least_loaded"])
    steps = plan_steps(order, ("none", "laps"))
    assert steps[:4] == [
        ("long_tailed", "dualmap", ("none", "laps"), ("search",)),
        ("long_tailed", "least_loaded", ("none",), ("search",)),
        ("long_tailed", "dualmap", ("none", "laps"), ("at80",)),
        ("long_tailed", "least_loaded", ("none",), ("at80",)),
    ]
    # every cell is searched exactly once, and every long_tailed step precedes mooncake's
    searched = [(w, p, a) for w, p, modes, phases in steps if "search" in phases
                for a in modes]
    assert sorted(searched) == sorted((w, p, a) for w in ("long_tailed", "mooncake")
                                      for p in ("dualmap", "least_loaded")
                                      for a in ("none", "laps"))
    workloads = [w for w, *_ in steps]
    assert workloads == sorted(workloads, key=lambda w: w != "long_tailed")


def test_idle_prefill_floor_grows_with_uncached_tokens() -> None:
    cold = idle_prefill_s("h100-llama3-8b", 60_000, 0)
    warm = idle_prefill_s("h100-llama3-8b", 60_000, 50_000)
    assert cold > 3.0 > warm > 0  # a cold 60k prompt misses a 3 s SLO on an idle H100
    assert idle_prefill_s("h100-llama3-8b", 1000, 0) < 0.1


def test_in_process_run_reports_partial_results_and_stays_under_the_bound() -> None:
    snapshots: list[dict[str, Any]] = []
    result = run_laps_experiment(
        workloads=("azure_conv",), policies=("least_loaded",), admissions=("none", "laps"),
        requests_per_workload=150, instances=2, max_probes=2, progress=False,
        on_progress=lambda partial: snapshots.append(copy.deepcopy(partial)))
    # One snapshot after each search and each 80 % run: the first has only "none".
    assert len(snapshots) == 4
    first = snapshots[0]["workloads"]["azure_conv"]["policies"]["least_loaded"]
    assert "none" in first and "laps" not in first
    assert snapshots[0]["complete"] is False and result["complete"] is True
    workload = result["workloads"]["azure_conv"]
    entry = workload["policies"]["least_loaded"]
    for admission in ("none", "laps"):
        cell = entry[admission]
        assert 0 < cell["effective_capacity_rps"] <= workload["ideal_bound_rps"]
        assert cell["exceeds_ideal_bound"] is False
        assert cell["span_over_e2e_p90"] > 0
        assert cell["measured_span_over_e2e_p90"] < cell["span_over_e2e_p90"]
        assert entry["at_80pct"][admission]["rate"] == round(
            0.8 * entry["none"]["effective_capacity_rps"], 4)
    assert entry["cliff"] == {}  # cliffs only for the cliff workloads' policies

    # Resuming from the finished result runs nothing again and keeps every cell.
    again: list[dict[str, Any]] = []
    resumed = run_laps_experiment(
        workloads=("azure_conv",), policies=("least_loaded",), admissions=("none", "laps"),
        requests_per_workload=150, instances=2, max_probes=2, progress=False,
        on_progress=again.append, resume=result)
    assert again == []
    assert resumed["workloads"]["azure_conv"]["policies"] == workload["policies"]


def _result(span: float) -> dict[str, Any]:
    def cell(rps: float) -> dict[str, Any]:
        return {"effective_capacity_rps": rps, "span_over_e2e_p90": span}

    return {"workloads": {"long_tailed": {"ideal_bound_rps": 40.0, "policies": {
        "dualmap": {"none": cell(30.0), "laps": cell(37.0), "laps-spatial": cell(33.0)},
        "least_loaded": {"none": cell(25.0), "laps": cell(26.0)},
    }}}}


def test_goal_check_needs_long_runs_for_steady_state() -> None:
    short = goal_check(_result(STEADY_SPAN_OVER_E2E_P90 - 1))
    assert short["steady_state"] is False
    long = goal_check(_result(STEADY_SPAN_OVER_E2E_P90 + 1))
    assert long["steady_state"] is True
    assert long["dualmap_best_admission_rps"] == 37.0
    assert long["best_baseline_without_admission"] == "least_loaded"
    assert long["ratio_to_best_baseline_without_admission"] == round(37.0 / 25.0, 4)
    assert long["meets_0_9_ideal"] is True and long["meets_1_2_baseline"] is True


def test_goodput_table_has_a_row_per_variant_with_its_cliff() -> None:
    from loadgen.laps_experiment import goodput_table

    counters = {"released": {"room": 7, "deferred": 2, "aged": 1}}
    result = {
        "ideal_bound_rps": 40.0,
        "variants": {"none": {}, "laps_goodput": {}, "diagnostic": {}},
        "entry": {
            "none": {"effective_capacity_rps": 20.0, "failed_at_rps": 22.0},
            "laps_goodput": {"effective_capacity_rps": 30.0, "failed_at_rps": None},
            "at_80pct": {"none": {"ttft_p99_short": 1.5}},
            "cliff": {label: [{"factor": f, "slo_attainment": a, "ttft_p90": 4.0,
                               "ttft_p99_short": 9.0, "admission_counters": counters}
                              for f, a in ((1.1, 0.8), (1.25, 0.5))]
                      for label in ("none", "laps_goodput", "diagnostic")},
        },
    }
    lines = goodput_table(result).splitlines()
    assert "attainment at 1.1x | attainment at 1.25x" in lines[0]
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| none | 20.0 (22.0) | 0.50 |") and "| 1.50 |" in lines[2]
    assert lines[3].startswith("| laps_goodput | 30.0 (-) | 0.75 |")
    assert "| 0.800 | 0.500 |" in lines[4] and lines[4].endswith("| 7 / 2 / 1 |")
