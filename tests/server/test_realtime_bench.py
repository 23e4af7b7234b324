"""The real-time replica benchmark drives real replicas and reads their loop statistics."""

from __future__ import annotations

from instances.realtime_bench import run
from router.cli import build_parser


def test_one_replica_is_driven_and_measured() -> None:
    result = run([1], seconds=2.0, concurrency=2, prompt_tokens=64, max_tokens=8,
                 tolerance=0.05, profile=None)
    (row,) = result["rows"]
    assert row["replicas"] == 1 and row["errors"] == 0 and row["requests"] > 0
    assert row["busy_min"] > 0.3  # two closed-loop clients keep one replica busy
    assert abs(row["lateness_max"]) < 1.0
    assert result["max_realtime_replicas"] in (0, 1)


def test_registered_as_a_bench_subcommand() -> None:
    args = build_parser().parse_args(["bench", "realtime", "--sizes", "1,2", "--json"])
    assert args.sizes == "1,2" and args.func.__name__ == "run_cli"
