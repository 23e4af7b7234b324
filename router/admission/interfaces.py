"""Interfaces of router-side admission (the gateway's ``admit`` seam; see docs/admission.md).

Admission sits between the routing decision and forwarding. The gateway and the simulator
hold the very same objects: they are pure (no I/O, no wall clock: every call takes ``now``)
and return what to forward as ``Release``s. The caller's contract:

* ``submit(request, decision, now)`` once per routed request, after the policy's
  ``on_dispatched``; forward every returned ``Release`` to ``release.instance_id``.
* ``on_first_token`` / ``on_finished`` for released requests (room frees up): forward
  what they return.
* ``tick(now)`` whenever ``now >= next_deadline()`` (batching windows and aging expire on
  time, not only on events).
* ``move(request_id, decision, now)`` re-decides a request still queued (rebalancing); it
  raises ``NotQueued`` once the request was released, so a request is never sent twice.
* ``cancel(request_id)`` drops a queued request whose client went away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

# The control loop's one interface for planned moves (queued requests here, running ones
# by live migration), re-exported for admission's users.
from router.control import ControlAction as ControlAction
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest
from router.policy.rebalance import QueuedRequest

SHORT = "short"
LONG = "long"


class NotQueued(KeyError):
    """The request is not (or no longer) queued: released, cancelled or never submitted."""


@dataclass(frozen=True)
class Release:
    """Forward ``request`` to ``instance_id`` now.

    ``decision`` is the final routing decision (a ``rebalance`` one if the request was
    moved while queued); ``klass`` is ``short``/``long`` (``none`` in pass-through);
    ``waited_s`` the time it spent queued in the router; ``reason`` why it went now:
    ``pass`` (no admission), ``room`` (its instance had room), ``aged`` (its bounded wait
    ran out, released whether or not there was room).
    """

    request: RoutingRequest
    decision: Decision
    klass: str
    enqueued_at: float
    released_at: float
    reason: str
    uncached_tokens: int
    moves: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def instance_id(self) -> str:
        return self.decision.instance_id

    @property
    def waited_s(self) -> float:
        return self.released_at - self.enqueued_at


class Admission(ABC):
    """Per-instance admission queues between routing and forwarding."""

    mode: str = "abstract"

    @abstractmethod
    def submit(self, request: RoutingRequest, decision: Decision, now: float) -> list[Release]:
        """Queue a routed request; return what may be forwarded now (possibly itself)."""

    @abstractmethod
    def on_first_token(self, request_id: str, now: float) -> list[Release]:
        """A released request produced its first token (its prefill no longer takes room)."""

    @abstractmethod
    def on_finished(self, request_id: str, now: float) -> list[Release]:
        """A released request ended (successfully or not)."""

    @abstractmethod
    def tick(self, now: float) -> list[Release]:
        """Timer-driven releases (expired batching windows, aged requests)."""

    @abstractmethod
    def next_deadline(self) -> float | None:
        """When ``tick`` should next be called (None: only events can release anything)."""

    @abstractmethod
    def move(self, request_id: str, decision: Decision, now: float,
             reason: str = "rebalance") -> list[Release]:
        """Re-queue a queued request at ``decision.instance_id`` (keeping its wait); raises
        ``NotQueued`` if it is not queued any more."""

    @abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Drop a queued request; False if it was not queued."""

    @abstractmethod
    def queued(self, instance_id: str | None = None) -> list[QueuedRequest]:
        """Requests queued at ``instance_id`` (all instances if None), oldest first."""

    @abstractmethod
    def counters(self) -> dict[str, Any]:
        """Metrics: queue lengths by class, waits, releases by reason, moves by reason."""

    def movable(self, now: float) -> list[QueuedRequest]:
        """The queued requests rebalancing may move (all of ``queued()`` unless the mode
        says otherwise: goodput order leaves out those that can no longer meet the SLO)."""
        return self.queued()

    def classify(self, uncached_tokens: int) -> str:
        """The class of a request with ``uncached_tokens`` to prefill (``none`` if the
        mode has no classes)."""
        return "none"

    def restrict(self, snapshot: ClusterSnapshot, klass: str) -> ClusterSnapshot | None:
        """The snapshot a request of ``klass`` must be routed in (spatial pools: instances
        outside the class's pool appear draining), or None when any instance will do."""
        return None

