"""QueueDepthScorer: fewer requests in flight scores higher."""

from __future__ import annotations

from router.policy.scorers.queue_depth import QueueDepthScorer
from tests.routing.util import SCORER_VIEWS, request, scorer_state


def test_queue_depth_scorer() -> None:
    scores = QueueDepthScorer(scorer_state()).score(request("r", [1]), list(SCORER_VIEWS), 0)
    assert scores == {"a": 0.0, "b": 0.75, "c": 1.0}
