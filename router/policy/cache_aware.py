"""SGLang router's ``cache_aware`` policy: prefix affinity on an approximate radix tree,
shortest queue when the load is imbalanced.

The rule, per request (sgl-router ``policies/cache_aware.rs``, defaults of its
``CacheAwareConfig``):

1. load = requests in flight per instance (this router's own count combined with the last
   report). The fleet is *imbalanced* if ``max - min > balance_abs_threshold`` (32) **and**
   ``max > balance_rel_threshold * min`` (1.1); then the least loaded instance gets the request
   (reason ``imbalance``).
2. Otherwise the approximate radix tree gives the instance that routed the longest prefix of
   the prompt. If the matched share ``matched / prompt tokens`` exceeds ``cache_threshold``
   (0.5), that instance gets it (``cache_hit``); else the instance with the smallest tree gets
   it (``cache_miss``): it has the most room for new cache.
3. The prompt is inserted into the tree under the chosen instance (also on imbalance), and
   every ``eviction_interval_s`` (30 s, of the clock passed in) tenants over their size limit
   lose their least recently used leaves.

Deviations, and why: the tree holds token ids instead of characters (the byte-level
tokenizer makes them the same here); matching only considers routable instances (SGLang
falls back to the first healthy worker when the matched one is down); ``max_tree_size``
defaults to each instance's KV capacity in tokens instead of SGLang's fixed node count, so
the tree forgets what the engine's cache would have forgotten.
"""

from __future__ import annotations

import numpy as np

from proto.defaults import DEFAULT_CACHE_CAPACITY_TOKENS
from router.policy.base import PreparedPrompt, TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest
from router.policy.load_board import FloatArray
from router.policy.radix_tree import ApproxRadixTree


class CacheAwarePolicy(TrackedPolicy):
    """SGLang's cache-aware load balancing (see the module docstring)."""

    name = "cache_aware"

    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.1,
        eviction_interval_s: float = 30.0,
        max_tree_size: int | None = None,
        default_capacity_tokens: int = DEFAULT_CACHE_CAPACITY_TOKENS,
    ) -> None:
        super().__init__()
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_size = max_tree_size
        self.default_capacity_tokens = default_capacity_tokens
        self.tree = ApproxRadixTree()
        self.tree_sizes: FloatArray = np.zeros(0)  # tokens per instance, aligned with board
        self._last_eviction: float | None = None

    def on_rebuild(self) -> None:
        self.tree_sizes = np.array([self.tree.size(i) for i in self.board.ids], np.float64)

    def size_limit(self, instance_id: str) -> int:
        if self.max_tree_size is not None:
            return self.max_tree_size
        view = self.board.view(instance_id)
        if view is not None and view.total_blocks > 0:
            return view.total_blocks * view.block_size
        return self.default_capacity_tokens

    def is_imbalanced(self) -> bool:
        loads = self.board.requests[self.board.eligible]
        high, low = float(loads.max()), float(loads.min())
        return high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        board = self.board
        if self.is_imbalanced():
            i = board.argmin_eligible(board.requests)
            return Decision(board.ids[i], "imbalance")
        prepared = self.prepare(request)
        matched, tenant = self.tree.prefix_match(prepared.tokens, board.is_eligible)
        num_tokens = prepared.num_tokens
        if tenant is not None and num_tokens and matched / num_tokens > self.cache_threshold:
            return Decision(tenant, "cache_hit", cached_tokens_estimate=matched)
        i = board.argmin_eligible(self.tree_sizes)
        return Decision(board.ids[i], "cache_miss")

    def uncached_tokens(self, prepared: PreparedPrompt, decision: Decision) -> int:
        return prepared.num_tokens - decision.cached_tokens_estimate

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        tree = self.tree
        tree.insert(prepared.tokens, decision.instance_id, now)
        changed = [decision.instance_id]
        if self._last_eviction is None:
            self._last_eviction = now
        elif now - self._last_eviction >= self.eviction_interval_s:
            self._last_eviction = now
            changed.extend(tree.evict_tenant_by_size(self.size_limit))
        index = self.board.index
        for instance_id in changed:
            i = index.get(instance_id)
            if i is not None:
                self.tree_sizes[i] = tree.size(instance_id)
