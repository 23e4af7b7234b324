"""PrefixCacheView: approximate LRU from routed prompts, precise from engine KV events."""

from __future__ import annotations

import numpy as np
import pytest

from instances.engine.block_manager import BlockManager, compute_block_hashes
from proto.kv_events import KVEvent
from router.policy.cache_view import PrefixCacheView
from tests.routing.util import tokens


def test_match_is_the_longest_recorded_prefix() -> None:
    rng = np.random.default_rng(0)
    view = PrefixCacheView(block_size=16)
    routed = tokens(rng, 16 * 20 + 5)
    view.record_prompt("x", view.prefix_hashes(routed))
    same_head = routed.copy()
    same_head[16 * 12 + 1] += 1  # diverges inside block 12
    longer = np.concatenate([routed[: 16 * 20], tokens(rng, 300)])
    assert view.cached_blocks("x", view.prefix_hashes(routed)) == 20
    assert view.cached_blocks("x", view.prefix_hashes(same_head)) == 12
    assert view.cached_blocks("x", view.prefix_hashes(longer)) == 20
    assert view.cached_blocks("x", view.prefix_hashes(tokens(rng, 400))) == 0
    assert view.cached_blocks("y", view.prefix_hashes(routed)) == 0
    assert view.cached_tokens("x", view.prefix_hashes(same_head)) == 12 * 16


def test_lru_capacity_evicts_deep_blocks_of_old_prompts_first() -> None:
    rng = np.random.default_rng(1)
    view = PrefixCacheView(block_size=16, default_capacity_tokens=16 * 10)
    shared = tokens(rng, 16 * 4)
    old = np.concatenate([shared, tokens(rng, 16 * 4)])
    new = np.concatenate([shared, tokens(rng, 16 * 4)])
    view.record_prompt("x", view.prefix_hashes(old))
    view.record_prompt("x", view.prefix_hashes(new))  # 12 distinct blocks > capacity 10
    assert view.num_blocks("x") == 10
    # The shared head and the new prompt survive; the old prompt lost its two deepest blocks.
    assert view.cached_blocks("x", view.prefix_hashes(new)) == 8
    assert view.cached_blocks("x", view.prefix_hashes(old)) == 6
    view.set_capacity("x", 16 * 5)
    assert view.num_blocks("x") == 5
    assert view.cached_blocks("x", view.prefix_hashes(new)) == 5


def _run_engine(bm: BlockManager, prompt: np.ndarray) -> list[int]:
    """Admit ``prompt`` like the scheduler does: reuse its cached prefix, cache, free."""
    hashes = compute_block_hashes(prompt, bm.block_size)
    table: list[int] = []
    computed = bm.find_cached_prefix(hashes, len(hashes))
    assert bm.allocate(table, len(hashes), computed)
    bs = bm.block_size
    bm.cache_blocks(table, hashes, 0, len(hashes),
                    lambda i: prompt[i * bs : (i + 1) * bs].tolist())
    bm.free(table)
    return hashes


def test_precise_view_follows_the_engines_block_manager_exactly() -> None:
    rng = np.random.default_rng(2)
    bm = BlockManager(num_blocks=40, block_size=16, enable_kv_events=True)
    view = PrefixCacheView(block_size=16)
    families = [tokens(rng, 16 * 6) for _ in range(3)]
    prompts = []
    for step in range(60):
        head = families[step % 3]
        prompt = np.concatenate([head[: 16 * int(rng.integers(1, 7))],
                                 tokens(rng, 16 * int(rng.integers(0, 8)) + 7)])
        prompts.append(prompt)
        _run_engine(bm, prompt)
        view.apply_kv_events("x", bm.drain_events())
        for probe in prompts[-8:] + families:
            engine = bm.num_cached_prefix_blocks(compute_block_hashes(probe, 16))
            assert view.cached_blocks("x", view.prefix_hashes(probe)) == engine
    assert view.is_precise("x") and view.unplaced_blocks("x") == 0
    assert view.num_blocks("x") == bm.num_cached_blocks


def test_precise_view_ignores_routed_prompts_and_handles_clear() -> None:
    rng = np.random.default_rng(3)
    view = PrefixCacheView(block_size=16)
    prompt = tokens(rng, 64)
    view.record_prompt("x", view.prefix_hashes(prompt))
    assert view.cached_blocks("x", view.prefix_hashes(prompt)) == 4
    bm = BlockManager(num_blocks=8, block_size=16, enable_kv_events=True)
    _run_engine(bm, prompt[:32])
    view.apply_kv_events("x", bm.drain_events())  # now precise: only the engine's 2 blocks
    assert view.cached_blocks("x", view.prefix_hashes(prompt)) == 2
    view.record_prompt("x", view.prefix_hashes(prompt))
    assert view.cached_blocks("x", view.prefix_hashes(prompt)) == 2
    view.apply_kv_events("x", [KVEvent(kind="AllBlocksCleared")])
    assert view.cached_blocks("x", view.prefix_hashes(prompt)) == 0


def test_blocks_without_a_known_parent_or_tokens_are_counted_not_placed() -> None:
    view = PrefixCacheView(block_size=16)
    orphan = KVEvent("BlockStored", (11, 12), parent_block_hash=999,
                     token_ids=tuple(range(32)), block_size=16)
    no_tokens = KVEvent("BlockStored", (13,), parent_block_hash=None, block_size=16)
    view.apply_kv_events("x", [orphan, no_tokens])
    assert view.unplaced_blocks("x") == 3 and view.num_blocks("x") == 0
    with pytest.raises(ValueError):
        view.apply_kv_events("x", [KVEvent("BlockStored", (1,), None, tuple(range(8)), 8)])


def test_bulk_recording_keeps_the_exact_lru_order_of_one_touch_per_block() -> None:
    from collections import OrderedDict

    rng = np.random.default_rng(5)
    view = PrefixCacheView(16, default_capacity_tokens=16 * 300)
    reference: OrderedDict[int, None] = OrderedDict()
    families = [tokens(rng, 1200) for _ in range(6)]
    for _ in range(300):
        head = families[int(rng.integers(len(families)))][: int(rng.integers(0, 1200))]
        prompt = np.concatenate([head, tokens(rng, int(rng.integers(0, 400)))])
        hashes = view.prefix_hashes(prompt)
        view.record_prompt("x", hashes)
        for prefix_hash in reversed(hashes.tolist()):  # the plain definition
            if prefix_hash in reference:
                reference.move_to_end(prefix_hash)
            else:
                reference[prefix_hash] = None
        while len(reference) > 300:
            reference.popitem(last=False)
        assert view._caches["x"].blocks.keys() == list(reference)


def test_a_search_hint_never_changes_the_answer() -> None:
    rng = np.random.default_rng(9)
    view = PrefixCacheView(16, default_capacity_tokens=16 * 400)
    family = tokens(rng, 2000)
    for _ in range(40):
        cut = int(rng.integers(0, 2000))
        view.record_prompt("x", view.prefix_hashes(
            np.concatenate([family[:cut], tokens(rng, int(rng.integers(0, 300)))])))
    for _ in range(40):
        probe = np.concatenate([family[: int(rng.integers(0, 2000))], tokens(rng, 50)])
        hashes = view.prefix_hashes(probe)
        plain = view.cached_blocks("x", hashes)
        for hint in {0, 1, 2, plain - 1, plain, plain + 1, len(hashes) - 1, len(hashes), 10**6}:
            assert view.cached_blocks("x", hashes, hint) == plain
