"""Base of policies that estimate cached prefixes and predict TTFT per instance.

Adds to ``TrackedPolicy``: a ``PrefixCacheView`` (approximate from routed prompts, precise
from KV events once they flow) and a ``PrefillTimeModel`` learned from first tokens, with
each instance's learned seconds per token mirrored in an array aligned with the board so a
fleet-wide "lowest predicted TTFT" is one vectorised arg-min.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from proto.defaults import DEFAULT_CACHE_CAPACITY_TOKENS, DEFAULT_PREFILL_S_PER_TOKEN
from proto.kv_events import KVEvent
from router.policy.base import PreparedPrompt, TrackedPolicy
from router.policy.cache_view import PrefixCacheView
from router.policy.hashing import PrefixHashes
from router.policy.interfaces import Decision, RoutingRequest
from router.policy.load_board import FloatArray
from router.policy.predictor import PrefillTimeModel


class CacheTrackingPolicy(TrackedPolicy):
    """Cache view + learned prefill speed (see the module docstring).

    * the cache view's capacity per instance follows its reported KV size
      (``total_blocks * block_size``), ``cache_capacity_tokens`` until one is reported;
    * ``uncached_tokens`` (what dispatch books as prefill work) subtracts the estimated
      cached prefix on the chosen instance;
    * ``on_first_token`` teaches the model ``ttft ≈ fixed + s × (queued ahead + own
      uncached)``, using the engine's cached-token count when the caller has it.
    """

    def __init__(
        self,
        cache_block_size: int = 16,
        cache_capacity_tokens: int = DEFAULT_CACHE_CAPACITY_TOKENS,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        learning_decay: float = 0.95,
    ) -> None:
        super().__init__()
        self.cache = PrefixCacheView(cache_block_size, cache_capacity_tokens)
        self.predictor = PrefillTimeModel(prefill_s_per_token, learning_decay)
        # The model's parameters per instance, aligned with the board (see ``on_rebuild``).
        self.seconds_per_token: FloatArray = np.zeros(0)
        self.fixed_seconds: FloatArray = np.zeros(0)
        # KV capacity in tokens per instance as last given to the cache view, and the
        # board's membership version it and the model's arrays are aligned with.
        self._capacity: FloatArray = np.zeros(0)
        self._membership_version = -1

    def on_rebuild(self) -> None:
        board = self.board
        capacity = board.capacity_tokens
        same_members = board.membership_version == self._membership_version
        # A load report for the same fleet: only KV sizes that changed (usually none).
        changed = (np.flatnonzero(capacity != self._capacity).tolist() if same_members
                   else range(len(board.ids)))
        for i in changed:
            if capacity[i] > 0:
                self.cache.set_capacity(board.ids[i], int(capacity[i]))
        self._capacity = capacity
        if same_members:
            return
        self._membership_version = board.membership_version
        for instance_id in board.ids:
            self.cache.ensure(instance_id)  # every view exists, so tables by slot are stable
        present = set(board.ids)
        for instance_id in self.cache.instance_ids():
            if instance_id not in present:  # left the fleet: its cache is gone with it
                self.cache.remove_instance(instance_id)
                self.predictor.forget(instance_id)
        params = [self.predictor.params(i) for i in board.ids]
        self.fixed_seconds = np.array([fixed for fixed, _ in params], dtype=np.float64)
        self.seconds_per_token = np.array([slope for _, slope in params], dtype=np.float64)

    # ---- estimates ---------------------------------------------------------------------

    def prefix_hashes(self, prepared: PreparedPrompt) -> PrefixHashes:
        hashes = prepared.prefix_hashes
        if hashes is None:
            hashes = prepared.prefix_hashes = self.cache.hasher.hashes(prepared.tokens)
        return hashes

    def cached_tokens(self, prepared: PreparedPrompt, instance_id: str) -> int:
        """Estimated cached prompt tokens on ``instance_id`` (never the whole prompt: the
        engine recomputes at least the last token)."""
        cached = self.cache.cached_blocks(instance_id, self.prefix_hashes(prepared))
        return min(cached * self.cache.block_size, max(0, prepared.num_tokens - 1))

    def predicted_ttft(self, instance_id: str, own_tokens: float) -> float:
        """Predicted TTFT of ``own_tokens`` uncached tokens sent to ``instance_id`` now."""
        board = self.board
        i = board.index[instance_id]
        # .item() keeps the arithmetic on Python floats (numpy scalars are slower here).
        return self.fixed_seconds.item(i) + (
            board.prefill_tokens.item(i) + own_tokens) * self.seconds_per_token.item(i)

    def predicted_ttfts(self, own_tokens: float) -> FloatArray:
        """``predicted_ttft`` of every instance on the board at once."""
        return self.fixed_seconds + (self.board.prefill_tokens + own_tokens) * (
            self.seconds_per_token)

    def uncached_tokens(self, prepared: PreparedPrompt, decision: Decision) -> int:
        instance_id = decision.instance_id
        hashes = self.prefix_hashes(prepared)
        blocks = self.cache.cached_blocks(instance_id, hashes)
        return prepared.num_tokens - min(blocks * self.cache.block_size,
                                         max(0, prepared.num_tokens - 1))

    # ---- feedback ----------------------------------------------------------------------

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        self.cache.record_prompt(decision.instance_id, self.prefix_hashes(prepared))

    def on_first_token(
        self, request_id: str, instance_id: str, ttft_s: float, cached_tokens: int | None,
        now: float,
    ) -> None:
        entry = self.board.tracker.get(request_id)
        if entry is not None and entry.instance_id == instance_id and entry.prefilling:
            own = entry.uncached_tokens
            if cached_tokens is not None:
                own = max(0, entry.prompt_tokens - cached_tokens)
            if self.predictor.observe(instance_id, entry.queued_ahead_tokens + own, ttft_s):
                i = self.board.index.get(instance_id)
                if i is not None:
                    fixed, slope = self.predictor.params(instance_id)
                    self.fixed_seconds[i] = fixed
                    self.seconds_per_token[i] = slope
        super().on_first_token(request_id, instance_id, ttft_s, cached_tokens, now)

    def apply_kv_events(self, instance_id: str, events: Iterable[KVEvent]) -> None:
        """Feed an instance's KV events; its cache view becomes precise (``PrefixCacheView``)."""
        self.cache.apply_kv_events(instance_id, events)
