"""Synthetic workloads: prefix structure, sizes, rates, determinism."""

from __future__ import annotations

import itertools

import pytest

from loadgen.arrivals import mean_rate
from loadgen.request import shared_prefix_tokens
from loadgen.workloads import (
    LongShortConfig,
    MultiTurnConfig,
    SharedPrefixConfig,
    build_synthetic,
    generated_shared_prefix,
    long_short_mix,
    multi_turn,
    zipf_prefixes,
)
from proto.byte_tokenizer import EOS_TOKEN_ID


def test_multi_turn_history_grows_and_is_a_prefix() -> None:
    config = MultiTurnConfig(system_prompt_len=128, user_len_mean=40, output_len_mean=20,
                             think_time_mean_s=3.0)
    requests = multi_turn(400, rate=5.0, seed=1, config=config)
    assert len(requests) == 400
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert mean_rate([r.arrival_s for r in requests]) == pytest.approx(5.0, rel=0.25)
    sessions: dict[str, list] = {}
    for r in requests:
        sessions.setdefault(r.session_id or "", []).append(r)
    multi = [turns for turns in sessions.values() if len(turns) >= 2]
    assert multi
    for turns in multi[:20]:
        turns.sort(key=lambda r: r.turn)
        assert [t.turn for t in turns] == list(range(len(turns)))
        for earlier, later in itertools.pairwise(turns):
            assert later.arrival_s > earlier.arrival_s
            assert later.prompt_len > earlier.prompt_len + earlier.output_len
            assert later.token_ids()[:earlier.prompt_len] == earlier.token_ids()
    tokens = requests[0].token_ids()
    assert EOS_TOKEN_ID not in tokens and len(tokens) == requests[0].prompt_len
    assert multi_turn(400, 5.0, 1, config=config) == requests


def test_generated_shared_prefix_defaults() -> None:
    requests = generated_shared_prefix(0, rate=10.0, seed=3)
    assert len(requests) == 64 * 16
    assert {r.prompt_len for r in requests} == {2048 + 128}
    assert {r.output_len for r in requests} == {256}
    assert len({r.group for r in requests}) == 64
    # Everyone but the first of each group hits the 2,048-token system prompt.
    assert shared_prefix_tokens(requests, 16) == (64 * 16 - 64) * 2048
    small = generated_shared_prefix(10, 1.0, 3, config=SharedPrefixConfig(num_groups=2,
                                                                          prompts_per_group=3))
    assert len(small) == 6


def test_zipf_popularity_is_skewed() -> None:
    requests = zipf_prefixes(3000, rate=50.0, seed=4)
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.group or ""] = counts.get(r.group or "", 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 5 * ranked[min(20, len(ranked) - 1)]
    assert counts.get("doc0", 0) == ranked[0]


def test_long_short_mix_fraction() -> None:
    config = LongShortConfig(long_fraction=0.3)
    requests = long_short_mix(4000, rate=20.0, seed=5, config=config)
    longs = [r for r in requests if r.group == "long"]
    assert len(longs) / len(requests) == pytest.approx(0.3, abs=0.03)
    assert all(r.prompt_len >= config.long_len_min for r in longs)
    assert all(r.prompt_len <= config.short_len_max for r in requests if r.group == "short")


def test_build_synthetic_params_and_errors() -> None:
    requests = build_synthetic("shared_prefix", 0, 2.0, 0,
                               params={"num_groups": "2", "prompts_per_group": "2"})
    assert len(requests) == 4
    with pytest.raises(ValueError, match="no parameter"):
        build_synthetic("zipf", 10, 1.0, 0, params={"bogus": 1})
    with pytest.raises(ValueError, match="unknown synthetic workload"):
        build_synthetic("nope", 10, 1.0, 0)
