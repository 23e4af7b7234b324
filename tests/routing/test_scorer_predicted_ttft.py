"""PredictedTTFTScorer: lower predicted TTFT (queue + uncached, learned speed) scores higher."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.interfaces import Decision
from router.policy.scorers.predicted_ttft import PredictedTTFTScorer
from tests.routing.util import SCORER_VIEWS, request, scorer_state, tokens


def test_predicted_ttft_scorer_counts_queue_and_cache() -> None:
    rng = np.random.default_rng(1)
    policy = scorer_state()
    prompt = tokens(rng, 2000)
    policy.on_dispatched(request("s", prompt), Decision("a", "x"), 0)
    # Its first token after (3000 queued + 2000 own) tokens at 1e-4 s: no new speed learned.
    policy.on_first_token("s", "a", 0.5, None, 0)
    # Predicted: a 3000 queued + 1 own (all but the last token cached), b 1000 + 2000,
    # c 0 + 2000: c best, then b, a worst.
    scores = PredictedTTFTScorer(policy).score(request("r", prompt), list(SCORER_VIEWS), 0)
    assert scores["a"] == 0.0
    assert scores["b"] == pytest.approx(1 - 3000 / 3001)
    assert scores["c"] == pytest.approx(1 - 2000 / 3001)
