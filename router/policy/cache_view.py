"""Which prompt prefixes each instance holds in its KV cache, as the router believes.

Entries are prefix-block hashes (``router.policy.hashing.PrefixHasher``): "this instance holds
the first ``k`` blocks of some prompt". An instance's view is one of:

* **approximate** (the default): fed by the prompts the router sends there. Each routed
  prompt's blocks go to the most-recently-used end of an LRU bounded by the instance's KV
  capacity in blocks, touched tail first so the prompt's head ends up most recent, and the
  LRU evicts the deepest blocks of the least recently used prefixes first, as the engine's
  free queue does (``instances/engine/block_manager.py``);
* **precise**: once ``apply_kv_events`` is called for an instance, its view is exactly the
  set of blocks its engine reported stored and not yet removed (vLLM ``BlockStored`` /
  ``BlockRemoved`` / ``AllBlocksCleared``), and routed prompts no longer change it. The
  engine's own block hashes are mapped to router prefix hashes through the ``token_ids``
  every ``BlockStored`` carries, so the router never recomputes the engine's hash chain on
  the routing path; any engine hash function works.

Matching is a binary search over the prompt's prefix hashes (cached prefixes are closed under
taking shorter prefixes in both views, up to eviction races), so it costs O(log blocks)
table probes per instance on top of hashing the prompt once. The per-instance set is a
compiled open-addressing table threaded on an LRU list (``_fastpath.PrefixLru``): a probe
touches one 16-byte slot, where a dict of Python ints missed the CPU caches twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from proto.defaults import DEFAULT_CACHE_CAPACITY_TOKENS
from proto.kv_events import KVEvent
from router.policy.fastpath import PrefixLru
from router.policy.hashing import HashArray, PrefixHasher, PrefixHashes

_UNBOUNDED = 2**62  # a precise view holds whatever its engine reports


class _InstanceCache:
    """One instance's cached prefix hashes (approximate LRU or precise event-fed set)."""

    __slots__ = ("blocks", "capacity_blocks", "engine_to_prefix", "precise", "unplaced")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.precise = False
        # The held prefix hashes: bounded LRU order in the approximate view; in the precise
        # view unbounded, each counted once per engine block that maps to it.
        self.blocks = PrefixLru(capacity_blocks)
        # Precise mode: engine block hash -> (router prefix hash, depth in blocks).
        self.engine_to_prefix: dict[int, tuple[int, int]] = {}
        self.unplaced = 0  # BlockStored events whose parent block was never seen

    def __len__(self) -> int:
        return len(self.blocks)


