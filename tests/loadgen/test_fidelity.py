"""Sim-vs-live fidelity harness: a tiny workload on a real fleet (Redis, 2 emulated replicas,
gateway) and in the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.config import RunConfig
from loadgen.fidelity import GATED, main, ratios, run_fidelity, within
from loadgen.request import Segment, TraceRequest, segment_key


def _workload(count: int = 16) -> list[TraceRequest]:
    # Prompts of 200..950 tokens, 8 output tokens, one every 0.1 s: a light load.
    return [TraceRequest(f"f{i}", 0.1 * i, 200 + 50 * i, 8,
                         segments=(Segment(segment_key("fid", i), 200 + 50 * i),))
            for i in range(count)]


def test_ratios_and_tolerance() -> None:
    r = ratios({"ttft_p50": 1.05, "ttft_p90": 2.0, "throughput_rps": 3.0},
               {"ttft_p50": 1.0, "ttft_p90": 1.0, "throughput_rps": 0.0})
    assert r["ttft_p50"] == pytest.approx(1.05)
    assert r["ttft_p90"] == pytest.approx(2.0)
    assert r["throughput_rps"] is None  # sim 0: no ratio
    assert within(r, 0.1) == {"ttft_p50": True, "ttft_p90": False, "throughput_rps": False}


@pytest.mark.e2e
def test_live_and_sim_serve_the_same_requests() -> None:
    config = RunConfig(instances=2, policy="round_robin", profile="h100-llama3-8b",
                       slo_ttft_s=1.0, rate=10.0)
    workload = _workload()
    result = run_fidelity(config, requests=workload, heartbeat_ttl_s=0.9)
    assert result["all_served"] == {"live": True, "sim": True}
    for side in ("live", "sim_fresh", "sim_modelled"):
        assert result[side]["completed"] == len(workload)
        assert result[side]["errors"] == 0
    assert set(result["ratio_live_over_sim_modelled"]) >= set(GATED)
    assert set(result["within_tolerance_fresh"]) == set(GATED)
    # Round robin over the same instance ids routes every request alike on both sides.
    assert result["per_request_fresh"]["same_instance_fraction"] == 1.0
    # Live TTFT is the model's plus HTTP/gateway overhead: never faster, not wildly slower.
    diff = result["per_request_fresh"]["all"]
    assert diff["ttft_diff_ms_p10"] >= -1.0
    assert diff["ttft_diff_ms_p50"] <= 250.0
    assert 0.8 <= result["ratio_live_over_sim_fresh"]["throughput_rps"] <= 1.25
    assert result["live"]["tpot_p50"] == pytest.approx(result["sim_fresh"]["tpot_p50"], rel=0.5)


def test_cli_sim_only_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "fid.json"
    assert main(["--trace", "multiturn", "--trace-format", "synthetic", "--rate", "5",
                 "--max-requests", "20", "--instances", "2", "--sim-only",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["requests"] == 20
    assert result["sim_fresh"]["completed"] == 20
    assert result["config"]["sim_report_interval_s"] == pytest.approx(1.2)
    assert "live" not in result
