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

Lookups are O(1) on average: ``update`` also builds a bucket index over the top bits of the
positions (about one point per bucket), so finding a key's owner is one table read and a
bisect over the few points of one bucket, and, per point, the next point clockwise with a
different owner, so the second distinct member (DualMap's ring B when it gives ``c1``) costs
one more read instead of a walk.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from router.policy.hashing import ring_point_hash


class HashRing:
    """One consistent-hash ring (see the module docstring)."""

    def __init__(self, seed: int, vnodes_per_weight: int = 160) -> None:
        if vnodes_per_weight <= 0:
            raise ValueError("vnodes_per_weight must be positive")
        self.seed = seed
        self.vnodes_per_weight = vnodes_per_weight
        self.members: dict[str, float] = {}
        # Points sorted by (position, member). Compact arrays rather than lists of Python
        # ints: bisecting 164k points at 1,024 instances then touches 1.3 MB, not ~7 MB of
        # scattered int objects, which matters on a decision path that just streamed a prompt.
        self._positions = array("Q")
        self._owner_slots = array("I")  # index into _names
        self._names: list[str] = []
        # Lookup index (``_build_index``): positions in bucket ``b = position >> _shift`` are
        # points ``_bucket_start[b]`` .. ``_bucket_start[b + 1] - 1``; ``_owners[i]`` is the
        # owner of point ``i`` (index ``len`` wraps to point 0); ``_next_distinct[i]`` the
        # first point clockwise after ``i`` owned by another member (``i`` if none).
        self._shift = 64
        self._bucket_start = array("I", [0, 0])
        self._owners: list[str] = []
        self._next_distinct = array("I")

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
        names = self._names
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
        self._names = sorted(members)
        slot_of = {name: slot for slot, name in enumerate(self._names)}
        self._positions = array("Q", [pos for pos, _ in merged])
        self._owner_slots = array("I", [slot_of[owner] for _, owner in merged])
        self.members = dict(members)
        self._build_index()
        return True

    def _build_index(self) -> None:
        count = len(self._positions)
        if not count:
            self._shift, self._bucket_start = 64, array("I", [0, 0])
            self._owners, self._next_distinct = [], array("I")
            return
        bits = count.bit_length()  # 2^bits > count buckets: at most ~1 point per bucket
        self._shift = 64 - bits
        positions = np.frombuffer(self._positions, dtype=np.uint64)
        bucket_floors = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self._shift)
        starts = np.searchsorted(positions, bucket_floors, side="left")
        self._bucket_start = array("I", starts.astype(np.uint32).tobytes())
        self._bucket_start.append(count)
        names = self._names
        self._owners = [names[slot] for slot in self._owner_slots]
        self._owners.append(self._owners[0])
        slots = np.frombuffer(self._owner_slots, dtype=np.uint32)
        run_ends = np.flatnonzero(slots != np.roll(slots, -1))  # owner changes after these
        if not len(run_ends):  # one member
            following = np.arange(count, dtype=np.uint32)
        else:
            which = np.searchsorted(run_ends, np.arange(count), side="left") % len(run_ends)
            following = ((run_ends[which] + 1) % count).astype(np.uint32)
        self._next_distinct = array("I", following.tobytes())

    def _index(self, position: int) -> int:
        """Index of the first point at or after ``position`` (``len(self)`` past the last)."""
        bucket = position >> self._shift
        starts = self._bucket_start
        lo = starts[bucket]
        hi = starts[bucket + 1]
        return lo if lo == hi else bisect_left(self._positions, position, lo, hi)

    def owner(self, position: int) -> str:
        """The member owning ``position`` (the first point clockwise from it)."""
        if not self._positions:
            raise LookupError("empty ring")
        return self._owners[self._index(position)]

    def walk(self, position: int) -> Iterator[str]:
        """Distinct members clockwise from ``position``, each once, nearest first."""
        count = len(self._positions)
        if not count:
            return
        start = self._index(position)
        owners = self._owners
        seen: set[str] = set()
        total = len(self.members)
        for step in range(count):
            owner = owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == total:
                    return

    def first(
        self, position: int, accept: Callable[[str], bool], exclude: str | None = None
    ) -> str | None:
        """First member clockwise from ``position`` that ``accept``s and is not ``exclude``."""
        positions = self._positions
        if positions:  # common cases first: the owner, or the next distinct member
            # ``_index`` inlined: this runs twice per DualMap decision.
            bucket = position >> self._shift
            lo = self._bucket_start[bucket]
            hi = self._bucket_start[bucket + 1]
            index = lo if lo == hi else bisect_left(positions, position, lo, hi)
            owner = self._owners[index]
            if owner != exclude:
                if accept(owner):
                    return owner
            else:
                owner = self._owners[self._next_distinct[index % len(positions)]]
                if owner != exclude and accept(owner):
                    return owner
        for owner in self.walk(position):
            if owner != exclude and accept(owner):
                return owner
        return None


def members_from(membership: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """Ring membership from (id, weight) pairs; members with weight <= 0 get no points."""
    return {member: weight for member, weight in membership if weight > 0}