class PrefixCacheView:
    """Per-instance cached-prefix estimates (see the module docstring).

    ``block_size`` must equal the engines' KV block size when KV events are used.
    ``default_capacity_tokens`` bounds an instance's approximate view until
    ``set_capacity`` tells its real KV capacity.
    """

    def __init__(self, block_size: int = 16,
                 default_capacity_tokens: int = DEFAULT_CACHE_CAPACITY_TOKENS) -> None:
        self.hasher = PrefixHasher(block_size)
        self.block_size = block_size
        self.default_capacity_blocks = max(1, default_capacity_tokens // block_size)
        self._caches: dict[str, _InstanceCache] = {}
        # Each instance's held prefix hashes, for callers on the routing path that search
        # them directly (``held[id].cached_blocks(hashes, hint)`` == ``cached_blocks``).
        self.held: dict[str, PrefixLru] = {}

    def ensure(self, instance_id: str) -> None:
        """Create ``instance_id``'s (empty) view if it has none; ``held[instance_id]`` then
        stays the same object until ``remove_instance``."""
        self._cache(instance_id)

    def _cache(self, instance_id: str) -> _InstanceCache:
        """``instance_id``'s cache, created if needed."""
        cache = self._caches.get(instance_id)
        if cache is None:
            cache = self._caches[instance_id] = _InstanceCache(self.default_capacity_blocks)
            self.held[instance_id] = cache.blocks
        return cache

    def prefix_hashes(self, tokens: np.ndarray) -> HashArray:
        return self.hasher.hashes(tokens)

    # ---- queries -----------------------------------------------------------------------

    def cached_blocks(self, instance_id: str, prefix_hashes: PrefixHashes, hint: int = 0) -> int:
        """Leading blocks of the prompt with ``prefix_hashes`` cached on ``instance_id``.

        ``hint``, a likely answer (e.g. the other candidate's), is probed first with the
        block after it: right, the search takes 3 probes instead of ~log2(blocks); wrong, it
        costs at most 2 more. The answer does not depend on it while the view is closed
        under prefixes (always for the approximate view).
        """
        cache = self._caches.get(instance_id)
        return 0 if cache is None else cache.blocks.cached_blocks(prefix_hashes, hint)

    def cached_tokens(self, instance_id: str, prefix_hashes: PrefixHashes) -> int:
        return self.cached_blocks(instance_id, prefix_hashes) * self.block_size

    def num_blocks(self, instance_id: str) -> int:
        cache = self._caches.get(instance_id)
        return 0 if cache is None else len(cache)

    def is_precise(self, instance_id: str) -> bool:
        cache = self._caches.get(instance_id)
        return cache is not None and cache.precise

    def instance_ids(self) -> list[str]:
        return list(self._caches)

    # ---- updates -----------------------------------------------------------------------

    def set_capacity(self, instance_id: str, capacity_tokens: int) -> None:
        """Bound ``instance_id``'s approximate view to ``capacity_tokens`` (evicts if over)."""
        cache = self._cache(instance_id)
        cache.capacity_blocks = max(1, capacity_tokens // self.block_size)
        if not cache.precise:
            cache.blocks.capacity = cache.capacity_blocks

    def record_prompt(self, instance_id: str, prefix_hashes: PrefixHashes) -> None:
        """A prompt with ``prefix_hashes`` was routed to ``instance_id`` (approximate view).

        Tail first: the prompt's first block ends up most recently used, so eviction takes
        deep blocks before the shared head, like the engine's free queue
        (``PrefixLru.record``: one compiled probe per block, ~10 µs for 8k tokens where
        the interpreted OrderedDict version cost ~100 µs).
        """
        cache = self._cache(instance_id)
        if not cache.precise:
            cache.blocks.record(prefix_hashes)

    def remove_instance(self, instance_id: str) -> None:
        self._caches.pop(instance_id, None)
        self.held.pop(instance_id, None)

    def apply_kv_events(self, instance_id: str, events: Iterable[KVEvent]) -> None:
        """Apply an instance's KV events; its view becomes precise from now on.

        ``BlockStored`` blocks are placed after their parent block (a block whose parent this
        view never saw stored cannot be placed and is counted in ``unplaced_blocks``).
        A ``BlockStored`` without the blocks' ``token_ids`` cannot be placed either. Raises
        ``ValueError`` for a ``block_size`` other than this view's.
        """
        cache = self._cache(instance_id)
        if not cache.precise:
            cache.precise = True
            cache.blocks.clear()
            cache.blocks.capacity = _UNBOUNDED
        for event in events:
            if event.kind == "BlockStored":
                self._store(cache, event)
            elif event.kind == "BlockRemoved":
                for engine_hash in event.block_hashes:
                    self._remove(cache, engine_hash)
            elif event.kind == "AllBlocksCleared":
                cache.engine_to_prefix.clear()
                cache.blocks.clear()

    def unplaced_blocks(self, instance_id: str) -> int:
        cache = self._caches.get(instance_id)
        return 0 if cache is None else cache.unplaced

    def _store(self, cache: _InstanceCache, event: KVEvent) -> None:
        if event.block_size and event.block_size != self.block_size:
            raise ValueError(
                f"KV event block size {event.block_size} != view block size {self.block_size}"
            )
        num_blocks = len(event.block_hashes)
        parent = (0, 0) if event.parent_block_hash is None else (
            cache.engine_to_prefix.get(event.parent_block_hash))
        if parent is None or len(event.token_ids) != num_blocks * self.block_size:
            cache.unplaced += num_blocks
            return
        start_prefix, depth = parent
        tokens = np.asarray(event.token_ids, dtype="<i4")
        prefix = self.hasher.hashes(tokens, start_block=depth, start_prefix=start_prefix)
        for offset, (engine_hash, prefix_hash) in enumerate(
            zip(event.block_hashes, prefix.tolist(), strict=True)
        ):
            if engine_hash in cache.engine_to_prefix:
                continue  # already stored: a duplicate event must not double-count
            cache.engine_to_prefix[engine_hash] = (prefix_hash, depth + offset + 1)
            cache.blocks.add(prefix_hash)

    @staticmethod
    def _remove(cache: _InstanceCache, engine_hash: int) -> None:
        entry = cache.engine_to_prefix.pop(engine_hash, None)
        if entry is not None:
            cache.blocks.discard(entry[0])


class LastHolderIndex:
    """Fleet-wide: which instance a prompt through each prefix was last routed to.

    Maps prefix-block hashes to the id of the instance that last received a prompt through
    that prefix. ``record`` keeps a prompt's prefixes on a grid: every block up to
    ``dense_blocks``, then every ``grid_blocks`` blocks (16 and 64 tokens with the default
    hasher), one C-level ``dict.update``: ~8 µs for an 8k-token prompt where every block
    would cost ~4x that on each dispatch. Every recorded prompt adds all its grid prefixes,
    so the held ones are closed under taking shorter grid prefixes and ``deepest``
    binary-searches a prompt's grid prefixes for the deepest one held: the last holder of
    the longest routed prefix of the prompt, to within a grid step. For a conversation's
    next turn that is the previous turn's prompt, held by the instance that served it,
    wherever that was (a ring home, a load fallback, before its key or the ring membership
    changed). It is a hint: the caller checks that instance's own cache view, which knows
    about evictions and the exact depth. The index forgets by generations (when the newer
    of two dicts holds ``capacity / 2`` entries it becomes the older and the oldest is
    dropped), which keeps the closure: each generation is a union of whole recorded prompts.
    """

    __slots__ = ("_new", "_old", "capacity", "dense_blocks", "grid_blocks")

    def __init__(self, capacity: int = 1 << 18, grid_blocks: int = 4,
                 dense_blocks: int = 8) -> None:
        if capacity < 2 or grid_blocks < 1 or dense_blocks < 0:
            raise ValueError("need capacity >= 2, grid_blocks >= 1, dense_blocks >= 0")
        self.capacity = capacity
        self.grid_blocks = grid_blocks
        self.dense_blocks = dense_blocks
        self._new: dict[int, str] = {}
        self._old: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def blocks_at(self, point: int) -> int:
        """Prefix length in blocks of grid point ``point`` (1-based; 0 is the empty prefix)."""
        dense = self.dense_blocks
        return point if point <= dense else dense + (point - dense) * self.grid_blocks

    def points_within(self, blocks: int) -> int:
        """Grid points whose prefix has at most ``blocks`` blocks."""
        dense = self.dense_blocks
        return blocks if blocks <= dense else dense + (blocks - dense) // self.grid_blocks

    def record(self, prefix_hashes: PrefixHashes, instance_id: str, from_block: int = 0) -> None:
        """A prompt with ``prefix_hashes`` was routed to ``instance_id``; ``from_block``: its
        grid prefixes up to that many blocks are left as they are (the caller knows the
        instance already held them: a conversation's next turn on the same replica then
        costs only its new blocks)."""
        hashes = np.frombuffer(prefix_hashes, dtype="<u8")
        dense, grid = self.dense_blocks, self.grid_blocks
        first = self.blocks_at(self.points_within(from_block) + 1)  # blocks, 1-based
        if first <= dense:
            points = hashes[first - 1:dense].tolist()
            points += hashes[dense + grid - 1::grid].tolist()
        else:
            points = hashes[first - 1::grid].tolist()
        new = self._new
        new.update(dict.fromkeys(points, instance_id))
        if len(new) >= self.capacity // 2:
            self._old, self._new = new, {}

    def deepest(self, prefix_hashes: PrefixHashes, beyond: int = 0) -> tuple[str | None, int]:
        """(the last holder of the prompt's deepest held grid prefix, that prefix's length
        in blocks) if it is longer than the grid prefix of ``beyond`` blocks, else
        ``(None, 0)``. The grid prefix just past ``beyond`` is probed first: when it is not
        held (the usual case: the caller passes what it already found cached), that one
        probe is the whole search."""
        view = memoryview(prefix_hashes)  # type: ignore[arg-type]  # ndarray has the buffer protocol
        hashes = (view if view.format == "B" else view.cast("B")).cast("Q")
        new, old = self._new, self._old
        # The first probe, inline (the usual whole search): the grid prefix after ``beyond``.
        dense = self.dense_blocks
        after = (beyond + 1 if beyond < dense
                 else beyond + self.grid_blocks - (beyond - dense) % self.grid_blocks)
        if after > len(hashes):
            return None, 0
        value = hashes[after - 1]
        if value not in new and value not in old:
            return None, 0
        blocks_at = self.blocks_at
        lo, hi = self.points_within(after), self.points_within(len(hashes))
        # invariant: grid point lo is held, grid point hi + 1 is not
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            value = hashes[blocks_at(mid) - 1]
            if value in new or value in old:
                lo = mid
            else:
                hi = mid - 1
        depth = blocks_at(lo)
        value = hashes[depth - 1]
        holder = new.get(value)
        return (holder if holder is not None else old.get(value)), depth
