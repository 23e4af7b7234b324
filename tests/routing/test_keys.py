"""PrefixKeyBuilder: base key lengths and adaptive lengthening past hot shared prefixes."""

from __future__ import annotations

import numpy as np

from router.policy.hashing import PrefixHasher, mix64
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
    key = keys.key(prompt)
    assert key.length == 1024
    assert key.hash == mix64(PrefixHasher(16).hashes(prompt[:1024]).item(63))
    assert key.chain == (key.hash,)
    # Passing the whole prompt's prefix hashes gives the same key without rehashing.
    assert keys.key(prompt, PrefixHasher(16).hashes(prompt)) == key
    short = prompt[:300]  # not a whole number of blocks: xxh64 of the tokens
    assert keys.key(short).hash == PrefixHasher(16).key_hash(short, 300)
    assert keys.key(short).hash != keys.key(prompt[:299]).hash
    other = np.concatenate([prompt[:1024], tokens(rng, 3000)])  # differs after the key
    assert keys.key(other).hash == key.hash


def test_longer_keys_end_on_the_step_grid_within_prompt_and_cap() -> None:
    keys = PrefixKeyBuilder(key_blocks=2, block_size=512, max_key_blocks=4, hot_step=128)
    assert keys.longer_length(1536, 5000) == 1664  # the split token is included
    assert keys.longer_length(1600, 5000) == 1664
    assert keys.longer_length(1600, 1650) == 1650  # the prompt ends first
    assert keys.longer_length(3000, 9000) == 2048  # capped at max_key_blocks


def _conversation(rng: np.random.Generator, shared: np.ndarray) -> np.ndarray:
    return np.concatenate([shared, tokens(rng, 600)])


def _warm(keys: PrefixKeyBuilder, prompts: list[np.ndarray], instances: int = 4) -> None:
    for prompt in prompts:
        keys.record(keys.key(prompt), prompt, instances)


def test_a_hot_shared_prefix_lengthens_keys_just_past_it() -> None:
    rng = np.random.default_rng(1)
    shared = tokens(rng, 1500)  # longer than the base key: everyone collapses onto one key
    keys = PrefixKeyBuilder(hot_min_count=8, hot_window=256)
    convs = [_conversation(rng, shared) for _ in range(40)]
    assert len({keys.key(c).hash for c in convs}) == 1
    _warm(keys, convs)
    hot = [keys.key(c) for c in convs]
    assert {k.length for k in hot} == {1536}  # the split at 1500, rounded up to the grid
    assert len({k.hash for k in hot}) == len(convs)
    # Each conversation keeps its longer key on later turns.
    turn2 = np.concatenate([convs[0], tokens(rng, 200)])
    assert keys.key(turn2).hash == hot[0].hash


def test_nested_hot_prefixes_lengthen_twice() -> None:
    rng = np.random.default_rng(2)
    shared = tokens(rng, 1100)
    families = [np.concatenate([shared, tokens(rng, 900)]) for _ in range(2)]
    keys = PrefixKeyBuilder(hot_min_count=8, hot_window=512, hot_share=0.2)
    prompts = [np.concatenate([families[k % 2], tokens(rng, 300)]) for k in range(120)]
    for _ in range(3):  # a few rounds: each level must be seen hot before the next forms
        _warm(keys, prompts)
    lengths = {keys.key(p).length for p in prompts}
    assert lengths == {2048}  # past 1100 (1152), then past the family prefix at 2000
    assert len({keys.key(p).hash for p in prompts}) == len(prompts)


def test_one_busy_conversation_keeps_its_key() -> None:
    rng = np.random.default_rng(3)
    keys = PrefixKeyBuilder(hot_min_count=4, hot_window=64)
    history = tokens(rng, 1100)
    for _turn in range(30):  # an agent loop re-sending its growing history
        history = np.concatenate([history, tokens(rng, 40)])
        keys.record(keys.key(history), history, 4)
    assert keys.key(history).length == 1024


def test_not_adaptive_never_lengthens_nor_records() -> None:
    rng = np.random.default_rng(4)
    shared = tokens(rng, 1500)
    keys = PrefixKeyBuilder(adaptive=False, hot_min_count=2)
    convs = [_conversation(rng, shared) for _ in range(20)]
    _warm(keys, convs)
    assert len(keys.detector) == 0
    assert keys.key(convs[0]).length == 1024
