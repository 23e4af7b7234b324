"""Sim-vs-live fidelity harness: a tiny workload on a real fleet (Redis, 2 emulated replicas,
gateway) and in the simulator."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

import loadgen.fidelity as fidelity
from loadgen.config import RunConfig
from loadgen.fidelity import (
    GATED,
    FleetStartError,
    LiveFleet,
    cpu_report,
    engine_lag,
    main,
    named_workload,
    per_request,
    ratios,
    run_fidelity,
    send_lag,
    within,
)
from loadgen.laps_experiment import workload_requests
from loadgen.metrics import RequestOutcome
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
@pytest.mark.parametrize("loadgen_processes", [1, 2])
def test_live_and_sim_serve_the_same_requests(loadgen_processes: int) -> None:
    config = RunConfig(instances=2, policy="round_robin", profile="h100-llama3-8b",
                       slo_ttft_s=1.0, rate=10.0)
    workload = _workload()
    result = run_fidelity(config, requests=workload, heartbeat_ttl_s=0.9,
                          loadgen_processes=loadgen_processes)
    assert result["config"]["loadgen_processes"] == loadgen_processes
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
    # What the live side ran on: every part used some CPU, and sends were on time.
    cpu = result["machine"]["live_cpu"]
    assert cpu["gateway_cpu_s"] > 0 and cpu["engines_cpu_s"] > 0 and cpu["loadgen_cpu_s"] > 0
    assert cpu["engine_max_cpu_s"] <= cpu["engines_cpu_s"]
    assert cpu["wall_s"] >= workload[-1].arrival_s
    assert result["machine"]["loadgen_send_lag"]["requests"] == len(workload)
    assert result["machine"]["loadgen_send_lag"]["send_lag_ms_p50"] < 100.0
    assert len(result["machine"]["loadavg_before"]) == 3
    lag = result["machine"]["engine_lag"]
    assert lag["iterations"] > 0 and lag["slowdown"] is not None and lag["slowdown"] > -0.05
    # The gateway's own counts: one decision per request, nothing queued without admission.
    assert sum(result["live_gateway"]["decisions"].values()) == len(workload)
    assert result["live_gateway"]["queue_wait"] == {}
    assert result["live_gateway"]["gateway_ttft_mean"] > 0


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


def test_named_workload_is_the_admission_experiments_workload_retimed() -> None:
    requests, source = named_workload("long_tailed", 60, rate=5.0, seed=3)
    built, built_source = workload_requests("long_tailed", 60, seed=3)
    assert source == built_source and source["workload"] == "long_tailed"
    # The same requests (ids, prompts, order), only the arrivals scaled to the rate.
    assert [(r.request_id, r.prompt_len, r.output_len) for r in requests] == \
        [(r.request_id, r.prompt_len, r.output_len) for r in built]
    span = requests[-1].arrival_s - requests[0].arrival_s
    assert (len(requests) - 1) / span == pytest.approx(5.0, rel=0.01)
    assert any(r.request_id.startswith("doc-") for r in requests)  # the long tail is there


def test_cpu_report_and_send_lag() -> None:
    before = {"gateway": 1.0, "engines": [1.0, 2.0], "loadgen": 0.5}
    after = {"gateway": 3.0, "engines": [2.0, 5.0], "loadgen": 1.5}
    report = cpu_report(before, after, wall_s=2.0)
    assert report["gateway_cpu_s"] == pytest.approx(2.0)
    assert report["engines_cpu_s"] == pytest.approx(4.0)
    assert report["engine_max_cpu_s"] == pytest.approx(3.0)
    assert report["total_cores"] == pytest.approx(3.5)
    workload = _workload(4)
    outcomes = [RequestOutcome(r.request_id, r.arrival_s + 0.01 * i, r.prompt_len, r.output_len)
                for i, r in enumerate(workload)]
    lag = send_lag(workload, outcomes)
    assert lag["requests"] == 4
    assert lag["send_lag_ms_max"] == pytest.approx(30.0)
    assert lag["send_lag_ms_p50"] == pytest.approx(15.0)


def test_per_request_diff_fit_separates_fixed_and_per_token_overhead() -> None:
    # Live = sim + 5 ms + 2 ms per 1k prompt tokens, every request on the same instance.
    workload = _workload(8)
    sim = [RequestOutcome(r.request_id, r.arrival_s, r.prompt_len, r.output_len,
                          instance_id="i00", ttft_s=0.1) for r in workload]
    live = [RequestOutcome(r.request_id, r.arrival_s, r.prompt_len, r.output_len,
                           instance_id="i00", ttft_s=0.1 + 0.005 + 2e-6 * r.prompt_len)
            for r in workload]
    out = per_request(live, sim)
    assert out["same_instance_fraction"] == 1.0
    fit = out["same_instance"]["ttft_diff_fit"]
    assert fit["intercept_ms"] == pytest.approx(5.0, abs=0.01)
    assert fit["ms_per_1k_prompt_tokens"] == pytest.approx(2.0, abs=0.001)


def test_live_fleet_that_fails_to_start_is_stopped_and_restarted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stopped: list[int] = []
    attempts: list[int] = []

    def start(stack: contextlib.ExitStack, *args: object) -> LiveFleet:
        attempt = len(attempts)
        attempts.append(attempt)
        stack.callback(stopped.append, attempt)
        if attempt == 0:
            raise FleetStartError("port taken")
        return LiveFleet(f"http://fleet-{attempt}", gateway_pid=attempt)

    monkeypatch.setattr(fidelity, "_start_fleet", start)
    with fidelity.live_fleet(RunConfig()) as fleet:
        assert fleet.url == "http://fleet-1"
        assert stopped == [0]  # the failed attempt's processes were stopped first
    assert stopped == [0, 1]
    attempts.clear()
    stopped.clear()

    def never(stack: contextlib.ExitStack, *args: object) -> LiveFleet:
        raise FleetStartError("always")

    monkeypatch.setattr(fidelity, "_start_fleet", never)
    with pytest.raises(FleetStartError), fidelity.live_fleet(RunConfig(), start_attempts=2):
        pass


def test_engine_lag_from_loop_counters() -> None:
    before = [{"iterations": 10, "device_s": 1.0, "wall_s": 1.0, "late_s": 0.0},
              {"iterations": 0, "device_s": 0.0, "wall_s": 0.0, "late_s": 0.0}]
    after = [{"iterations": 110, "device_s": 2.0, "wall_s": 2.1, "late_s": 0.05},
             {"iterations": 100, "device_s": 2.0, "wall_s": 2.3, "late_s": 0.15}]
    lag = engine_lag(before, after)
    assert lag["iterations"] == 200
    assert lag["slowdown"] == pytest.approx((1.1 + 2.3) / 3.0 - 1.0, abs=1e-4)
    assert lag["slowdown_max"] == pytest.approx(0.15)
    assert lag["late_ms_per_iteration"] == pytest.approx(1.0)


def test_cli_named_workload_with_admission_sim_only(tmp_path: Path) -> None:
    out = tmp_path / "fid.json"
    assert main(["--workload", "long_tailed", "--rate", "2", "--max-requests", "30",
                 "--instances", "2", "--admission", "laps", "--sim-only",
                 "--out", str(out), "--plot", str(tmp_path / "fid.png")]) == 0
    assert (tmp_path / "fid.png").stat().st_size > 10_000
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["workload"]["workload"] == "long_tailed" and config["trace"] is None
    assert config["admission"] == "laps"
    assert config["requests"] == len(workload_requests("long_tailed", 30)[0])
    assert result["sim_fresh"]["admission"] == "laps"
    assert result["sim_fresh"]["completed"] == config["requests"]
    assert result["command"].startswith("python -m loadgen.fidelity --workload long_tailed")
