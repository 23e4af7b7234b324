"""power_of_two: two distinct seeded random instances, the one with fewer requests wins."""

from __future__ import annotations

from collections import Counter

import pytest

from router.policy.interfaces import InstanceView
from router.policy.power_of_two import PowerOfTwoPolicy
from tests.routing.util import dispatch, request, snapshot, snapshot_of


def test_samples_two_distinct_instances_uniformly() -> None:
    policy = PowerOfTwoPolicy(seed=3)
    counts: Counter[int] = Counter()
    for k in range(8000):
        a, b = policy.sample(f"req-{k}", 8)
        assert a != b and 0 <= a < 8 and 0 <= b < 8
        counts.update((a, b))
    for index in range(8):
        assert counts[index] / 16000 == pytest.approx(1 / 8, rel=0.1)
    assert policy.sample("x", 1) == (0, 0)


def test_the_lighter_of_the_pair_wins_and_a_tie_goes_to_the_first() -> None:
    policy = PowerOfTwoPolicy(seed=0)
    snap = snapshot_of([InstanceView("a", num_running=9), InstanceView("b"), InstanceView("c")])
    for k in range(50):
        decision = policy.route(request(f"r{k}", [1]), snap, 0)
        first, second = decision.candidates
        assert first != second and decision.reason == "power_of_two"
        if "a" in decision.candidates:
            assert decision.instance_id != "a"  # 9 running: always the heavier
        else:
            assert decision.instance_id == first  # b and c both idle: a tie


def test_own_in_flight_requests_count_as_load() -> None:
    policy = PowerOfTwoPolicy(seed=1)
    snap = snapshot(2)
    chosen = [dispatch(policy, request(f"r{k}", [1]), snap).instance_id for k in range(10)]
    assert Counter(chosen) == {"i00": 5, "i01": 5}  # each dispatch tips the balance


def test_same_seed_same_choices_other_seed_other_pairs() -> None:
    snap = snapshot(16)
    runs = []
    for seed in (5, 5, 6):
        policy = PowerOfTwoPolicy(seed=seed)
        runs.append([policy.route(request(f"r{k}", [1]), snap, 0).candidates for k in range(50)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
