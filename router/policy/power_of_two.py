"""Power of two choices (Ray Serve's default request router): two random, take the lighter."""

from __future__ import annotations

import xxhash

from router.policy.base import TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest


class PowerOfTwoPolicy(TrackedPolicy):
    """Samples two distinct routable instances and sends to the one with fewer requests.

    As Ray Serve's ``PowerOfTwoChoicesRequestRouter``: the load compared is the number of
    ongoing requests (here the engine report combined with this router's in-flight view);
    a tie goes to the first one sampled. The draw is seeded and pure: both indices come from
    xxh64(request_id, seed), so the same request routed twice against the same state draws
    the same pair and two runs with the same seed make the same choices.
    """

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def sample(self, request_id: str, count: int) -> tuple[int, int]:
        """Two distinct indices in ``range(count)`` (the same twice if ``count == 1``)."""
        draw = xxhash.xxh64_intdigest(request_id.encode(), self.seed)
        first = draw % count
        if count == 1:
            return first, first
        second = (draw >> 32) % (count - 1)
        if second >= first:
            second += 1
        return first, second

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        board = self.board
        ids = board.eligible_ids
        first, second = self.sample(request.request_id, len(ids))
        a, b = ids[first], ids[second]
        load_a = board.requests[board.index[a]]
        load_b = board.requests[board.index[b]]
        return Decision(b if load_b < load_a else a, "power_of_two", candidates=(a, b))
