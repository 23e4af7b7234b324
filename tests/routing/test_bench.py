"""``llmfleet bench routing``: JSON contract, results file, and the ``bench`` group hook."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from router import bench
from router.cli import main


def test_bench_routing_prints_and_writes_the_contract_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routing.json"
    code = main(["bench", "routing", "--instances", "4", "--policies", "dualmap,round_robin",
                 "--prompt-tokens", "2048", "--decisions", "60", "--warmup", "30",
                 "--refresh-every", "16", "--repeat", "3", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["instances"] == 4 and printed["prompt_tokens"] == 2048
    assert 0 < printed["decision_us_p50"] <= printed["decision_us_p99"]
    assert printed["decision_us_p99"] == printed["policies"]["dualmap"]["decision_us_p99"]
    for row in printed["policies"].values():
        assert 0 < row["decision_us_p50"] <= row["decision_us_p99"] <= row["decision_us_max"]
        assert sum(row["reasons"].values()) == 60
    assert printed["policies"]["round_robin"]["reasons"] == {"round_robin": 60}
    assert "dualmap" in printed["list_input"]
    # Three rounds; each number is the median over them.
    dualmap = printed["policies"]["dualmap"]
    assert len(dualmap["repeats"]) == 3
    assert dualmap["decision_us_p99"] == pytest.approx(
        sorted(r["decision_us_p99"] for r in dualmap["repeats"])[1], abs=0.01)
    assert dualmap["adopt_us_p50"] > 0  # snapshots were adopted apart from decisions
    assert "target_met" not in printed  # targets exist for 16 and 1,024 instances only


def test_several_fleet_sizes_are_reported_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "routing", "--instances", "2,3", "--policies", "least_loaded",
                 "--prompt-tokens", "600", "--decisions", "20", "--warmup", "5",
                 "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["by_instances"]) == {"2", "3"}
    assert result["by_instances"]["3"]["policies"]["least_loaded"]["decision_us_p50"] > 0


def test_unknown_policy_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "routing", "--policies", "nope", "--out", "-"]) == 2


def test_other_packages_hook_their_bench_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_bench_module")

    def register_bench(subparsers: Any) -> None:
        parser = subparsers.add_parser("fake")
        parser.set_defaults(func=lambda args: 7)

    module.register_bench = register_bench  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_bench_module", module)
    monkeypatch.setattr(bench, "BENCH_MODULES", ("fake_bench_module", "router.not_there_bench"))
    parser = argparse.ArgumentParser()
    bench.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "fake"])
    assert args.func(args) == 7


def test_every_round_makes_the_same_decisions(tmp_path: Path) -> None:
    """Same seed, same decisions: one digest over the rounds, and a different seed differs."""
    settings = {"instances": [4], "policies": ["dualmap"], "prompt_tokens": 1024,
                "decisions": 40, "warmup": 20, "refresh_every": 16, "seed": 0}
    first = bench.one_round(settings)["4"]["dualmap"]
    again = bench.one_round(settings)["4"]["dualmap"]
    other = bench.one_round({**settings, "seed": 1})["4"]["dualmap"]
    assert len(first["decisions_sha256"]) == 64
    assert first["decisions_sha256"] == again["decisions_sha256"] != other["decisions_sha256"]
    row = bench._median_of_repeats([first, again])
    assert row["decisions_sha256"] == first["decisions_sha256"]
    assert bench._median_of_repeats([first, other])["decisions_sha256"] == sorted(
        [first["decisions_sha256"], other["decisions_sha256"]])


@pytest.mark.e2e
def test_against_another_checkout_runs_both_side_by_side(tmp_path: Path) -> None:
    """``--against`` with this very checkout on both sides: every round in fresh processes,
    both sides reported, the same decisions, ratios near 1 (timing noise aside)."""
    repo = Path(bench.__file__).resolve().parents[1]
    out = tmp_path / "ab.json"
    assert main(["bench", "routing", "--instances", "4", "--policies", "dualmap",
                 "--prompt-tokens", "1024", "--decisions", "60", "--warmup", "30",
                 "--refresh-every", "16", "--repeat", "2", "--against", str(repo),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "routing-against"
    assert result["before"]["tree"] == result["after"]["tree"] == str(repo)
    assert result["before"]["commit"] == result["after"]["commit"]
    row = result["by_instances"]["4"]["dualmap"]
    assert row["same_decisions"] is True
    assert len(row["before"]["repeats"]) == len(row["after"]["repeats"]) == 2
    assert sum(row["after"]["reasons"].values()) == 60
    assert 0.1 < row["ratio_p50"] < 10 and 0.1 < row["paired_ratio_p50"] < 10
    assert len(result["load_average_1m_before_each_run"]) == 4
