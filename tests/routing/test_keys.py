"""PrefixKeyBuilder: base key lengths and adaptive lengthening for hot prefixes."""

from __future__ import annotations

import numpy as np

from router.policy.hashing import key_hash
from router.policy.keys import PrefixKeyBuilder
from tests.routing.util import tokens


def test_base_key_covers_two_blocks_or_all_full_blocks_or_all_tokens() -> None:
    keys = PrefixKeyBuilder(key_blocks=2, block_size=512)
    assert keys.base_length(5000) == 1024
    assert keys.base_length(1024) == 1024
    assert keys.base_length(900) == 512
    assert keys.base_length(300) == 300
    rng = np.random.default_rng(0)
    prompt = tokens(rng, 5000)
    key = keys.key(prompt, num_instances=8)
    assert key.length == 1024 and key.hash == key_hash(prompt, 1024)
    # Beyond the key, prompts may differ freely.
    other = np.concatenate([prompt[:1024], tokens(rng, 3000)])
    assert keys.key(other, num_instances=8).hash == key.hash


def test_longer_keys_step_on_a_fixed_grid_within_the_prompt_and_the_cap() -> None:
    keys = PrefixKeyBuilder(key_blocks=2, block_size=512, max_key_blocks=4, hot_step=128)
    assert keys.next_length(1024, 3000) == 1152
    assert keys.next_length(1536, 1700) == 1664
    assert keys.next_length(1664, 1700) is None  # a step would reach past the prompt
    assert keys.next_length(2048, 9000) is None  # capped at max_key_blocks


def test_streamed_level_hashes_equal_one_shot_key_hashes() -> None:
    rng = np.random.default_rng(4)
    keys = PrefixKeyBuilder(hot_step=128)
    prompt = tokens(rng, 1300)
    key = keys.key(prompt, 4)  # cold: base key plus a probe one step longer
    assert key.chain == (key_hash(prompt, 1024), key_hash(prompt, 1152))


def _conversations(rng: np.random.Generator, shared: np.ndarray, count: int
                   ) -> list[np.ndarray]:
    return [np.concatenate([shared, tokens(rng, 600)]) for _ in range(count)]


def test_a_hot_shared_prefix_lengthens_the_key_so_conversations_differ() -> None:
    rng = np.random.default_rng(1)
    shared = tokens(rng, 1024)  # two full key blocks shared by everyone
    keys = PrefixKeyBuilder(hot_min_count=8, hot_window=256)
    convs = _conversations(rng, shared, 40)
    first = [keys.key(c, num_instances=4) for c in convs[:8]]
    assert len({k.hash for k in first}) == 1  # cold: they all collapse onto one key
    for c in convs:
        keys.record(keys.key(c, 4), 4)
    hot = [keys.key(c, 4) for c in convs]
    assert {k.length for k in hot} == {1152}
    assert len({k.hash for k in hot}) == len(convs)
    # Each conversation keeps its (longer) key across turns.
    turn2 = np.concatenate([convs[0], tokens(rng, 200)])
    assert keys.key(turn2, 4).hash == hot[0].hash


def test_one_busy_conversation_keeps_its_key() -> None:
    rng = np.random.default_rng(2)
    keys = PrefixKeyBuilder(hot_min_count=4, hot_window=64)
    history = tokens(rng, 1100)
    for _turn in range(30):  # one agent loop re-sending its growing history
        history = np.concatenate([history, tokens(rng, 40)])
        keys.record(keys.key(history, 4), 4)
    assert keys.key(history, 4).length == 1024


def test_not_adaptive_never_lengthens_nor_records() -> None:
    rng = np.random.default_rng(3)
    shared = tokens(rng, 1024)
    keys = PrefixKeyBuilder(adaptive=False, hot_min_count=2)
    for c in _conversations(rng, shared, 20):
        keys.record(keys.key(c, 4), 4)
    assert len(keys.detector) == 0
    assert keys.key(_conversations(rng, shared, 1)[0], 4).length == 1024
