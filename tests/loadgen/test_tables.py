"""Capacity tables come from the JSON, one row per policy."""

from __future__ import annotations

from loadgen.tables import capacity_table


def test_capacity_table_rows() -> None:
    result = {"ideal_bound_rps": 40.0, "instances": 16, "profile": "p", "slo_ttft_s": 3.0,
              "requests": 100, "policies": {
                  "dualmap": {"effective_capacity_rps": 30.0, "cache_hit_rate": 0.25,
                              "ttft_p50": 0.5, "ttft_p90": 2.0, "ttft_p99": 4.0,
                              "load_imbalance": 1.1, "decisions": {"affinity": 90, "load": 10}},
                  "round_robin": {"effective_capacity_rps": 0.0}}}
    table = capacity_table(result)
    row = "| dualmap | 30.0 | 75% | 0.250 | 0.500 / 2.000 / 4.000 | 1.100 | affinity 90, load 10 |"
    assert row in table
    assert "| round_robin | 0.0 | 0% | - |" in table
    assert table.startswith("ideal bound 40.0 req/s")
