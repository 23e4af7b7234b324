"""PendingTokensScorer: fewer pending prefill + decode tokens scores higher."""

from __future__ import annotations

import pytest

from router.policy.scorers.pending_tokens import PendingTokensScorer
from tests.routing.util import SCORER_VIEWS, request, scorer_state


def test_pending_tokens_scorer() -> None:
    scores = PendingTokensScorer(scorer_state()).score(request("r", [1]), list(SCORER_VIEWS), 0)
    assert scores == {"a": 0.0, "b": pytest.approx(2 / 3), "c": 1.0}
