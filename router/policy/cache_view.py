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
dictionary probes per instance on top of hashing the prompt once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np

from instances.engine.types import KVEvent
from router.policy.hashing import HashArray, PrefixHasher


class _InstanceCache:
    """One instance's cached prefix hashes (approximate LRU or precise event-fed set)."""

    __slots__ = ("capacity_blocks", "engine_to_prefix", "lru", "precise", "refs", "unplaced",
                 "version")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.version = 0  # PrefixCacheView._changes at this cache's last change
        self.precise = False
        self.lru: OrderedDict[int, None] = OrderedDict()
        # Precise mode: engine block hash -> (router prefix hash, depth in blocks), and how
        # many engine blocks map to each router prefix hash.
        self.engine_to_prefix: dict[int, tuple[int, int]] = {}
        self.refs: dict[int, int] = {}
        self.unplaced = 0  # BlockStored events whose parent block was never seen

    def __len__(self) -> int:
        return len(self.refs) if self.precise else len(self.lru)


class PrefixCacheView:
    """Per-instance cached-prefix estimates (see the module docstring).

    ``block_size`` must equal the engines' KV block size when KV events are used.
    ``default_capacity_tokens`` bounds an instance's approximate view until
    ``set_capacity`` tells its real KV capacity.
    """

    def __init__(self, block_size: int = 16, default_capacity_tokens: int = 440_000) -> None:
        self.hasher = PrefixHasher(block_size)
        self.block_size = block_size
        self.default_capacity_blocks = max(1, default_capacity_tokens // block_size)
        self._caches: dict[str, _InstanceCache] = {}
        self._changes = 0  # counts changes to any instance's view (``version``)

    def _cache(self, instance_id: str) -> _InstanceCache:
        """``instance_id``'s cache, created if needed; callers are about to change it."""
        cache = self._caches.get(instance_id)
        if cache is None:
            cache = self._caches[instance_id] = _InstanceCache(self.default_capacity_blocks)
        self._changes += 1
        cache.version = self._changes
        return cache

    def version(self, instance_id: str) -> int:
        """Changes whenever ``instance_id``'s view may have changed (0: no view yet); equal
        versions mean ``cached_blocks`` answers are still valid."""
        cache = self._caches.get(instance_id)
        return 0 if cache is None else cache.version

    def prefix_hashes(self, tokens: np.ndarray) -> HashArray:
        return self.hasher.hashes(tokens)

    # ---- queries -----------------------------------------------------------------------

    def cached_blocks(self, instance_id: str, prefix_hashes: HashArray, hint: int = 0) -> int:
        """Leading blocks of the prompt with ``prefix_hashes`` cached on ``instance_id``.

        ``hint``, a likely answer (e.g. the other candidate's), is probed first with the
        block after it: right, the search takes 3 probes instead of ~log2(blocks); wrong, it
        costs at most 2 more. The answer does not depend on it while the view is closed
        under prefixes (always for the approximate view).
        """
        cache = self._caches.get(instance_id)
        hi = len(prefix_hashes)
        if cache is None or not hi:
            return 0
        held = cache.refs if cache.precise else cache.lru
        item = prefix_hashes.item
        if item(0) not in held:  # the common cold case: one probe
            return 0
        lo = 1  # invariant: prefix lo is cached, prefix hi + 1 is not
        if 1 < hint < hi:
            if item(hint - 1) not in held:
                hi = hint - 1
            elif item(hint) not in held:
                return hint
            else:
                lo = hint + 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if item(mid - 1) in held:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def cached_tokens(self, instance_id: str, prefix_hashes: HashArray) -> int:
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
        self._evict(cache)

    def record_prompt(
        self, instance_id: str, prefix_hashes: HashArray, cached_blocks: int | None = None
    ) -> None:
        """A prompt with ``prefix_hashes`` was routed to ``instance_id`` (approximate view).

        ``cached_blocks``: ``self.cached_blocks(instance_id, prefix_hashes)`` if the caller
        has it for the view as it is now (same ``version``); computed otherwise.
        """
        num_blocks = len(prefix_hashes)
        if not num_blocks or self.is_precise(instance_id):
            return
        if cached_blocks is None:
            cached_blocks = self.cached_blocks(instance_id, prefix_hashes)
        cache = self._cache(instance_id)
        lru = cache.lru
        # Tail first: the prompt's first block ends up most recently used, so eviction
        # takes deep blocks before the shared head, like the engine's free queue.
        # The view is closed under prefixes (a block is touched after every deeper block of
        # the same prompt, so it is evicted after them), so blocks [0, cached_blocks) are
        # in it and none deeper: append the new tail (no membership test per block), then
        # move the head to the end as one C-level map (a Python loop testing and touching
        # each of 512 blocks cost ~100 µs). OrderedDict.update(dict.fromkeys(...)) measured
        # slower than the plain insertion loop.
        if cached_blocks < num_blocks:
            for prefix_hash in prefix_hashes[cached_blocks:][::-1].tolist():
                lru[prefix_hash] = None
        if cached_blocks:
            head = prefix_hashes[:cached_blocks][::-1].tolist()
            try:
                deque(map(lru.move_to_end, head), maxlen=0)
            except KeyError:  # not closed after all (a 64-bit hash collision): one by one
                for prefix_hash in head:
                    if prefix_hash in lru:
                        lru.move_to_end(prefix_hash)
                    else:
                        lru[prefix_hash] = None
        self._evict(cache)

    @staticmethod
    def _evict(cache: _InstanceCache) -> None:
        lru = cache.lru
        while len(lru) > cache.capacity_blocks:
            lru.popitem(last=False)

    def remove_instance(self, instance_id: str) -> None:
        self._caches.pop(instance_id, None)

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
            cache.lru.clear()
        for event in events:
            if event.kind == "BlockStored":
                self._store(cache, event)
            elif event.kind == "BlockRemoved":
                for engine_hash in event.block_hashes:
                    self._remove(cache, engine_hash)
            elif event.kind == "AllBlocksCleared":
                cache.engine_to_prefix.clear()
                cache.refs.clear()

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
            cache.refs[prefix_hash] = cache.refs.get(prefix_hash, 0) + 1

    @staticmethod
    def _remove(cache: _InstanceCache, engine_hash: int) -> None:
        entry = cache.engine_to_prefix.pop(engine_hash, None)
        if entry is None:
            return
        prefix_hash = entry[0]
        count = cache.refs[prefix_hash] - 1
        if count:
            cache.refs[prefix_hash] = count
        else:
            del cache.refs[prefix_hash]
