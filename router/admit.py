"""The gateway's admit seam: between the routing decision and forwarding.

The admission policy itself (``router.admission``: pass-through, LAPS queues, spatial
pools) is pure and clock-passed, shared with the simulator. ``AdmissionGate`` binds it to
the event loop: a request waits here until its ``Release`` comes (its own ``submit`` may
release it at once, or another request's progress or a timer releases it later), room is
handed back as requests produce their first token and end, and the admission's deadlines
are kept with one timer.

The gate also bounds what the gateway takes on: each replica has an in-flight budget
(requests released to it and not finished, counted by this gateway replica); when every
routable replica is at its budget a new request gets ``TooBusy`` (the gateway answers 429
with ``Retry-After``) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from router.admission.interfaces import Admission, Release
from router.policy.interfaces import Decision, RoutingRequest


class TooBusy(Exception):
    """Every routable replica's in-flight budget is full."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("every replica is at its in-flight budget")
        self.retry_after_s = retry_after_s


class AdmissionGate:
    """Runs an ``Admission`` on the event loop for one gateway replica."""

    def __init__(self, admission: Admission, clock: Callable[[], float],
                 max_inflight_per_instance: int = 0, retry_after_s: float = 1.0) -> None:
        self.admission = admission
        self.clock = clock
        # 0 = no budget (the admission policy alone decides).
        self.max_inflight_per_instance = max_inflight_per_instance
        self.retry_after_s = retry_after_s
        self.inflight: dict[str, int] = {}
        self._waiting: dict[str, asyncio.Future[Release]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.passthrough = admission.mode == "none"

    # -- budget ---------------------------------------------------------------------------
    def check_room(self, routable: Iterable[str]) -> None:
        """Raise ``TooBusy`` if every instance in ``routable`` is at its budget."""
        budget = self.max_inflight_per_instance
        if budget <= 0:
            return
        inflight = self.inflight
        for instance_id in routable:
            if inflight.get(instance_id, 0) < budget:
                return
        raise TooBusy(self.retry_after_s)

    def full(self, instance_id: str) -> bool:
        budget = self.max_inflight_per_instance
        return budget > 0 and self.inflight.get(instance_id, 0) >= budget

    # -- the request path -------------------------------------------------------------------
    async def admit(self, request: RoutingRequest, decision: Decision) -> Release:
        """Wait until ``request`` may be forwarded; return its ``Release``.

        If the caller is cancelled (the client went away) while queued, the request leaves
        the queue and is never released.
        """
        now = self.clock()
        releases = self.admission.submit(request, decision, now)
        if self.passthrough and len(releases) == 1:
            release = releases[0]
            self._count_out(release)
            return release
        own = self._dispatch(releases, request.request_id)
        if own is not None:
            return own
        future: asyncio.Future[Release] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = future
        self._arm()
        try:
            return await future
        except asyncio.CancelledError:
            self._waiting.pop(request.request_id, None)
            if not self.admission.cancel(request.request_id) and future.done() \
                    and not future.cancelled():
                # Released in the same instant the client left: give the room back.
                self.finished(request.request_id, future.result().instance_id)
            raise

    def first_token(self, request_id: str) -> None:
        if not self.passthrough:
            self._dispatch(self.admission.on_first_token(request_id, self.clock()))

    def finished(self, request_id: str, instance_id: str) -> None:
        count = self.inflight.get(instance_id, 0)
        if count > 1:
            self.inflight[instance_id] = count - 1
        else:
            self.inflight.pop(instance_id, None)
        if not self.passthrough:
            self._dispatch(self.admission.on_finished(request_id, self.clock()))

    def apply(self, releases: list[Release]) -> None:
        """Hand out releases made outside the gate (e.g. by rebalancing moves)."""
        self._dispatch(releases)

    def move(self, request_id: str, decision: Decision, reason: str = "rebalance") -> None:
        """Re-decide a queued request (rebalancing); ``NotQueued`` once it was released."""
        self._dispatch(self.admission.move(request_id, decision, self.clock(), reason))

    def running_on(self, instance_id: str) -> None:
        """A request continues on ``instance_id`` (moved mid-stream): count it there."""
        self.inflight[instance_id] = self.inflight.get(instance_id, 0) + 1

    # -- internals --------------------------------------------------------------------------
    def _count_out(self, release: Release) -> None:
        self.running_on(release.instance_id)

    def _dispatch(self, releases: list[Release], own_id: str | None = None) -> Release | None:
        own: Release | None = None
        for release in releases:
            self._count_out(release)
            if release.request_id == own_id:
                own = release
                continue
            future = self._waiting.pop(release.request_id, None)
            if future is not None and not future.done():
                future.set_result(release)
            elif future is None or future.cancelled():
                # Its client is gone: nothing will forward it, so its room comes back now.
                self.finished(release.request_id, release.instance_id)
        if not self.passthrough:
            self._arm()
        return own

    def _arm(self) -> None:
        deadline = self.admission.next_deadline()
        if deadline is None or deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.clock())
        self._timer_at = deadline
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._dispatch(self.admission.tick(self.clock()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in self._waiting.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                future.cancel()
        self._waiting.clear()
