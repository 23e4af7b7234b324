"""DualMap: two hash rings for cache affinity, an SLO switch for load.

For each request (see ``docs/routing.md``):

1. **Key** - the first ``key_blocks`` blocks of ``key_block_size`` tokens of the prompt (one
   16-token cache block), lengthened one ``hot_step`` (16 tokens) past the split of hot
   prefixes (``keys.PrefixKeyBuilder``): short, so a conversation's key is the same at every
   turn, and long only where traffic needs it to tell conversations apart.
2. **Candidates** - ``c1`` = owner of the key on ring A, ``c2`` = owner on ring B (rings with
   different seeds, 160 virtual nodes per unit weight). Unroutable owners are skipped for the
   next routable member clockwise, and if ring B gives ``c1`` it walks on to the next
   distinct member. Every conversation thus has two homes, chosen independently. With
   ``continuity`` (default), also the instance, if any, that holds a longer cached prefix of
   the prompt than either home: the last holder of its longest routed prefix
   (``LastHolderIndex``, a routing kernel), checked in that instance's cache view
   (``fastpath_py.locate`` states the rule; the compiled ``locate`` applies it). A conversation
   whose turn was moved off its homes by load (or whose key or homes changed) thus finds the
   replica that served its previous turn.
3. **Affinity pick** - the candidate with the larger estimated cached prefix
   (``cache_view``); on a tie the lower predicted TTFT; then ``c1``. A cached prefix counts
   only if it covers the prompt's key: a shorter one is shared with other conversations
   (a system prompt), and counting it would let the first instances that received it win
   every new conversation while the rest of the fleet stays cold. The continuity candidate
   holds more than both homes, so it is the pick when there is one (reason ``continuity``).
4. **SLO switch** - predicted TTFT = (uncached tokens queued ahead + own uncached tokens) ×
   seconds per token, plus a fixed part, both learned per instance from observed TTFTs
   (``predictor``). If the
   affinity pick's prediction exceeds ``slo_factor × slo_ttft_s`` (half the SLO, as in the
   paper), the other candidate is taken if its prediction is within that bound
   (``slo_fallback``); if both are over, the instance with the lowest predicted TTFT in the
   whole fleet is taken (``load``): all instances ranked as if nothing were cached, the few
   fastest then re-estimated with their cache views. With a continuity candidate, the
   homes are tried in their pick order before the fleet.
   ``dualmap_no_slo`` skips this step.

Decision reasons: ``affinity`` (a home), ``continuity`` (the continuity candidate),
``slo_fallback``, ``load``; ``holder_unroutable`` / ``holder_evicted`` instead of
``affinity`` when the conversation's previous replica, off the homes, could not be taken (it
left the routable set; its cache no longer holds the prefix); ``plan_rebalance`` returns
moves with reason ``rebalance``.
``key_blocks=2, key_block_size=512, max_key_blocks=16, hot_step=128, continuity=False``
gives the decisions of the policy before follow-up affinity (docs/routing.md).

Cost per decision: two compiled calls, ``locate`` (the prompt's prefix hashes, its key, two
ring lookups, the homes' cache searches and the continuity candidate: usually one index
probe) and ``affinity_pick`` (the estimates and the pick); the SLO switch and the rare
both-over-SLO case (one numpy arg-min over all instances) run in Python (docs/routing.md,
"Decision cost").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from proto.defaults import (
    DEFAULT_CACHE_CAPACITY_TOKENS,
    DEFAULT_PREFILL_S_PER_TOKEN,
    DEFAULT_SLO_TTFT_S,
)
from router.policy.base import PreparedPrompt
from router.policy.cache_tracking import CacheTrackingPolicy
from router.policy.fastpath import LastHolderIndex, affinity_pick
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest
from router.policy.keys import PrefixKeyBuilder
from router.policy.rebalance import Move, QueuedRequest, plan_rebalance
from router.policy.ring_keys import RING_SEEDS, KeyedRings

if TYPE_CHECKING:
    from router.policy.fastpath import Continuity


class DualMapPolicy(CacheTrackingPolicy):
    """DualMap routing (see the module docstring); ``slo_aware=False`` is ``dualmap_no_slo``."""

    name = "dualmap"

    def __init__(
        self,
        slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
        slo_factor: float = 0.5,
        slo_aware: bool = True,
        key_blocks: int = 1,
        key_block_size: int = 16,
        max_key_blocks: int = 512,
        adaptive_key: bool = True,
        hot_step: int = 16,
        hot_share: float | None = None,
        hot_window: int = 2048,
        hot_min_count: int = 16,
        vnodes_per_weight: int = 160,
        cache_block_size: int = 16,
        cache_capacity_tokens: int = DEFAULT_CACHE_CAPACITY_TOKENS,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        learning_decay: float = 0.95,
        rebalance_max_wait_s: float = 3.0,
        rebalance_ttft_factor: float = 2.0,
        fallback_probes: int = 4,
        load_switch_margin: float = 0.2,
        continuity: bool = True,
        continuity_index_size: int = 1 << 18,
    ) -> None:
        if slo_ttft_s <= 0 or slo_factor <= 0:
            raise ValueError("slo_ttft_s and slo_factor must be positive")
        super().__init__(cache_block_size, cache_capacity_tokens, prefill_s_per_token,
                         learning_decay)
        self.slo_ttft_s = slo_ttft_s
        self.slo_factor = slo_factor
        self.slo_aware = slo_aware
        self.rebalance_max_wait_s = rebalance_max_wait_s
        # Hotspot when the predicted TTFT of a request queued last exceeds this x the SLO.
        # 2, not the paper's 1: near capacity every instance's predicted TTFT nears the SLO,
        # and at 1x the moves ping-pong and cost cache (docs/admission.md, "Rebalancing
        # trigger": attainment 0.86 with ~1,270 moves vs 0.95-0.96 with 2-3 at 2x).
        self.rebalance_ttft_factor = rebalance_ttft_factor
        self.fallback_probes = max(1, fallback_probes)
        if not 0.0 <= load_switch_margin < 1.0:
            raise ValueError("load_switch_margin must be in [0, 1)")
        self.load_switch_margin = load_switch_margin
        self.hot_step = hot_step
        if not slo_aware:
            self.name = "dualmap_no_slo"
        keys = PrefixKeyBuilder(
            key_blocks=key_blocks, block_size=key_block_size, max_key_blocks=max_key_blocks,
            adaptive=adaptive_key, hot_step=hot_step, hot_share=hot_share, hot_window=hot_window,
            hot_min_count=hot_min_count, hash_block_size=cache_block_size,
        )
        self.rings = KeyedRings(RING_SEEDS, vnodes_per_weight, keys)
        assert keys.hasher.block_size == self.cache.block_size  # locate's hashes serve both
        self.continuity = continuity
        self.last_holder = LastHolderIndex(continuity_index_size)
        self._memoise_snapshot_state()

    def _memoise_snapshot_state(self) -> None:
        """What every decision hands the compiled calls and changes only with the snapshot
        (``on_rebuild``), looked up once: ``locate``'s continuity context (the index, the
        cache views, the routable ids) and the arrays the affinity pick reads (learned
        fixed part, queued prefill, learned seconds per token) as memoryviews, whose buffer
        a compiled call reads ~3x faster than a numpy array's. The arrays are replaced only
        on a rebuild and changed in place otherwise, which the views show."""
        self._continuity_context: Continuity | None = (
            (self.last_holder, self.cache.held, self.board.eligible_set) if self.continuity
            else None)
        self._estimate_arrays = (self.fixed_seconds.data, self.board.prefill_tokens.data,
                                 self.seconds_per_token.data)

    @property
    def slo_bound_s(self) -> float:
        """Predicted TTFT above which the affinity pick is abandoned."""
        return self.slo_factor * self.slo_ttft_s

    def on_rebuild(self) -> None:
        super().on_rebuild()
        self.rings.sync(self.board, self.cache.held)
        self._memoise_snapshot_state()

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        board = self.board
        if snapshot is not board.snapshot or not board.eligible_ids:
            self.sync(snapshot)
        prepared = self.prepare(request)
        # (c1 on ring A, c2 on ring B, c2 != c1), their cached prefixes and the continuity
        # candidate (fastpath_py.locate states its rule), in one compiled call.
        homes, cached_blocks, candidate = self.rings.locate(prepared, self._continuity_context)
        if not homes:  # routable instances exist but none is on the rings (weight 0)
            return self._lowest_ttft(prepared, homes, [])
        # Per candidate, c1 first: (cached tokens, predicted TTFT), and the affinity pick:
        # the larger cached prefix, ties to the lower TTFT, then c1. A cached prefix counts
        # only if it covers the prompt's key: a shorter one is shared with other
        # conversations (a system prompt), and letting it count, in the cache comparison or
        # in the TTFT tie-break, makes the first instances that happened to receive it win
        # every new conversation while the others stay cold. Compiled (the hot path):
        # _fastpath.affinity_pick states the arithmetic, == predicted_ttft per home.
        cover = prepared.key.length  # type: ignore[union-attr]  # locate set the key
        if isinstance(candidate, tuple):
            return self._pick_with_holder(prepared, homes, cached_blocks, cover, candidate)
        best, estimates = affinity_pick(
            homes, cached_blocks, board.index, *self._estimate_arrays, self.cache.block_size,
            prepared.num_tokens, cover)
        # The previous turn's replica, and why it is not taken, if locate found one.
        reason = "affinity" if candidate is None else candidate
        cached, ttft = estimates[best]
        if not self.slo_aware or ttft <= self.slo_bound_s:
            return Decision(homes[best], reason, homes, ttft, cached)
        if len(homes) == 2:
            other_cached, other_ttft = estimates[1 - best]
            if other_ttft <= self.slo_bound_s:
                return Decision(homes[1 - best], "slo_fallback", homes, other_ttft, other_cached)
        return self._lowest_ttft(prepared, homes, estimates)

    def _pick_with_holder(
        self, prepared: PreparedPrompt, homes: tuple[str, ...], cached_blocks: tuple[int, ...],
        cover: int, holder: tuple[str, int],
    ) -> Decision:
        """The affinity rule and the SLO switch over the homes and the continuity candidate
        (``holder``: its id and cached blocks, last): the largest cached prefix that covers
        the key, ties to the lower predicted TTFT, then ring order. The holder's prefix is
        longer than either home's and covers the key (locate checked), so it is the
        affinity pick (reason ``continuity``); past the SLO bound, the best home within it
        in the homes' own pick order (``slo_fallback``), else the fleet's fastest
        (``load``)."""
        holder_id, holder_blocks = holder
        candidates = (*homes, holder_id)
        block_size, num_tokens = self.cache.block_size, prepared.num_tokens
        best, estimates = affinity_pick(
            candidates, (*cached_blocks, holder_blocks), self.board.index,
            *self._estimate_arrays, block_size, num_tokens, cover)
        assert best == len(homes)  # the holder: more cached than any home, covering the key
        holder_cached, holder_ttft = estimates[best]
        if not self.slo_aware or holder_ttft <= self.slo_bound_s:
            return Decision(holder_id, "continuity", candidates, holder_ttft, holder_cached)
        # The homes, in the affinity pick's order: their own pick first.
        home_best, _ = affinity_pick(homes, cached_blocks, self.board.index,
                                     *self._estimate_arrays, block_size, num_tokens, cover)
        for i in (home_best, 1 - home_best) if len(homes) == 2 else (home_best,):
            cached, ttft = estimates[i]
            if ttft <= self.slo_bound_s:
                return Decision(homes[i], "slo_fallback", candidates, ttft, cached)
        return self._lowest_ttft(prepared, candidates, estimates)

    def _lowest_ttft(
        self,
        prepared: PreparedPrompt,
        homes: tuple[str, ...],
        estimates: Sequence[tuple[int, float]],
    ) -> Decision:
        """The fleet-wide lowest predicted TTFT.

        All instances are ranked as if nothing were cached (one vectorised pass); the
        ``fallback_probes`` fastest are then re-estimated with their cache views, since
        earlier fallbacks may have left this prompt's prefix on them, and compared with
        the candidates' own estimates.
        """
        board = self.board
        num_tokens = prepared.num_tokens
        best: tuple[float, int, str] | None = None
        for instance_id, (home_cached, home_ttft) in zip(homes, estimates, strict=True):
            if best is None or home_ttft < best[0]:
                best = (home_ttft, home_cached, instance_id)
        # Leave the homes only for a clearly faster instance: when no instance can meet the
        # bound (a prompt whose uncached part alone takes longer), chasing small differences
        # in learned per-instance speed scatters the conversation's prefix over the fleet and
        # costs every later turn its cache hits (seen on the 910B4 profile: hit rate 0.37 ->
        # 0.16 without this margin).
        switch_below = (best[0] * (1.0 - self.load_switch_margin) if best is not None
                        else float("inf"))
        ranked = board.smallest_eligible(self.predicted_ttfts(num_tokens), self.fallback_probes)
        for i in ranked:
            instance_id = board.ids[i]
            if instance_id in homes:
                continue
            cached = self.cached_tokens(prepared, instance_id)
            ttft = self.predicted_ttft(instance_id, num_tokens - cached)
            if ttft < switch_below:  # below the margin, and below every probe so far
                best = (ttft, cached, instance_id)
                switch_below = ttft
        assert best is not None  # ranked is never empty: sync() checked for eligibility
        ttft, cached, choice = best
        return Decision(choice, "load", homes, ttft, cached)

    def hot_key_table(self) -> dict[int, int]:
        """The hot prefixes this replica's traffic found (prefix hash -> split), for the
        fleet-wide table the control loop merges."""
        return self.rings.keys.local_table()

    def adopt_hot_key_table(self, table: dict[int, int]) -> None:
        """Key prompts by the fleet-wide hot-key table, so every gateway replica sends a
        conversation to the same homes whatever traffic it saw itself."""
        self.rings.adopt_hot_keys(table)

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        super().after_dispatch(request, prepared, decision, now)
        self.rings.record(prepared)
        if self.continuity:
            self.last_holder.record(
                self.prefix_hashes(prepared), decision.instance_id,
                decision.cached_tokens_estimate // self.cache.block_size)

    def plan_rebalance(
        self, queued: Sequence[QueuedRequest], snapshot: ClusterSnapshot, now: float
    ) -> list[Move]:
        """Moves of router-queued requests off hotspots (``rebalance.plan_rebalance``) using
        this policy's cache view and learned TTFT model; changes no state. The board already
        counts the queued requests (they were ``on_dispatched`` when queued), so a target's
        prediction is its board load plus the planned change."""
        self.sync(snapshot)

        def own_tokens(q: QueuedRequest, instance_id: str) -> int:
            if instance_id == q.instance_id:
                # What the board counts for it there: the cache view already holds its
                # prompt (recorded when it was queued), which it has not computed yet.
                entry = self.board.tracker.get(q.request.request_id)
                if entry is not None and entry.instance_id == instance_id:
                    return entry.uncached_tokens
            prepared = self.prepare(q.request)
            return prepared.num_tokens - self.cached_tokens(prepared, instance_id)

        return plan_rebalance(
            queued, self.board.eligible_ids, self.predicted_ttft, own_tokens,
            slo_ttft_s=self.rebalance_ttft_factor * self.slo_ttft_s, now=now,
            max_wait_s=self.rebalance_max_wait_s,
        )
