"""KVFreeScorer: the free share of the KV cache; and the shared normalisation."""

from __future__ import annotations

from router.policy.scorers import lower_is_better
from router.policy.scorers.kv_free import KVFreeScorer
from tests.routing.util import SCORER_VIEWS, request


def test_lower_is_better() -> None:
    assert lower_is_better({"a": 4.0, "b": 1.0, "c": 0.0}) == {"a": 0.0, "b": 0.75, "c": 1.0}
    assert lower_is_better({"a": 0.0}) == {"a": 1.0}
    assert lower_is_better({}) == {}


def test_kv_free_scorer() -> None:
    scores = KVFreeScorer().score(request("r", [1]), list(SCORER_VIEWS), 0)
    assert scores == {"a": 0.25, "b": 0.75, "c": 1.0}
