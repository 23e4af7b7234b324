"""LAPS admission (temporal mode): per-instance short/long queues released as room allows.

A routed request is queued at its instance in the ``short`` or ``long`` class by its
uncached prefill tokens (``AdaptiveBoundary``). An instance *has room* while the uncached
prefill tokens released to it and not yet past their first token are below
``budget_tokens`` (an idle instance always has room, so one prompt larger than the budget
still goes). While it has room, releases go in this order:

1. a long request queued for ``long_age_s`` or more (aging: shorts cannot starve it);
2. shorts, oldest first, up to ``batch_size`` at a time, once the batch is full, or the
   oldest waited the adaptive window (``AdaptiveWindow``), or nothing is in flight there;
3. longs, oldest first, when no short is waiting.

Independently of room, any request queued ``max_wait_s`` is released (``aged``): the wait
in the router is bounded for every request, long or short. Until released, a request can be
re-decided (``move``) to another instance, keeping its place in time; after release it
cannot (``NotQueued``), so it is sent exactly once.

**Release order** (``order``). ``fifo`` is the above. ``goodput`` (SLO-aware; the default,
measured in docs/admission.md, "Goodput release order") changes two things, so that under
overload the instance spends its time on requests that can still meet the TTFT SLO instead
of releasing everything at ``max_wait_s`` in arrival order:

* before a request would be released for room, its TTFT is predicted: the time it has
  waited plus the predicted prefill on its instance if released now
  (``PrefillTimeModel``, DualMap's model ``fixed + s × (tokens ahead + own)``, learned
  here per instance from this admission's own releases: tokens ahead = uncached prefill
  released there and not yet past its first token, TTFT = release to first token). If
  that exceeds ``slo_ttft_s`` the request is *deferred*: put behind every request of the
  instance that can still make it. Deferred requests go (reason ``deferred``), oldest
  first, when the instance has spare room (below ``deferred_budget_tokens`` of prefill in
  flight, by default half the room's budget) and nothing else is waiting there. A deferred request
  stays deferred (its wait only grows) until released; a move re-queues it in its class.
* the hard bound is ``defer_max_s`` (default 10 × the SLO) instead of ``max_wait_s``: a
  request that waited ``max_wait_s`` (= the SLO) has missed it, so releasing it then
  whatever the room would only delay those still on time; but no request waits in the
  router past ``defer_max_s`` (``aged``, room or not), so deferral never starves one.
"""

from __future__ import annotations

from typing import Any

from proto.defaults import DEFAULT_SLO_TTFT_S
from router.admission.classes import AdaptiveBoundary
from router.admission.interfaces import LONG, SHORT, Admission, NotQueued, Release
from router.admission.queues import CLASSES, Entry, InstanceQueue
from router.admission.window import AdaptiveWindow
from router.policy.interfaces import Decision, RoutingRequest
from router.policy.predictor import PrefillTimeModel
from router.policy.rebalance import QueuedRequest

ORDERS = ("fifo", "goodput")

# Float slack when comparing an age with a deadline computed as enqueued_at + bound.
_EPS = 1e-9


