"""The command lines of DESIGN.md parse as documented."""

from __future__ import annotations

from router.cli import build_parser


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
