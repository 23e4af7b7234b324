"""Paged KV block manager with a chained-hash prefix cache (vLLM v1 style).

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A request owns a *block
table* (a list of block ids, one per ``block_size`` tokens). Once a block is full and its
KV computed, the block is *cached*: it is indexed by its chained hash
``hash_block_tokens(parent_hash, block_token_ids)`` so a later request whose prompt starts with
the same tokens reuses it instead of recomputing it. Only full blocks are cached.

Each block has a reference count (how many running requests use it). A block whose count drops
to zero goes to the *free queue*, which is ordered by eviction priority:

* free blocks that hold no cached content sit at the front and are handed out first;
* freed cached blocks are appended at the back in reverse block-table order (a sequence's
  tail before its head), so the least recently used prefix, and within it the deepest blocks,
  are evicted first.

Allocating pops from the front; popping a cached block evicts it (``BlockRemoved``). Reusing a
cached block whose count is zero takes it out of the free queue. Everything is O(1) per block.

Block hashes are xxh3-64 over the block's token ids as little-endian int32, seeded with the
parent block's hash (``ROOT_BLOCK_HASH`` for the first block): deterministic across processes
and machines, so the router can compute the very same hashes (``compute_block_hashes``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import xxhash

from proto.kv_events import KVEvent
from proto.tokens import as_token_array

# Seed of the first block of every sequence (the "parent" of block 0). An arbitrary odd
# 64-bit constant; changing it changes every hash the router and engines agree on.
ROOT_BLOCK_HASH = 0x9E3779B97F4A7C15


def hash_block_tokens(
    parent_hash: int | None, token_ids: Sequence[int] | npt.NDArray[np.integer]
) -> int:
    """Chained hash of one block: xxh3-64(int32 LE bytes of ``token_ids``, seed=parent).

    ``parent_hash`` is the previous block's hash, or None for the first block of a sequence.
    """
    seed = ROOT_BLOCK_HASH if parent_hash is None else parent_hash
    return xxhash.xxh3_64_intdigest(as_token_array(token_ids).tobytes(), seed)


def compute_block_hashes(
    token_ids: Sequence[int] | npt.NDArray[np.integer],
    block_size: int,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block has none).

    ``parent_hash`` continues a chain: hashing ``tokens[k*bs:]`` with the hash of block
    ``k - 1`` gives the same hashes as the tail of hashing all of ``tokens``.
    """
    tokens = as_token_array(token_ids)
    num_full_blocks = len(tokens) // block_size
    raw = memoryview(tokens.data).cast("B")
    stride = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    hashes: list[int] = []
    seed = ROOT_BLOCK_HASH if parent_hash is None else parent_hash
    for i in range(num_full_blocks):
        seed = digest(raw[i * stride : (i + 1) * stride], seed)
        hashes.append(seed)
    return hashes