class LapsAdmission(Admission):
    """Temporal LAPS (see the module docstring); ``laps`` on the command line."""

    mode = "laps"

    def __init__(
        self,
        *,
        budget_tokens: int = 16384,
        long_age_s: float = 1.0,
        max_wait_s: float = 3.0,
        boundary: AdaptiveBoundary | None = None,
        window: AdaptiveWindow | None = None,
        boundary_tokens: int = 256,
        short_quantile: float = 0.5,
        adaptive_boundary: bool = True,
        batch_size: int = 4,
        max_window_s: float = 0.02,
        order: str = "goodput",
        slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
        defer_max_s: float | None = None,
        deferred_budget_tokens: int | None = None,
        predictor: PrefillTimeModel | None = None,
    ) -> None:
        if budget_tokens <= 0:
            raise ValueError("budget_tokens must be positive")
        if long_age_s < 0 or max_wait_s <= 0:
            raise ValueError("long_age_s must be >= 0 and max_wait_s > 0")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if slo_ttft_s <= 0:
            raise ValueError("slo_ttft_s must be positive")
        if defer_max_s is None:
            defer_max_s = 10.0 * slo_ttft_s
        if defer_max_s <= 0:
            raise ValueError("defer_max_s must be positive")
        if deferred_budget_tokens is not None and deferred_budget_tokens <= 0:
            raise ValueError("deferred_budget_tokens must be positive")
        self.budget_tokens = budget_tokens
        self.long_age_s = long_age_s
        self.max_wait_s = max_wait_s
        self.order = order
        self.goodput = order == "goodput"
        self.slo_ttft_s = slo_ttft_s
        self.defer_max_s = defer_max_s
        # Deferred requests are released only while the prefill in flight is below this
        # (default half the room's budget: one engine iteration with the fleet's budget of
        # two). Once in the engine a deferred prompt is prefilled ahead of any on-time
        # request released after it (FCFS), so it only gets spare room: measured in
        # docs/admission.md ("Goodput release order": at 1.25x capacity 0.69 against 0.55
        # with the whole budget, 0.86 / 0.87 at 1.1x).
        self.deferred_budget_tokens = deferred_budget_tokens or max(1, budget_tokens // 2)
        # The hard bound on a request's wait in the router (released then, room or not).
        self.bound_s = defer_max_s if self.goodput else max_wait_s
        self.predictor = predictor or PrefillTimeModel()
        # Released request -> (released at, uncached tokens ahead of it there + its own).
        self._released_at: dict[str, tuple[float, int]] = {}
        self.boundary = boundary or AdaptiveBoundary(
            boundary_tokens, short_quantile=short_quantile, adaptive=adaptive_boundary)
        self.window = window or AdaptiveWindow(batch_size, max_window_s)
        self._queues: dict[str, InstanceQueue] = {}
        self._where: dict[str, str] = {}  # queued or in-flight request -> instance
        self._seq = 0
        self._now = float("-inf")
        self._deadline: float | None = None
        self._deadline_dirty = False
        # counters
        self.submitted = 0
        self.released: dict[str, int] = {"room": 0, "aged": 0, "deferred": 0}
        self.released_by_class: dict[str, int] = {SHORT: 0, LONG: 0}
        self.wait_sum: dict[str, float] = {SHORT: 0.0, LONG: 0.0}
        self.wait_max: dict[str, float] = {SHORT: 0.0, LONG: 0.0}
        self.moves: dict[str, int] = {}
        self.cancelled = 0
        self.deferrals = 0

    # ---- classification ---------------------------------------------------------------

    def classify(self, uncached_tokens: int) -> str:
        return self.boundary.classify(uncached_tokens)

    @staticmethod
    def uncached(request: RoutingRequest, decision: Decision) -> int:
        """The decision's estimate of the prompt tokens the instance will prefill."""
        return max(1, len(request.token_ids) - decision.cached_tokens_estimate)

    # ---- events -----------------------------------------------------------------------

    def _queue(self, instance_id: str) -> InstanceQueue:
        queue = self._queues.get(instance_id)
        if queue is None:
            queue = self._queues[instance_id] = InstanceQueue(instance_id)
        return queue

    def submit(self, request: RoutingRequest, decision: Decision, now: float) -> list[Release]:
        rid = request.request_id
        if rid in self._where:
            raise ValueError(f"request {rid!r} was already submitted")
        self._now = max(self._now, now)
        uncached = self.uncached(request, decision)
        klass = self.classify(uncached)
        self.boundary.observe(uncached)
        self.on_submitted(klass, uncached)
        self._seq += 1
        entry = Entry(request, decision, klass, now, uncached, self._seq)
        queue = self._queue(decision.instance_id)
        if klass == SHORT:
            self.window.observe(queue.instance_id, now)
        queue.add(entry)
        self._where[rid] = queue.instance_id
        self.submitted += 1
        self._deadline_dirty = True
        return self._drain(queue, now)

    def on_submitted(self, klass: str, uncached_tokens: int) -> None:
        """Subclass hook: a request of ``klass`` was queued (spatial mode adapts pools)."""

    def on_first_token(self, request_id: str, now: float) -> list[Release]:
        released = self._released_at.pop(request_id, None)
        instance_id = self._where.get(request_id)
        if released is not None and instance_id is not None:
            # One observation of the instance's prefill speed: TTFT since release against
            # the uncached tokens ahead of it and its own.
            released_at, tokens = released
            self.predictor.observe(instance_id, tokens, now - released_at)
        return self._prefilled(request_id, now)

    def on_finished(self, request_id: str, now: float) -> list[Release]:
        self._released_at.pop(request_id, None)
        releases = self._prefilled(request_id, now)
        instance_id = self._where.get(request_id)
        if instance_id is not None:
            queue = self._queues[instance_id]
            if queue.remove(request_id) is None:  # finished after release: forget it
                del self._where[request_id]
            else:  # "finished" while still queued (an error upstream): drop it
                del self._where[request_id]
                self._deadline_dirty = True
        return releases

    def _prefilled(self, request_id: str, now: float) -> list[Release]:
        self._now = max(self._now, now)
        instance_id = self._where.get(request_id)
        if instance_id is None:
            return []
        queue = self._queues[instance_id]
        if not queue.prefilled(request_id):
            return []
        self._deadline_dirty = True
        return self._drain(queue, now)

    def tick(self, now: float) -> list[Release]:
        self._now = max(self._now, now)
        self._deadline_dirty = True
        releases: list[Release] = []
        for instance_id in sorted(self._queues):
            queue = self._queues[instance_id]
            if len(queue):
                releases.extend(self._drain(queue, now))
        return releases

    def move(self, request_id: str, decision: Decision, now: float,
             reason: str = "rebalance") -> list[Release]:
        instance_id = self._where.get(request_id)
        entry = None if instance_id is None else self._queues[instance_id].remove(request_id)
        if entry is None:
            raise NotQueued(request_id)
        self._now = max(self._now, now)
        entry.decision = decision
        entry.moves += 1
        entry.uncached_tokens = self.uncached(entry.request, decision)
        entry.klass = self.classify(entry.uncached_tokens)
        target = self._queue(decision.instance_id)
        target.add(entry)
        self._where[request_id] = target.instance_id
        self.moves[reason] = self.moves.get(reason, 0) + 1
        self._deadline_dirty = True
        return self._drain(target, now)

    def cancel(self, request_id: str) -> bool:
        instance_id = self._where.get(request_id)
        if instance_id is None or self._queues[instance_id].remove(request_id) is None:
            return False
        del self._where[request_id]
        self.cancelled += 1
        self._deadline_dirty = True
        return True

    # ---- releasing --------------------------------------------------------------------

    def has_room(self, queue: InstanceQueue) -> bool:
        return queue.inflight_tokens < self.budget_tokens

    def predicted_ttft(self, queue: InstanceQueue, entry: Entry, now: float) -> float:
        """``entry``'s TTFT if released now: its wait so far plus the predicted prefill
        behind what its instance has in flight."""
        return (now - entry.enqueued_at) + self.predictor.predict(
            queue.instance_id, queue.inflight_tokens, entry.uncached_tokens)

    def _head(self, queue: InstanceQueue, klass: str, now: float) -> Entry | None:
        """The next entry of ``klass`` in release order. In goodput order, heads that can
        no longer meet the SLO are deferred first (each entry is checked once it is
        next, so deferring costs O(1) per request)."""
        entry = queue.oldest(klass)
        if not self.goodput:
            return entry
        while entry is not None and self.predicted_ttft(queue, entry, now) > self.slo_ttft_s:
            queue.defer(entry)
            self.deferrals += 1
            entry = queue.oldest(klass)
        return entry

    def _release(self, queue: InstanceQueue, entry: Entry, now: float, reason: str,
                 out: list[Release]) -> None:
        rid = entry.request.request_id
        queue.remove(rid)
        self._released_at[rid] = (now, queue.inflight_tokens + entry.uncached_tokens)
        queue.start(rid, entry.uncached_tokens)
        waited = now - entry.enqueued_at
        self.released[reason] += 1
        self.released_by_class[entry.klass] += 1
        self.wait_sum[entry.klass] += waited
        if waited > self.wait_max[entry.klass]:
            self.wait_max[entry.klass] = waited
        self._deadline_dirty = True
        out.append(Release(entry.request, entry.decision, entry.klass, entry.enqueued_at, now,
                           reason, entry.uncached_tokens, entry.moves))

    def _drain(self, queue: InstanceQueue, now: float) -> list[Release]:
        out: list[Release] = []
        if not len(queue):
            return out
        # Bounded wait: whatever waited the bound goes now, room or not, oldest first.
        limit = now - self.bound_s + _EPS
        while True:
            aged = [e for e in queue.heads() if e.enqueued_at <= limit]
            if not aged:
                break
            self._release(queue, min(aged, key=Entry.key), now, "aged", out)
        while len(queue) and self.has_room(queue):
            long = self._head(queue, LONG, now)
            if long is not None and now - long.enqueued_at + _EPS >= self.long_age_s:
                self._release(queue, long, now, "room", out)
                continue
            short = self._head(queue, SHORT, now)
            if short is not None:
                window = self.window.window_s(queue.instance_id)
                ready = (len(queue.short) >= self.window.batch_size
                         or now - short.enqueued_at + _EPS >= window
                         or queue.inflight_tokens == 0)
                if not ready:
                    break  # hold the shorts (and, behind them, the longs) for the batch
                for _ in range(self.window.batch_size):
                    if not self.has_room(queue):
                        break
                    short = self._head(queue, SHORT, now)
                    if short is None:
                        break
                    self._release(queue, short, now, "room", out)
                continue
            if long is not None:
                self._release(queue, long, now, "room", out)
                continue
            # Only deferred requests wait here: the room is theirs, oldest first.
            if queue.inflight_tokens >= self.deferred_budget_tokens:
                break
            deferred = queue.oldest_deferred()
            assert deferred is not None
            self._release(queue, deferred, now, "deferred", out)
        return out

    def next_deadline(self) -> float | None:
        if self._deadline_dirty:
            self._deadline = self._compute_deadline()
            self._deadline_dirty = False
        return self._deadline

    def _compute_deadline(self) -> float | None:
        best: float | None = None
        now = self._now
        for queue in self._queues.values():
            if not len(queue):
                continue
            times = [e.enqueued_at + self.bound_s for e in queue.heads()]
            short = queue.oldest(SHORT)
            if short is not None:
                window = self.window.window_s(queue.instance_id)
                if window > 0 and self.has_room(queue):
                    times.append(short.enqueued_at + window)
            long = queue.oldest(LONG)
            if long is not None:
                times.append(long.enqueued_at + self.long_age_s)
            for t in times:
                if t > now and (best is None or t < best):
                    best = t
        return best

    # ---- inspection -------------------------------------------------------------------

    def queued(self, instance_id: str | None = None) -> list[QueuedRequest]:
        queues = ([self._queues[instance_id]] if instance_id in self._queues else []
                  ) if instance_id is not None else list(self._queues.values())
        entries = [e for q in queues for e in (*q.short.values(), *q.long.values(),
                                                *q.deferred[SHORT].values(),
                                                *q.deferred[LONG].values())]
        entries.sort(key=Entry.key)
        return [QueuedRequest(e.request, e.decision.instance_id, e.enqueued_at,
                              e.decision.candidates, e.klass) for e in entries]

    def is_deferred(self, request_id: str) -> bool:
        instance_id = self._where.get(request_id)
        if instance_id is None:
            return False
        deferred = self._queues[instance_id].deferred
        return request_id in deferred[SHORT] or request_id in deferred[LONG]

    def movable(self, now: float) -> list[QueuedRequest]:
        """In goodput order, the queued requests that can still meet the SLO: not deferred
        and waited no longer than it. Moving one that missed it cannot save it and would
        cost its cached prefix, and its long wait is deferral, not a hotspot (the planner's
        wait trigger would fire on every such request)."""
        if not self.goodput:
            return self.queued()
        limit = now - self.slo_ttft_s
        return [q for q in self.queued() if q.enqueued_at >= limit
                and not self.is_deferred(q.request.request_id)]

    def queued_count(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def inflight_tokens(self, instance_id: str) -> int:
        queue = self._queues.get(instance_id)
        return 0 if queue is None else queue.inflight_tokens

    def counters(self) -> dict[str, Any]:
        queued = {klass: sum(len(q.of(klass)) + len(q.deferred[klass])
                             for q in self._queues.values()) for klass in CLASSES}
        return {
            "mode": self.mode,
            "submitted": self.submitted,
            "queued": queued,
            "released": dict(self.released),
            "released_by_class": dict(self.released_by_class),
            "wait_s_mean": {k: (self.wait_sum[k] / n if (n := self.released_by_class[k])
                                else 0.0) for k in CLASSES},
            "wait_s_max": dict(self.wait_max),
            "moves": dict(sorted(self.moves.items())),
            "cancelled": self.cancelled,
            "boundary_tokens": self.boundary.tokens,
            "order": self.order,
            "deferrals": self.deferrals,
            "deferred_queued": sum(q.deferred_count() for q in self._queues.values()),
        }
