"""Least loaded: the routable instance with the fewest pending tokens."""

from __future__ import annotations

from router.policy.base import TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest


class LeastLoadedPolicy(TrackedPolicy):
    """Picks the routable instance with the fewest pending tokens (ties: lowest id).

    Pending tokens = uncached prompt tokens not yet prefilled (engine report combined with
    this router's in-flight view) + the output budget of this router's unfinished requests
    there (``LoadBoard.pending_tokens``). One vectorised arg-min: O(N) in numpy.
    """

    name = "least_loaded"

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        board = self.board
        i = board.argmin_eligible(board.pending_tokens())
        return Decision(board.ids[i], "least_loaded")
