"""HashRing: weighted virtual nodes, deterministic, incremental, minimal key movement."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.policy.rings import HashRing

_RNG = random.Random(7)
KEYS = [_RNG.getrandbits(64) for _ in range(20_000)]


def _members(n: int) -> dict[str, float]:
    return {f"node-{k}": 1.0 for k in range(n)}


def _owners(ring: HashRing) -> list[str]:
    return [ring.owner(key) for key in KEYS]


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("n", [8, 16, 32])
def test_join_and_leave_move_at_most_1_3_over_n_of_the_keys(seed: int, n: int) -> None:
    ring = HashRing(seed)
    ring.update(_members(n))
    before = _owners(ring)
    ring.update(_members(n + 1))  # node-n joins
    joined = _owners(ring)
    moved = [k for k, (a, b) in enumerate(zip(before, joined, strict=True)) if a != b]
    assert len(moved) / len(KEYS) <= 1.3 / (n + 1)
    assert all(joined[k] == f"node-{n}" for k in moved)  # keys only move to the newcomer
    ring.update({m: w for m, w in _members(n + 1).items() if m != "node-3"})
    left = _owners(ring)
    moved = [k for k, (a, b) in enumerate(zip(joined, left, strict=True)) if a != b]
    assert len(moved) / len(KEYS) <= 1.3 / (n + 1)
    assert all(joined[k] == "node-3" for k in moved)  # only the leaver's keys move


def test_incremental_updates_equal_a_fresh_build() -> None:
    ring = HashRing(5)
    ring.update(_members(10))
    ring.update({**_members(12), "node-4": 2.0})
    ring.update({m: w for m, w in {**_members(12), "node-4": 2.0}.items() if m != "node-7"})
    fresh = HashRing(5)
    fresh.update({m: w for m, w in {**_members(12), "node-4": 2.0}.items() if m != "node-7"})
    assert _owners(ring) == _owners(fresh)
    assert len(ring) == len(fresh) == 160 * 12


def test_update_reports_whether_anything_changed() -> None:
    ring = HashRing(1)
    assert ring.update(_members(3)) is True
    assert ring.update(_members(3)) is False


def test_keys_spread_in_proportion_to_weight() -> None:
    ring = HashRing(3)
    ring.update({"big": 3.0, **_members(6)})
    counts = Counter(_owners(ring))
    share_big = counts["big"] / len(KEYS)
    assert 3 / 9 * 0.8 < share_big < 3 / 9 * 1.2
    assert len(ring) == 160 * 9


def test_two_seeds_make_independent_rings() -> None:
    a, b = HashRing(1), HashRing(2)
    a.update(_members(16))
    b.update(_members(16))
    same = sum(x == y for x, y in zip(_owners(a), _owners(b), strict=True))
    assert same / len(KEYS) < 2.0 / 16  # independent: ~1/16 agree by chance


def test_walk_and_first_skip_unacceptable_and_excluded_members() -> None:
    ring = HashRing(9)
    ring.update(_members(5))
    key = KEYS[0]
    order = list(ring.walk(key))
    assert sorted(order) == sorted(_members(5)) and order[0] == ring.owner(key)
    assert ring.first(key, lambda m: True) == order[0]
    assert ring.first(key, lambda m: True, exclude=order[0]) == order[1]
    assert ring.first(key, lambda m: m not in order[:3]) == order[3]
    assert ring.first(key, lambda m: False) is None


def test_empty_ring() -> None:
    ring = HashRing(1)
    with pytest.raises(LookupError):
        ring.owner(5)
    assert ring.first(5, lambda m: True) is None


@pytest.mark.parametrize("members", [{"solo": 1.0}, {"a": 0.01, "b": 0.02}, _members(7),
                                     {**_members(40), "big": 2.5}])
def test_indexed_lookups_equal_a_plain_bisect_and_walk(members: dict[str, float]) -> None:
    import bisect

    ring = HashRing(21, vnodes_per_weight=160)
    ring.update(members)
    positions = list(ring._positions)
    owners = [ring.names[slot] for slot in ring._owner_slots]
    slot_of = {name: slot for slot, name in enumerate(ring.names)}
    rng = random.Random(len(members))
    edge = [0, 1, (1 << 64) - 1, positions[0], positions[-1], positions[-1] + 1,
            *(p + d for p in positions[:50] for d in (-1, 0, 1))]
    for key in KEYS[:300] + [k for k in edge if 0 <= k < 1 << 64]:
        index = bisect.bisect_left(positions, key)
        assert ring.owner(key) == owners[index % len(owners)]
        order: list[str] = []
        for step in range(len(owners)):
            owner = owners[(index + step) % len(owners)]
            if owner not in order:
                order.append(owner)
                if len(order) == len(members):
                    break
        assert list(ring.walk(key)) == order
        assert ring.first(key, lambda m: True) == order[0]
        expected = order[1] if len(order) > 1 else None
        assert ring.first(key, lambda m: True, exclude=order[0]) == expected
        assert ring.first(key, order[0].__ne__) == expected
        # The compiled lookup, in slots: every member eligible, one excluded, and a random
        # eligible subset, against the first acceptable member of the plain walk.
        everyone = ring.eligibility_mask(set(members))
        assert ring.lookup.first(key, everyone) == slot_of[order[0]]
        assert ring.lookup.first(key, everyone, slot_of[order[0]]) == (
            -1 if expected is None else slot_of[expected])
        some = {m for m in members if rng.random() < 0.3}
        excluded = rng.choice(order)
        wanted = next((m for m in order if m in some and m != excluded), None)
        assert ring.lookup.first(key, ring.eligibility_mask(some), slot_of[excluded]) == (
            -1 if wanted is None else slot_of[wanted])
    # Next distinct owner of every point, against a plain scan.
    for point in range(len(owners)):
        step = 1
        while step < len(owners) and owners[(point + step) % len(owners)] == owners[point]:
            step += 1
        expected_point = point if step == len(owners) else (point + step) % len(owners)
        assert ring.lookup.next_distinct(point) == expected_point
