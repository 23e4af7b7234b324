"""ApproxRadixTree: multi-tenant prefix matching, recency, sizes and LRU eviction."""

from __future__ import annotations

import numpy as np

from router.policy.radix_tree import ApproxRadixTree


def _t(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def test_longest_prefix_and_most_recent_tenant() -> None:
    tree = ApproxRadixTree()
    tree.insert(_t(1, 2, 3, 4, 5), "a", now=1.0)
    tree.insert(_t(1, 2, 3, 9, 9), "b", now=2.0)  # splits the edge after 1, 2, 3
    assert tree.prefix_match(_t(1, 2, 3, 4, 5, 6)) == (5, "a")
    assert tree.prefix_match(_t(1, 2, 3, 9)) == (4, "b")
    assert tree.prefix_match(_t(1, 2, 3, 7)) == (3, "b")  # shared node: b was there last
    tree.insert(_t(1, 2), "a", now=3.0)
    assert tree.prefix_match(_t(1, 2, 3, 7)) == (3, "b")  # a touched only 1, 2
    assert tree.prefix_match(_t(1, 2, 7)) == (2, "a")
    assert tree.prefix_match(_t(8)) == (0, None)
    assert tree.size("a") == 5 and tree.size("b") == 5


def test_match_only_counts_accepted_tenants() -> None:
    tree = ApproxRadixTree()
    tree.insert(_t(1, 2, 3, 4), "a", now=1.0)
    tree.insert(_t(1, 2), "b", now=2.0)
    assert tree.prefix_match(_t(1, 2, 3, 4), accept=lambda t: t != "a") == (2, "b")
    assert tree.prefix_match(_t(1, 2, 3, 4), accept=lambda t: False) == (0, None)


def test_eviction_drops_least_recently_used_leaves_first() -> None:
    tree = ApproxRadixTree()
    tree.insert(_t(1, 2, 3, 4), "a", now=1.0)
    tree.insert(_t(1, 2, 7, 8), "a", now=2.0)
    tree.insert(_t(5, 6), "b", now=3.0)
    assert tree.size("a") == 6
    changed = tree.evict_tenant_by_size(lambda tenant: 4)
    assert changed == ["a"]
    assert tree.size("a") == 4 and tree.size("b") == 2
    assert tree.prefix_match(_t(1, 2, 3, 4)) == (2, "a")  # the older branch went
    assert tree.prefix_match(_t(1, 2, 7, 8)) == (4, "a")
    tree.evict_tenant_by_size(lambda tenant: 0)
    assert tree.size("a") == 0 and tree.prefix_match(_t(1, 2)) == (0, None)
    assert tree.prefix_match(_t(5, 6)) == (0, None)


def test_remove_tenant_keeps_the_others() -> None:
    tree = ApproxRadixTree()
    tree.insert(_t(1, 2, 3), "a", now=1.0)
    tree.insert(_t(1, 2, 3), "b", now=2.0)
    tree.remove_tenant("b")
    assert tree.prefix_match(_t(1, 2, 3)) == (3, "a")
    assert tree.size("b") == 0 and tree.tenants() == ["a"]