class BlockManager:
    """Allocates KV blocks to block tables and keeps the prefix cache.

    The manager does not know requests: callers pass the block table (a ``list[int]`` they
    own) and the block hashes of the sequence. All methods are O(number of blocks touched).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        enable_kv_events: bool = False,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_kv_events = enable_kv_events
        self._ref_counts: list[int] = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks in eviction order (front = next to hand out). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._events: list[KVEvent] = []

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, cached-but-unreferenced included)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running requests."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash a block is cached under, None if it holds no cached content."""
        return self._block_hash[block_id]

    def find_cached_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (at most ``max_blocks``).

        Read-only: reference counts and eviction order are not touched.
        """
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        cached = self._cached
        for block_hash in block_hashes[:max_blocks]:
            block_id = cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` are cached (read-only probe)."""
        if not self.enable_prefix_caching:
            return 0
        cached = self._cached
        count = 0
        for block_hash in block_hashes:
            if block_hash not in cached:
                break
            count += 1
        return count

    # ---- allocation ------------------------------------------------------------------------

    def allocate(
        self, block_table: list[int], num_required_blocks: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow ``block_table`` to ``num_required_blocks`` blocks; False (no change) if short.

        ``computed_blocks`` (cached blocks found by ``find_cached_prefix``; only allowed on an
        empty table) are appended first and have their reference counts raised; the rest are
        fresh blocks from the front of the free queue, evicting their cached content.
        """
        if not computed_blocks:
            if len(block_table) >= num_required_blocks:
                return True  # the common decode case: the last block still has room
        elif block_table:
            raise ValueError("computed blocks can only start an empty block table")
        num_new = num_required_blocks - len(block_table) - len(computed_blocks)
        if num_new < 0:
            num_new = 0
        ref_counts = self._ref_counts
        # Cached blocks nobody references sit in the free queue; reusing them shrinks it.
        num_revived = 0
        for block_id in computed_blocks:
            if ref_counts[block_id] == 0:
                num_revived += 1
        if num_new + num_revived > len(self._free):
            return False
        free = self._free
        for block_id in computed_blocks:
            if ref_counts[block_id] == 0:
                del free[block_id]
            ref_counts[block_id] += 1
            block_table.append(block_id)
        for _ in range(num_new):
            block_id, _unused = free.popitem(last=False)
            if self._block_hash[block_id] is not None:
                self._evict(block_id)
            ref_counts[block_id] = 1
            block_table.append(block_id)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block of ``block_table`` and clear the table."""
        ref_counts = self._ref_counts
        free = self._free
        block_hash = self._block_hash
        for block_id in reversed(block_table):
            count = ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            ref_counts[block_id] = count
            if count == 0:
                free[block_id] = None
                if block_hash[block_id] is None:
                    # Nothing worth keeping: hand it out before any cached block.
                    free.move_to_end(block_id, last=False)
        block_table.clear()

    # ---- single cached blocks (migration import) -------------------------------------------

    def cached_block(self, block_hash: int) -> int | None:
        """The block cached under ``block_hash``, None if none (read-only)."""
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def forget(self, block_id: int) -> None:
        """Drop a free block's cached content (it held bad data) and hand it out first."""
        if self._ref_counts[block_id] != 0:
            raise RuntimeError(f"block {block_id} is in use")
        if self._block_hash[block_id] is not None:
            self._evict(block_id)
        self._free.move_to_end(block_id, last=False)

    def acquire_cached(self, block_hash: int) -> int | None:
        """Take a reference on the block cached under ``block_hash``; None if not cached."""
        block_id = self._cached.get(block_hash) if self.enable_prefix_caching else None
        if block_id is None:
            return None
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1
        return block_id

    def store_block(
        self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> int | None:
        """Take a free block (evicting as usual), index it under ``block_hash`` and return it
        with one reference held; None when no block is free. The caller fills its content."""
        table: list[int] = []
        if not self.allocate(table, 1):
            return None
        block_id = table[0]
        if self.enable_prefix_caching and block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self._block_hash[block_id] = block_hash
            if self.enable_kv_events:
                self._emit_stored([block_hash], parent_hash, [int(t) for t in token_ids])
        return block_id

    # ---- prefix cache ----------------------------------------------------------------------

    def cache_blocks(
        self,
        block_table: Sequence[int],
        block_hashes: Sequence[int],
        start: int,
        end: int,
        block_tokens: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        """Index blocks ``[start, end)`` of ``block_table`` under ``block_hashes[i]``.

        The blocks must be full and computed. A hash already cached under another block (the
        same prefix computed twice concurrently) keeps the first block; the duplicate stays
        uncached and is recycled when freed. ``block_tokens(i)`` gives block i's token ids
        for ``BlockStored`` events (only called when KV events are on).
        """
        if not self.enable_prefix_caching or start >= end:
            return
        cached = self._cached
        block_hash_of = self._block_hash
        if not self.enable_kv_events:
            for i in range(start, end):
                block_hash = block_hashes[i]
                block_id = block_table[i]
                if block_hash not in cached and block_hash_of[block_id] is None:
                    cached[block_hash] = block_id
                    block_hash_of[block_id] = block_hash
            return
        stored: list[int] = []
        stored_tokens: list[int] = []
        first_parent: int | None = None
        for i in range(start, end):
            block_hash = block_hashes[i]
            block_id = block_table[i]
            if block_hash in cached or block_hash_of[block_id] is not None:
                continue
            cached[block_hash] = block_id
            block_hash_of[block_id] = block_hash
            parent = block_hashes[i - 1] if i > 0 else None
            if not stored:
                first_parent = parent
            elif stored[-1] != parent:
                self._emit_stored(stored, first_parent, stored_tokens)
                stored, stored_tokens, first_parent = [], [], parent
            stored.append(block_hash)
            if block_tokens is not None:
                stored_tokens.extend(int(t) for t in block_tokens(i))
        if stored:
            self._emit_stored(stored, first_parent, stored_tokens)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no block is referenced."""
        if self.num_used_blocks != 0:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        self._free = OrderedDict((b, None) for b in range(self.num_blocks))
        if self.enable_kv_events:
            self._events.append(KVEvent(kind="AllBlocksCleared"))
        return True

    def drain_events(self) -> list[KVEvent]:
        """KV events since the last call (empty unless KV events are enabled)."""
        events, self._events = self._events, []
        return events

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests; O(num_blocks))."""
        for block_id in range(self.num_blocks):
            count = self._ref_counts[block_id]
            assert count >= 0, f"block {block_id} has ref count {count}"
            assert (count == 0) == (block_id in self._free), (
                f"block {block_id}: ref count {count} but in free queue: {block_id in self._free}"
            )
        for block_hash, block_id in self._cached.items():
            assert self._block_hash[block_id] == block_hash, f"cache index stale for {block_id}"
        num_hashed = sum(1 for h in self._block_hash if h is not None)
        assert num_hashed == len(self._cached), "hashed blocks and cache index disagree"

    # ---- internals -------------------------------------------------------------------------

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        assert block_hash is not None
        if self._cached.get(block_hash) == block_id:
            del self._cached[block_hash]
        self._block_hash[block_id] = None
        if self.enable_kv_events:
            self._events.append(KVEvent(kind="BlockRemoved", block_hashes=(block_hash,)))

    def _emit_stored(self, hashes: list[int], parent: int | None, tokens: list[int]) -> None:
        self._events.append(
            KVEvent(
                kind="BlockStored",
                block_hashes=tuple(hashes),
                parent_block_hash=parent,
                token_ids=tuple(tokens),
                block_size=self.block_size,
            )
        )
