"""The command lines of DESIGN.md parse as documented."""

from __future__ import annotations

import json

import pytest

from router.cli import build_parser, main


def test_sim_command_line() -> None:
    args = build_parser().parse_args([
        "sim", "--trace", "t.jsonl", "--trace-format", "mooncake", "--instances", "16",
        "--policy", "dualmap", "--rate", "4", "--slo-ttft", "5", "--json",
    ])
    assert args.command == "sim" and args.mode == "run"
    assert (args.trace, args.trace_format, args.instances, args.policy) == (
        "t.jsonl", "mooncake", 16, "dualmap")
    assert args.rate == 4.0 and args.slo_ttft == 5.0 and args.json


def test_sim_capacity_command_line() -> None:
    args = build_parser().parse_args([
        "sim", "capacity", "--trace", "t.jsonl", "--instances", "16",
        "--policies", "round_robin,dualmap", "--slo-ttft", "5", "--json",
    ])
    assert args.mode == "capacity"
    assert args.policies == "round_robin,dualmap" and args.instances == 16


def test_loadgen_command_line() -> None:
    args = build_parser().parse_args([
        "loadgen", "--url", "http://127.0.0.1:8000", "--trace", "a.csv", "--trace-format",
        "azure", "--rate", "2", "--max-requests", "50", "--max-seconds", "30",
        "--slo-ttft", "1", "--json", "--out", "x.json",
    ])
    assert args.command == "loadgen" and args.url == "http://127.0.0.1:8000"
    assert (args.max_requests, args.max_seconds, args.out) == (50, 30.0, "x.json")


def test_sim_command_prints_the_contract_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "--trace", "shared_prefix", "--trace-format", "synthetic",
                 "--workload-param", "num_groups=2", "--workload-param", "prompts_per_group=4",
                 "--workload-param", "output_len=8", "--instances", "2",
                 "--policy", "least_loaded", "--rate", "5", "--slo-ttft", "1", "--json",
                 "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("requests", "slo_attainment", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50",
                "throughput_rps", "cache_hit_rate", "load_imbalance", "wall_seconds"):
        assert key in summary
    assert summary["requests"] == 8 and summary["completed"] == 8
