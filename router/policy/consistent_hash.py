"""Consistent hashing: one ring, keyed like DualMap, no load or cache awareness."""

from __future__ import annotations

from router.policy.base import PreparedPrompt, TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest
from router.policy.keys import PrefixKeyBuilder
from router.policy.ring_keys import RING_SEEDS, KeyedRings


class ConsistentHashPolicy(TrackedPolicy):
    """Sends a prompt to the owner of its key on one ring (DualMap's ring A).

    The key is DualMap's (first ``key_blocks`` blocks, adaptively lengthened for hot
    prefixes unless ``adaptive_key`` is off), so the comparison with DualMap isolates the
    second ring, the cache-aware pick and the SLO switch. An unroutable owner is skipped for
    the next routable member clockwise.
    """

    name = "consistent_hash"

    def __init__(
        self,
        key_blocks: int = 2,
        key_block_size: int = 512,
        max_key_blocks: int = 16,
        adaptive_key: bool = True,
        hot_step: int = 128,
        hot_share: float | None = None,
        hot_window: int = 2048,
        hot_min_count: int = 16,
        vnodes_per_weight: int = 160,
    ) -> None:
        super().__init__()
        keys = PrefixKeyBuilder(
            key_blocks=key_blocks, block_size=key_block_size, max_key_blocks=max_key_blocks,
            adaptive=adaptive_key, hot_step=hot_step, hot_share=hot_share, hot_window=hot_window,
            hot_min_count=hot_min_count,
        )
        self.rings = KeyedRings(RING_SEEDS[:1], vnodes_per_weight, keys)

    def on_rebuild(self) -> None:
        self.rings.sync(self.board)

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        board = self.board
        key = self.rings.key(self.prepare(request))
        homes = self.rings.homes(key.hash)
        # Routable instances exist but none is on the ring (weight 0): the first of them.
        owner = homes[0] if homes else board.eligible_ids[0]
        return Decision(owner, "hash", candidates=(owner,))

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        self.rings.record(prepared)
