"""PrefixCacheScorer: the cached share of the prompt, from the cache view."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.interfaces import Decision
from router.policy.scorers.prefix_cache import PrefixCacheScorer
from tests.routing.util import SCORER_VIEWS, request, scorer_state, tokens


def test_prefix_cache_scorer_is_the_cached_share_of_the_prompt() -> None:
    rng = np.random.default_rng(0)
    policy = scorer_state()
    prompt = tokens(rng, 1600)
    policy.on_dispatched(request("s", prompt[:800]), Decision("b", "x"), 0)
    scores = PrefixCacheScorer(policy).score(request("r", prompt), list(SCORER_VIEWS), 0)
    assert scores == {"a": 0.0, "b": pytest.approx(0.5), "c": 0.0}
