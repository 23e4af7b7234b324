"""Follow-up co-location in every sim summary (and its definition)."""

from __future__ import annotations

from types import SimpleNamespace

from loadgen.config import RunConfig
from loadgen.metrics import followup_colocation
from loadgen.sim import run_sim
from loadgen.workloads import MultiTurnConfig, multi_turn


def _turn(rid: str, session: str | None, turn: int, prompt_len: int) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, session_id=session, turn=turn, prompt_len=prompt_len)


def test_definition_by_count_and_by_shared_tokens() -> None:
    requests = [_turn("a0", "a", 0, 100), _turn("a1", "a", 1, 300), _turn("a2", "a", 2, 900),
                _turn("b0", "b", 0, 50), _turn("b1", "b", 1, 80), _turn("x", None, 0, 10)]
    served = {"a0": "i1", "a1": "i1", "a2": "i2", "b0": "i3", "b1": "i3", "x": "i1"}
    out = followup_colocation(requests, served)
    assert out["followups"] == 3
    assert out["followup_colocation"] == round(2 / 3, 4)
    # a1 shares 100 tokens with a0 (stayed), a2 300 with a1 (moved), b1 50 with b0 (stayed).
    assert out["followup_colocation_tokens"] == round(150 / 450, 4)
    none = followup_colocation([_turn("x", None, 0, 10)], {"x": "i1"})
    assert none["followups"] == 0 and none["followup_colocation"] is None


def test_sim_summary_reports_followup_colocation() -> None:
    requests = multi_turn(300, 4.0, seed=3, config=MultiTurnConfig(
        num_system_prompts=4, system_prompt_len=256, turns_min=3, turns_max=5,
        user_len_mean=60, output_len_mean=20, think_time_mean_s=2.0))
    summaries = {policy: run_sim(RunConfig(instances=4, policy=policy), requests=requests)
                 for policy in ("dualmap", "round_robin")}
    for summary in summaries.values():
        assert summary["followups"] > 100
        assert 0.0 <= summary["followup_colocation"] <= 1.0
        assert 0.0 <= summary["followup_colocation_tokens"] <= 1.0
    # Affinity keeps turns home; round robin scatters them (about 1/4 by chance).
    assert summaries["dualmap"]["followup_colocation"] >= 0.9
    assert summaries["round_robin"]["followup_colocation"] < 0.5
