"""Weighted consistent-hash rings with virtual nodes, built only from membership.

A ring is the sorted set of points ``(xxh64(f"{member}#{i}", seed), member)`` for
``i < vnodes(member)``, with ``vnodes = max(1, round(vnodes_per_weight * weight))``. It depends
on nothing but ``(seed, members, weights)``: two gateway replicas that read the same ring
epoch from Redis build identical rings, and a ring updated incrementally equals one built
from scratch for the same members. A key belongs to the owner of the first point at or after
its position (wrapping around).

``update`` is incremental: points of departed members are dropped, points of new members
are computed (160 xxh64 calls each) and merged in. A join or leave therefore moves only the
keys on the arcs that member gains or loses, ~``1/N`` of all keys.

Lookups are O(1) on average and compiled (``_fastpath.RingIndex``, built by ``update``): a
bucket index over the top bits of the positions (about one point per bucket) and, per
point, the next point clockwise with a different owner, so the second distinct member
(DualMap's ring B when it gives ``c1``) costs one more read instead of a walk. Members are
numbered by *slot* (their rank in sorted order, ``names``); ``lookup.first(position,
eligible_mask, exclude_slot)`` answers in slots, with eligibility as a byte per slot
(``eligibility_mask``), so a decision touches no Python object per point.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Container, Iterator, Mapping

from router.policy.fastpath import RingIndex
from router.policy.hashing import ring_point_hash


class HashRing:
    """One consistent-hash ring (see the module docstring)."""

    def __init__(self, seed: int, vnodes_per_weight: int = 160) -> None:
        if vnodes_per_weight <= 0:
            raise ValueError("vnodes_per_weight must be positive")
        self.seed = seed
        self.vnodes_per_weight = vnodes_per_weight
        self.members: dict[str, float] = {}
        # Points sorted by (position, member), as compact arrays: at 1,024 instances the
        # ring has 164k points, and lists of Python ints would scatter them over ~7 MB.
        self._positions = array("Q")
        self._owner_slots = array("i")  # index into names
        self.names: list[str] = []  # members by slot (sorted)
        self.lookup = RingIndex(self._positions, self._owner_slots)

    def __len__(self) -> int:
        """Number of points (virtual nodes) on the ring."""
        return len(self._positions)

    def vnodes(self, weight: float) -> int:
        return max(1, round(self.vnodes_per_weight * weight))

    def _points(self, member: str, weight: float) -> list[tuple[int, str]]:
        return [(ring_point_hash(member, i, self.seed), member) for i in range(self.vnodes(weight))]

    def update(self, members: Mapping[str, float]) -> bool:
        """Make the ring hold exactly ``members`` (id -> weight); True if anything changed.

        A member whose weight changed is re-placed (its old points go, its new ones come).
        """
        removed = {m for m, w in self.members.items() if members.get(m) != w}
        added = {m: w for m, w in members.items() if self.members.get(m) != w}
        if not removed and not added:
            return False
        names = self.names
        kept = [
            (pos, names[slot])
            for pos, slot in zip(self._positions, self._owner_slots, strict=True)
            if names[slot] not in removed
        ]
        new_points: list[tuple[int, str]] = []
        for member in sorted(added):
            new_points.extend(self._points(member, added[member]))
        new_points.sort()
        merged = sorted(kept + new_points)  # two sorted runs: Timsort merges them in O(n)
        self.names = sorted(members)
        slot_of = {name: slot for slot, name in enumerate(self.names)}
        self._positions = array("Q", [pos for pos, _ in merged])
        self._owner_slots = array("i", [slot_of[owner] for _, owner in merged])
        self.members = dict(members)
        self.lookup = RingIndex(self._positions, self._owner_slots)
        return True

    def eligibility_mask(self, eligible: Container[str]) -> bytes:
        """One byte per slot, 1 where the member is in ``eligible`` (for ``lookup.first``)."""
        return bytes(name in eligible for name in self.names)

    def owner(self, position: int) -> str:
        """The member owning ``position`` (the first point clockwise from it)."""
        count = len(self._positions)
        if not count:
            raise LookupError("empty ring")
        return self.names[self._owner_slots[self.lookup.index(position) % count]]

    def walk(self, position: int) -> Iterator[str]:
        """Distinct members clockwise from ``position``, each once, nearest first."""
        count = len(self._positions)
        if not count:
            return
        start = self.lookup.index(position)
        names, slots = self.names, self._owner_slots
        seen: set[str] = set()
        total = len(self.members)
        for step in range(count):
            owner = names[slots[(start + step) % count]]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == total:
                    return

    def first(
        self, position: int, accept: Callable[[str], bool], exclude: str | None = None
    ) -> str | None:
        """First member clockwise from ``position`` that ``accept``s and is not ``exclude``
        (the general form, by walking; the routing path uses ``lookup.first``)."""
        for owner in self.walk(position):
            if owner != exclude and accept(owner):
                return owner
        return None


def members_from(membership: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """Ring membership from (id, weight) pairs; members with weight <= 0 get no points."""
    return {member: weight for member, weight in membership if weight > 0}
