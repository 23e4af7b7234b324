"""Block manager: chained hashes, reference counts, LRU eviction, KV events."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from instances.engine.block_manager import (
    ROOT_BLOCK_HASH,
    BlockManager,
    compute_block_hashes,
    hash_block_tokens,
)


def test_chained_hashes_cover_full_blocks_only_and_chain() -> None:
    tokens = list(range(37))
    hashes = compute_block_hashes(tokens, 8)
    assert len(hashes) == 4  # 37 tokens = 4 full blocks + 5 leftover tokens
    assert hashes[0] == hash_block_tokens(None, tokens[:8])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[8:16])
    # Continuing a chain from a parent gives the tail of the full chain.
    assert compute_block_hashes(tokens[16:], 8, parent_hash=hashes[1]) == hashes[2:]
    # Same block tokens under a different parent hash differently (position matters).
    assert hash_block_tokens(None, tokens[8:16]) != hashes[1]
    # numpy input and list input agree.
    assert compute_block_hashes(np.arange(37, dtype=np.int64), 8) == hashes
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(ROOT_BLOCK_HASH, [1, 2])


def test_block_hashes_are_identical_in_another_process() -> None:
    """Hashes must not depend on PYTHONHASHSEED or the process (router/engine agreement)."""
    tokens = [5, 300, 7, 8, 9, 10, 11, 12, 13, 256, 1, 2, 3, 4, 5, 6]
    here = compute_block_hashes(tokens, 4)
    code = (
        "from instances.engine.block_manager import compute_block_hashes;"
        f"print(compute_block_hashes({tokens}, 4))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == str(here)


def _manager(num_blocks: int = 8, events: bool = False) -> BlockManager:
    return BlockManager(num_blocks, 4, enable_prefix_caching=True, enable_kv_events=events)


def test_allocate_and_free_track_reference_counts() -> None:
    manager = _manager()
    table: list[int] = []
    assert manager.allocate(table, 3)
    assert len(table) == 3 and manager.num_free_blocks == 5
    assert manager.allocate(table, 3)  # already big enough: no change
    assert len(table) == 3
    other: list[int] = []
    assert not manager.allocate(other, 6)  # only 5 free: refused without side effects
    assert other == [] and manager.num_free_blocks == 5
    manager.free(table)
    assert table == [] and manager.num_free_blocks == 8
    manager.check_invariants()
    with pytest.raises(RuntimeError):
        manager.free([0])


def test_cached_prefix_is_shared_and_survives_free() -> None:
    manager = _manager()
    tokens = list(range(12))
    hashes = compute_block_hashes(tokens, 4)
    first: list[int] = []
    manager.allocate(first, 3)
    manager.cache_blocks(first, hashes, 0, 3)
    assert manager.find_cached_prefix(hashes, 3) == first
    assert manager.find_cached_prefix(hashes, 2) == first[:2]
    # A second user shares the blocks: reference counts go to 2.
    second: list[int] = []
    assert manager.allocate(second, 3, manager.find_cached_prefix(hashes, 2))
    assert second[:2] == first[:2] and second[2] != first[2]
    assert [manager.ref_count(b) for b in second[:2]] == [2, 2]
    first_blocks = list(first)
    manager.free(first)
    manager.free(second)
    manager.check_invariants()
    # Freed, still cached, and reusable (revived out of the free queue).
    assert manager.find_cached_prefix(hashes, 3) == first_blocks
    third: list[int] = []
    assert manager.allocate(third, 3, manager.find_cached_prefix(hashes, 3))
    assert third == first_blocks and manager.num_free_blocks == 5
    manager.check_invariants()


def test_eviction_takes_uncached_blocks_first_then_least_recently_used() -> None:
    manager = _manager(num_blocks=6)
    old_tokens, new_tokens = list(range(8)), list(range(100, 108))
    old_hashes = compute_block_hashes(old_tokens, 4)
    new_hashes = compute_block_hashes(new_tokens, 4)
    old: list[int] = []
    manager.allocate(old, 2)
    manager.cache_blocks(old, old_hashes, 0, 2)
    manager.free(old)  # freed first = least recently used
    new: list[int] = []
    manager.allocate(new, 2)
    manager.cache_blocks(new, new_hashes, 0, 2)
    manager.free(new)
    # 2 never-used blocks are handed out before any cached block is evicted.
    fresh: list[int] = []
    manager.allocate(fresh, 2)
    assert manager.num_cached_prefix_blocks(old_hashes) == 2
    assert manager.num_cached_prefix_blocks(new_hashes) == 2
    # The next allocation evicts the old prefix, deepest block first.
    more: list[int] = []
    manager.allocate(more, 1)
    assert manager.num_cached_prefix_blocks(old_hashes) == 1
    assert manager.num_cached_prefix_blocks(new_hashes) == 2
    manager.allocate(more, 2)
    assert manager.num_cached_prefix_blocks(old_hashes) == 0
    assert manager.num_cached_prefix_blocks(new_hashes) == 2
    manager.check_invariants()


def test_kv_events_describe_stores_removals_and_clears() -> None:
    manager = _manager(num_blocks=3, events=True)
    tokens = list(range(8))
    hashes = compute_block_hashes(tokens, 4)
    table: list[int] = []
    manager.allocate(table, 2)
    manager.cache_blocks(table, hashes, 0, 2, lambda i: tokens[i * 4 : (i + 1) * 4])
    stored = manager.drain_events()
    assert [e.kind for e in stored] == ["BlockStored"]
    assert stored[0].block_hashes == tuple(hashes)
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids == tuple(tokens) and stored[0].block_size == 4
    assert manager.drain_events() == []
    manager.free(table)
    other: list[int] = []
    manager.allocate(other, 3)  # needs every block: evicts both cached ones
    removed = manager.drain_events()
    assert sorted(h for e in removed for h in e.block_hashes) == sorted(hashes)
    assert {e.kind for e in removed} == {"BlockRemoved"}
    manager.free(other)
    assert manager.reset_prefix_cache()
    assert [e.kind for e in manager.drain_events()] == ["AllBlocksCleared"]


def test_kv_events_off_by_default_and_caching_can_be_disabled() -> None:
    manager = BlockManager(4, 4, enable_prefix_caching=False)
    hashes = compute_block_hashes(list(range(8)), 4)
    table: list[int] = []
    manager.allocate(table, 2)
    manager.cache_blocks(table, hashes, 0, 2)
    assert manager.find_cached_prefix(hashes, 2) == []
    assert manager.drain_events() == []
