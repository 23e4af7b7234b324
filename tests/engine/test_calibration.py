"""The emulated executor reproduces its profile's timing through the whole core."""

from __future__ import annotations

import numpy as np
import pytest

from instances.engine.factory import build_engine_core, load_profile
from instances.engine.profile import prefill_attention_pairs
from proto.profiles import list_profiles
from tests.engine.drive import make_request, run_until_idle


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def test_required_profiles_exist_with_sources() -> None:
    names = set(list_profiles())
    assert {"h100-llama3-8b", "a100-llama3-8b", "h100-qwen2.5-7b", "dualmap-910b4-qwen2.5-7b"} <= (
        names
    )
    for name in names:
        profile = load_profile(name)
        assert len(profile.source) > 40, f"{name} must cite where its numbers come from"
    dualmap = load_profile("dualmap-910b4-qwen2.5-7b")
    assert dualmap.prefill_s_per_token == pytest.approx(0.16e-3)
    assert dualmap.kv_bytes_per_token == 57_344
    assert dualmap.kv_capacity_tokens == pytest.approx(1.1e6, rel=0.05)
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("h100-nonexistent")


def test_lone_2048_token_prompt_ttft_matches_profile_formula() -> None:
    core = build_engine_core("emulated", "h100-llama3-8b")
    profile = load_profile("h100-llama3-8b")
    log = run_until_idle(core, [make_request("a", _prompt(0, 2048), max_tokens=1)])
    ttft = log.first_token_time["a"]
    formula = (
        profile.iteration_floor_s
        + profile.prefill_s_per_token * 2048
        + profile.prefill_attn_s_per_ktoken * prefill_attention_pairs(0, 2048) / 1000
    )
    assert ttft == pytest.approx(formula, rel=0.10)
    # And the design's H100 numbers (0.021 ms/token, 6.5 ms floor) within 10 %.
    assert ttft == pytest.approx(0.0065 + 2048 * 0.021e-3, rel=0.10)
    assert log.num_steps == 1  # one iteration: 2048 < max_num_batched_tokens


def test_batch_32_decode_step_matches_profile_formula() -> None:
    # A budget that prefills all 32 prompts in one iteration, so they decode in lockstep.
    core = build_engine_core("emulated", "h100-llama3-8b", max_num_batched_tokens=32_000)
    profile = load_profile("h100-llama3-8b")
    for i in range(32):
        core.add_request(make_request(f"r{i}", _prompt(i, 1000), max_tokens=50))
    prefill = core.step(0.0)
    assert prefill.num_prefill_tokens == 32_000 and len(prefill.events) == 32
    # Everyone has sampled its first token: the next step is pure decode.
    result = core.step(prefill.duration_s)
    assert result.num_decode_seqs == 32 and result.num_prefill_tokens == 0
    context = 1001  # 1000 prompt tokens + the first output token, now being computed
    formula = (
        profile.iteration_floor_s
        + 32 * profile.decode_s_per_seq
        + profile.decode_attn_s_per_ktoken * 32 * context / 1000
    )
    assert result.duration_s == pytest.approx(formula, rel=0.10)
    assert result.duration_s == pytest.approx(profile.decode_time(32, context), rel=1e-9)
    assert len(result.events) == 32


def test_repeated_prompt_skips_prefill_of_cached_blocks() -> None:
    core = build_engine_core("emulated", "h100-llama3-8b")
    profile = load_profile("h100-llama3-8b")
    prompt = _prompt(7, 4000)
    first = run_until_idle(core, [make_request("a", prompt, max_tokens=4)])
    assert first.cached_tokens["a"] == 0
    core.add_request(make_request("b", prompt, max_tokens=4))
    result = core.step(first.end_time)
    # 4000 = 250 full blocks of 16; the last one is recomputed to produce logits.
    expected_cached = (4000 - 1) // 16 * 16
    assert result.events[0].num_cached_tokens == expected_cached
    assert result.num_prefill_tokens == 4000 - expected_cached
    assert result.duration_s == pytest.approx(profile.prefill_time(4000, expected_cached))
    assert result.duration_s < 0.2 * first.first_token_time["a"]
    stats = core.stats()
    assert stats.prefix_cache_hits == expected_cached
    assert stats.prefix_cache_queries == 8000


def test_prefix_caching_disabled_recomputes_everything() -> None:
    core = build_engine_core("emulated", enable_prefix_caching=False)
    prompt = _prompt(8, 512)
    run_until_idle(core, [make_request("a", prompt, max_tokens=2)])
    log = run_until_idle(core, [make_request("b", prompt, max_tokens=2)])
    assert log.cached_tokens["b"] == 0
    assert core.num_cached_prefix_tokens(prompt) == 0


def test_profiles_scale_as_their_hardware() -> None:
    h100 = load_profile("h100-llama3-8b")
    a100 = load_profile("a100-llama3-8b")
    qwen = load_profile("h100-qwen2.5-7b")
    assert a100.prefill_time(2048) > 2 * h100.prefill_time(2048)
    assert qwen.kv_bytes_per_token < h100.kv_bytes_per_token
    assert qwen.kv_capacity_tokens > 2 * h100.kv_capacity_tokens
