"""Per-instance load as numpy arrays aligned with the current snapshot.

Every load-based choice (least loaded, SGLang's balance check, Llumnix freeness, DualMap's
global fallback) is an arg-min or arg-max over all instances. At 1,024 instances a Python
loop over ``InstanceView`` objects costs hundreds of microseconds per decision; over arrays
it costs a few. The board keeps those arrays:

* rebuilt (O(N)) when a *different* snapshot arrives: a new load report, a membership
  change. A snapshot rebuilt from the very same ``InstanceView`` objects (the gateway
  re-wraps its snapshot per request) is adopted without a rebuild;
* patched (O(1)) for one instance on each dispatch / first token / finish, so the router's
  own in-flight view is always current between reports.

How the report and the router's own view combine: at a rebuild the board takes
``others = max(0, reported - own_now)`` as the work the report shows that this router did
not send (other gateway replicas, or requests the tracker already forgot), and from then on
serves ``own_now + others``. With one gateway ``others`` is ~0 and the board follows the
tracker exactly; with several, each sees the others' work as of the last report.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from router.policy.filters.healthy import is_routable
from router.policy.inflight import InflightRequest, InflightTracker
from router.policy.interfaces import ClusterSnapshot, InstanceView

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class LoadBoard:
    """Combined (reported + own in-flight) load per instance of the current snapshot.

    Arrays are indexed like ``ids`` (the snapshot's order, sorted by instance id):

    * ``requests``: requests on the instance (running + waiting);
    * ``prefill_tokens``: uncached prompt tokens not yet prefilled;
    * ``decode_tokens``: output budget of this router's unfinished requests there;
    * ``free_blocks`` / ``block_size`` / ``capacity_tokens`` (KV tokens): from the last
      report;
    * ``eligible``: healthy and not draining.
    """

    def __init__(self, tracker: InflightTracker | None = None) -> None:
        self.tracker = tracker if tracker is not None else InflightTracker()
        self.snapshot: ClusterSnapshot | None = None
        self.generation = 0  # bumps on every rebuild
        self.ids: list[str] = []
        self._weights: list[float] = []
        self._routable: list[bool] = []
        # Bump when the instances or their weights change / when which of them are routable
        # may have changed; not on a mere load report.
        self.membership_version = 0
        self.eligibility_version = 0
        self.views: tuple[InstanceView, ...] = ()
        self.index: dict[str, int] = {}
        self.eligible_ids: list[str] = []
        self.eligible_set: frozenset[str] = frozenset()  # eligible_ids as a set
        empty = np.zeros(0)
        self.eligible: BoolArray = np.zeros(0, dtype=bool)
        self._eligible_index: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)
        self.requests: FloatArray = empty
        self.prefill_tokens: FloatArray = empty
        self.decode_tokens: FloatArray = empty
        self.free_blocks: FloatArray = empty
        self.block_size: FloatArray = empty
        self.capacity_tokens: FloatArray = empty
        self._others_requests: FloatArray = empty
        self._others_prefill: FloatArray = empty

    # ---- snapshot --------------------------------------------------------------------------

    def sync(self, snapshot: ClusterSnapshot) -> bool:
        """Adopt ``snapshot``; True if the arrays were rebuilt (views changed)."""
        if snapshot is self.snapshot:
            return False
        views = snapshot.instances
        old = self.views
        if len(views) == len(old) and all(a is b for a, b in zip(views, old, strict=True)):
            self.snapshot = snapshot
            return False
        self._rebuild(snapshot)
        return True

    def _rebuild(self, snapshot: ClusterSnapshot) -> None:
        views = snapshot.instances
        self.snapshot = snapshot
        self.views = views
        self.generation += 1
        ids = [v.instance_id for v in views]
        weights = [v.weight for v in views]
        same_members = ids == self.ids and weights == self._weights
        routable = [is_routable(v) for v in views]
        if not same_members or routable != self._routable:
            self.index = {instance_id: i for i, instance_id in enumerate(ids)}
            self.eligible = np.array(routable, dtype=bool)
            self._eligible_index = np.flatnonzero(self.eligible)
            self.eligible_ids = [i for i, ok in zip(ids, routable, strict=True) if ok]
            self.eligible_set = frozenset(self.eligible_ids)
            self._routable = routable
            self.eligibility_version += 1
        if same_members:
            # The arrays hold own + others for these very instances (``_refresh`` keeps them
            # so), which gives the tracker's own load without asking it per instance: a
            # load report for an unchanged fleet is then a few vector operations.
            own_requests = self.requests - self._others_requests
            own_prefill = self.prefill_tokens - self._others_prefill
        else:
            self.ids, self._weights = ids, weights
            self.membership_version += 1
            own = [self.tracker.load(i) for i in ids]
            own_requests = np.array([o.requests for o in own], dtype=np.float64)
            own_prefill = np.array([o.prefill_tokens for o in own], dtype=np.float64)
            self.decode_tokens = np.array([o.decode_tokens for o in own], dtype=np.float64)
        reports = np.array(
            [(v.num_running + v.num_waiting, v.waiting_prefill_tokens, v.free_blocks,
              v.block_size, v.total_blocks) for v in views],
            dtype=np.float64,
        ).reshape(len(views), 5)
        self._others_requests = np.maximum(reports[:, 0] - own_requests, 0.0)
        self._others_prefill = np.maximum(reports[:, 1] - own_prefill, 0.0)
        self.requests = own_requests + self._others_requests
        self.prefill_tokens = own_prefill + self._others_prefill
        self.free_blocks = reports[:, 2].copy()
        self.block_size = np.maximum(reports[:, 3], 1.0)
        self.capacity_tokens = reports[:, 3] * reports[:, 4]

    def membership(self) -> tuple[tuple[str, float], ...]:
        """(instance id, weight) of every instance in the snapshot, routable or not."""
        return tuple((v.instance_id, v.weight) for v in self.views)

    def view(self, instance_id: str) -> InstanceView | None:
        i = self.index.get(instance_id)
        return None if i is None else self.views[i]

    def is_eligible(self, instance_id: str) -> bool:
        return instance_id in self.eligible_set

    # ---- feedback (keeps the tracker and the arrays in step) --------------------------------

    def dispatched(
        self,
        request_id: str,
        instance_id: str,
        *,
        prompt_tokens: int,
        uncached_tokens: int,
        max_tokens: int,
        now: float,
    ) -> InflightRequest:
        """Record a dispatch; the work queued ahead of it is the board's combined count."""
        previous = self.tracker.get(request_id)
        i = self.index.get(instance_id)
        queued_ahead = None if i is None else int(self.prefill_tokens[i])
        entry = self.tracker.on_dispatched(
            request_id, instance_id, prompt_tokens=prompt_tokens,
            uncached_tokens=uncached_tokens, max_tokens=max_tokens, now=now,
            queued_ahead_tokens=queued_ahead,
        )
        if previous is not None and previous.instance_id != instance_id:
            self._refresh(previous.instance_id)
        self._refresh(instance_id)
        return entry

    def first_token(self, request_id: str) -> InflightRequest | None:
        entry = self.tracker.on_first_token(request_id)
        if entry is not None:
            self._refresh(entry.instance_id)
        return entry

    def finished(self, request_id: str) -> InflightRequest | None:
        entry = self.tracker.on_finished(request_id)
        if entry is not None:
            self._refresh(entry.instance_id)
        return entry

    def _refresh(self, instance_id: str) -> None:
        i = self.index.get(instance_id)
        if i is None:
            return
        own = self.tracker.load(instance_id)
        self.requests[i] = own.requests + self._others_requests[i]
        self.prefill_tokens[i] = own.prefill_tokens + self._others_prefill[i]
        self.decode_tokens[i] = own.decode_tokens

    # ---- selections ------------------------------------------------------------------------

    def argmin_eligible(self, values: FloatArray) -> int:
        """Index of the eligible instance with the smallest value (ties: lowest id).

        Raises ``ValueError`` if no instance is eligible.
        """
        if not self.eligible_ids:
            raise ValueError("no eligible instance")
        candidates = self._eligible_index
        return int(candidates[values[candidates].argmin()])

    def smallest_eligible(self, values: FloatArray, count: int) -> list[int]:
        """Indices of the ``count`` eligible instances with the smallest values, ascending
        (ties: lowest id)."""
        candidates = self._eligible_index
        chosen = values[candidates]
        if count < len(candidates):
            part = np.argpartition(chosen, count - 1)[:count]
            candidates, chosen = candidates[part], chosen[part]
        order = np.lexsort((candidates, chosen))
        return [int(i) for i in candidates[order]]

    def argmax_eligible(self, values: FloatArray) -> int:
        """Index of the eligible instance with the largest value (ties: lowest id)."""
        if not self.eligible_ids:
            raise ValueError("no eligible instance")
        candidates = self._eligible_index
        return int(candidates[values[candidates].argmax()])

    def pending_tokens(self) -> FloatArray:
        """Least-loaded's load: uncached prefill not yet done plus decode budget in flight."""
        return self.prefill_tokens + self.decode_tokens

    def freeness(self) -> FloatArray:
        """Llumnix's freeness: free KV blocks left after the waiting prefill, per request.

        ``(free_blocks - ceil(prefill_tokens / block_size)) / requests``; an instance with no
        request is infinitely free.
        """
        available = self.free_blocks - np.ceil(self.prefill_tokens / self.block_size)
        with np.errstate(divide="ignore", invalid="ignore"):
            free = available / self.requests
        return np.where(self.requests > 0, free, math.inf)
