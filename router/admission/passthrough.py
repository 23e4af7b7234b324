"""``none`` admission: every routed request is forwarded at once (today's gateway)."""

from __future__ import annotations

from typing import Any

from router.admission.interfaces import Admission, NotQueued, Release
from router.policy.interfaces import Decision, RoutingRequest
from router.policy.rebalance import QueuedRequest


class PassThroughAdmission(Admission):
    """Queues nothing: ``submit`` returns the request's own ``Release`` (reason ``pass``)."""

    mode = "none"

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, request: RoutingRequest, decision: Decision, now: float) -> list[Release]:
        self.submitted += 1
        uncached = max(1, len(request.token_ids) - decision.cached_tokens_estimate)
        return [Release(request, decision, "none", now, now, "pass", uncached)]

    def on_first_token(self, request_id: str, now: float) -> list[Release]:
        return []

    def on_finished(self, request_id: str, now: float) -> list[Release]:
        return []

    def tick(self, now: float) -> list[Release]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def move(self, request_id: str, decision: Decision, now: float,
             reason: str = "rebalance") -> list[Release]:
        raise NotQueued(request_id)

    def cancel(self, request_id: str) -> bool:
        return False

    def queued(self, instance_id: str | None = None) -> list[QueuedRequest]:
        return []

    def counters(self) -> dict[str, Any]:
        return {"mode": self.mode, "submitted": self.submitted,
                "released": {"pass": self.submitted}}
