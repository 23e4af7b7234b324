"""Spatial LAPS (``laps-spatial``): a pool of instances for long prefills, the rest short.

Requests are queued and released as in temporal LAPS (``LapsAdmission``); in addition the
fleet is split into a *long pool* and a *short pool*, so short prompts never queue behind a
long prefill on the same instance. The split follows each class's load: an exponentially
weighted sum of uncached prefill tokens submitted per class gives the long class's share of
the work, and the long pool holds that share of the routable instances (at least one in
each pool, one instance moved at a time and only once the share is 3/4 of an instance past
the current split, so pools do not flap). Pools are fixed slices of the routable ids in
sorted order (long pool first), so a change moves a single instance.

Routing within a pool: ``restrict(snapshot, klass)`` returns the snapshot with the other
pool's instances marked draining; any policy routed on it draws its candidates there (for
DualMap the rings skip draining owners clockwise, so a key keeps the same home in its
pool). ``router.admission.decide.route`` does the two-step decision (see there).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from router.admission.interfaces import LONG, SHORT
from router.admission.laps import LapsAdmission
from router.policy.filters.healthy import is_routable
from router.policy.interfaces import ClusterSnapshot


class SpatialLapsAdmission(LapsAdmission):
    """LAPS queues plus adaptive short/long instance pools."""

    mode = "laps-spatial"

    def __init__(self, *, work_decay: float = 0.995, initial_long_share: float = 0.25,
                 **laps: Any) -> None:
        super().__init__(**laps)
        if not 0.0 < work_decay < 1.0:
            raise ValueError("work_decay must be in (0, 1)")
        if not 0.0 < initial_long_share < 1.0:
            raise ValueError("initial_long_share must be in (0, 1)")
        self.work_decay = work_decay
        self.work: dict[str, float] = {SHORT: 1.0 - initial_long_share,
                                       LONG: initial_long_share}
        self.n_long: int | None = None  # set at the first restrict (fleet size known)
        self.pool_changes = 0
        self._cache: tuple[ClusterSnapshot, int, str, ClusterSnapshot | None] | None = None

    @property
    def long_share(self) -> float:
        total = self.work[SHORT] + self.work[LONG]
        return self.work[LONG] / total if total > 0 else 0.0

    def on_submitted(self, klass: str, uncached_tokens: int) -> None:
        decay = self.work_decay
        self.work[SHORT] *= decay
        self.work[LONG] *= decay
        self.work[klass] += uncached_tokens * (1.0 - decay)

    def _split(self, routable: int) -> int:
        """Instances in the long pool for a fleet of ``routable`` (updates ``n_long``)."""
        if routable < 2:
            return routable
        target = self.long_share * routable
        n = self.n_long if self.n_long is not None else round(target)
        if target > n + 0.75:
            n += 1
        elif target < n - 0.75:
            n -= 1
        n = min(routable - 1, max(1, n))
        if self.n_long is not None and n != self.n_long:
            self.pool_changes += 1
        self.n_long = n
        return n

    def pools(self, snapshot: ClusterSnapshot) -> dict[str, frozenset[str]]:
        """The routable instances of each class's pool in ``snapshot``."""
        ids = [v.instance_id for v in snapshot.instances if is_routable(v)]
        n_long = self._split(len(ids))
        if len(ids) < 2:
            return {SHORT: frozenset(ids), LONG: frozenset(ids)}
        return {LONG: frozenset(ids[:n_long]), SHORT: frozenset(ids[n_long:])}

    def restrict(self, snapshot: ClusterSnapshot, klass: str) -> ClusterSnapshot | None:
        pool = self.pools(snapshot)[klass]
        cached = self._cache  # the object itself, not its id: ids are reused after GC
        if (cached is not None and cached[0] is snapshot and cached[1] == len(pool)
                and cached[2] == klass):
            return cached[3]
        views = snapshot.instances
        if all(v.instance_id in pool or not is_routable(v) for v in views):
            restricted: ClusterSnapshot | None = None
        else:
            restricted = ClusterSnapshot(snapshot.epoch, tuple(
                v if v.instance_id in pool or not is_routable(v) else replace(v, draining=True)
                for v in views))
        self._cache = (snapshot, len(pool), klass, restricted)
        return restricted

    def counters(self) -> dict[str, Any]:
        out = super().counters()
        out.update({"long_pool": self.n_long, "long_share": round(self.long_share, 4),
                    "pool_changes": self.pool_changes})
        return out
