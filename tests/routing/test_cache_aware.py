"""cache_aware (SGLang): shortest queue when imbalanced, else prefix match or smallest tree."""

from __future__ import annotations

import numpy as np

from router.policy.cache_aware import CacheAwarePolicy
from router.policy.interfaces import Decision, InstanceView
from tests.routing.util import request, snapshot, snapshot_of, tokens


def _loaded(a: int, b: int, c: int = 0) -> list[InstanceView]:
    return [InstanceView("a", num_running=a), InstanceView("b", num_running=b),
            InstanceView("c", num_running=c)]


def test_balanced_high_match_goes_to_the_matching_instance() -> None:
    rng = np.random.default_rng(0)
    policy = CacheAwarePolicy()
    snap = snapshot(3)
    prompt = tokens(rng, 1000)
    policy.on_dispatched(request("seed", prompt), Decision("i01", "x"), 0.0)
    similar = np.concatenate([prompt[:700], tokens(rng, 300)])  # 70 % match > 0.5
    decision = policy.route(request("r", similar), snap, 1.0)
    assert (decision.instance_id, decision.reason) == ("i01", "cache_hit")
    assert decision.cached_tokens_estimate == 700


def test_balanced_low_match_goes_to_the_smallest_tree() -> None:
    rng = np.random.default_rng(1)
    policy = CacheAwarePolicy()
    snap = snapshot(3)
    prompt = tokens(rng, 1000)
    policy.on_dispatched(request("s1", prompt), Decision("i00", "x"), 0.0)
    policy.on_dispatched(request("s2", tokens(rng, 300)), Decision("i02", "x"), 0.0)
    policy.on_dispatched(request("s3", tokens(rng, 100)), Decision("i01", "x"), 0.0)
    policy.on_finished("s1", "i00", 0.0)
    policy.on_finished("s2", "i02", 0.0)
    policy.on_finished("s3", "i01", 0.0)
    half = np.concatenate([prompt[:500], tokens(rng, 500)])  # exactly 0.5: not > threshold
    decision = policy.route(request("r", half), snap, 1.0)
    assert (decision.instance_id, decision.reason) == ("i01", "cache_miss")


def test_imbalance_needs_both_thresholds() -> None:
    rng = np.random.default_rng(2)
    prompt = tokens(rng, 400)
    for loads, imbalanced in [
        ((40, 5), True),  # diff 35 > 32 and 40 > 5.5
        ((30, 0), False),  # diff 30 <= 32
        ((384, 350), False),  # diff 34 > 32 but 384 <= 1.1 * 350
        ((390, 350), True),  # diff 40 and 390 > 385
    ]:
        policy = CacheAwarePolicy()
        policy.on_dispatched(request("seed", prompt), Decision("a", "x"), 0.0)
        policy.on_finished("seed", "a", 0.0)
        snap = snapshot_of(_loaded(*loads, c=loads[0]))
        decision = policy.route(request("r", prompt), snap, 1.0)
        if imbalanced:
            assert (decision.instance_id, decision.reason) == ("b", "imbalance"), loads
        else:
            assert (decision.instance_id, decision.reason) == ("a", "cache_hit"), loads


def test_imbalanced_decisions_still_teach_the_tree() -> None:
    rng = np.random.default_rng(3)
    policy = CacheAwarePolicy()
    prompt = tokens(rng, 400)
    snap = snapshot_of(_loaded(50, 0, 50))
    decision = policy.route(request("r1", prompt), snap, 0.0)
    assert decision.reason == "imbalance"
    policy.on_dispatched(request("r1", prompt), decision, 0.0)
    policy.on_finished("r1", "b", 0.0)
    balanced = snapshot_of([InstanceView(name) for name in "abc"])
    later = policy.route(request("r2", prompt), balanced, 1.0)
    assert (later.instance_id, later.reason) == ("b", "cache_hit")


def test_trees_are_evicted_to_their_limit_on_the_interval() -> None:
    rng = np.random.default_rng(4)
    policy = CacheAwarePolicy(max_tree_size=500, eviction_interval_s=30.0)
    snap = snapshot(2)
    for k in range(4):
        policy.on_dispatched(request(f"r{k}", tokens(rng, 300)), Decision("i00", "x"), k)
    assert policy.tree.size("i00") == 1200  # not yet: the interval has not passed
    policy.on_dispatched(request("late", tokens(rng, 300)), Decision("i00", "x"), 31.0)
    assert policy.tree.size("i00") <= 500
    policy.route(request("q", tokens(rng, 10)), snap, 31.0)
    assert policy.tree_sizes[0] == policy.tree.size("i00")
