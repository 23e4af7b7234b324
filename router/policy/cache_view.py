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
from router.policy.fastpath import LastHolderIndex, PrefixLru
from router.policy.hashing import HashArray, PrefixHasher, PrefixHashes

# LastHolderIndex (the continuity candidate's index) is a routing kernel: compiled, with its
# readable twin in fastpath_py. Re-exported here beside the cache views it hints at.
__all__ = ["LastHolderIndex", "PrefixCacheView"]

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
