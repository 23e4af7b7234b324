"""The fidelity benchmark runs and the core adds no cost beyond its profile's formula."""

from __future__ import annotations

import json
from pathlib import Path

from instances.engine.fidelity import main


def test_fidelity_benchmark_writes_results_matching_the_formula(tmp_path: Path) -> None:
    assert main(["--profiles", "dualmap-910b4-qwen2.5-7b", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine-fidelity.json").read_text())
    assert (tmp_path / "engine-fidelity.png").stat().st_size > 10_000
    result = report["profiles"]["dualmap-910b4-qwen2.5-7b"]
    assert report["max_rel_error"] < 1e-9
    ttft = {row["prompt_tokens"]: row for row in result["ttft"]}
    # 0.16 ms per uncached token (DualMap): 8k tokens take ~1.3 s cold, one floor cached.
    assert 1.2 < ttft[8192]["ttft_s"] < 1.45
    assert ttft[8192]["ttft_cached_s"] < 0.05
    assert result["tpot"][-1]["tpot_s"] > result["tpot"][0]["tpot_s"]
    assert report["core_overhead"]["us_per_sequence_step"] > 0
