"""Llumnix dispatch: the routable instance with the highest freeness."""

from __future__ import annotations

from router.policy.base import TrackedPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest


class LlumnixPolicy(TrackedPolicy):
    """Picks the instance with the most free KV blocks per request (ties: lowest id).

    Llumnix's dispatch load ("remaining steps", its *freeness*): free KV blocks minus the
    blocks the waiting requests will take, divided by the number of requests running and
    waiting; an instance with no request is infinitely free (``LoadBoard.freeness``, with
    waiting requests and tokens including this router's in-flight ones).
    """

    name = "llumnix"

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        self.sync(snapshot)
        board = self.board
        i = board.argmax_eligible(board.freeness())
        return Decision(board.ids[i], "freeness")
