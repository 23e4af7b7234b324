"""MaxScorePicker: argmax of the weighted sum of scores, ties to the lowest id."""

from __future__ import annotations

import pytest

from router.policy.interfaces import InstanceView, ScoredInstances
from router.policy.pickers.max_score import MaxScorePicker
from tests.routing.util import request


def test_weighted_sum_decides() -> None:
    scored = ScoredInstances([InstanceView("a"), InstanceView("b")],
                             {"cache": {"a": 1.0, "b": 0.0}, "load": {"a": 0.0, "b": 1.0}})
    assert MaxScorePicker({"cache": 2.0, "load": 1.0}).pick(request("r", [1]), scored, 0) \
        .instance_id == "a"
    assert MaxScorePicker({"cache": 1.0, "load": 3.0}).pick(request("r", [1]), scored, 0) \
        .instance_id == "b"
    tie = MaxScorePicker().pick(request("r", [1]), scored, 0)  # weights 1 each: a tie
    assert (tie.instance_id, tie.reason) == ("a", "score")


def test_nothing_to_pick_from() -> None:
    with pytest.raises(ValueError):
        MaxScorePicker().pick(request("r", [1]), ScoredInstances([]), 0)
