"""The router's own view of work in flight on each instance.

Engine load reports are sampled (every heartbeat) and travel through Redis, so between two
reports a busy router can send an instance dozens of requests the report does not show.
``InflightTracker`` counts, per instance, what this router dispatched and has not yet seen
finish, and how many uncached prompt tokens it sent that have not produced a first token
yet (prefill work still ahead of the engine). It is fed only by the three policy hooks and
reads no clock: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InflightRequest:
    """One dispatched request, as the tracker remembers it until it finishes."""

    request_id: str
    instance_id: str
    prompt_tokens: int
    uncached_tokens: int  # estimate at dispatch: prompt tokens the instance must prefill
    max_tokens: int
    dispatched_at: float
    # Uncached prompt tokens already queued on the instance when this one was dispatched
    # (the prefill work ahead of it); what TTFT learning regresses against.
    queued_ahead_tokens: int
    prefilling: bool = True  # no first token yet


@dataclass
class InstanceLoad:
    """Totals over one instance's in-flight requests."""

    requests: int = 0
    prefill_tokens: int = 0  # uncached prompt tokens of requests without a first token
    decode_tokens: int = 0  # output budget (max_tokens) of requests not finished


class InflightTracker:
    """Per-instance in-flight requests and pending prefill tokens, fed by dispatch feedback.

    * ``on_dispatched`` adds the request to its instance (re-dispatching a known request id
      first removes it from where it was: retries and rebalancing move requests);
    * ``on_first_token`` removes its uncached tokens from the instance's pending prefill;
    * ``on_finished`` removes it altogether (also when it failed before a first token).

    Unknown request ids are ignored by the last two, so hooks may arrive late or twice.
    """

    def __init__(self) -> None:
        self._requests: dict[str, InflightRequest] = {}
        self._loads: dict[str, InstanceLoad] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> InflightRequest | None:
        return self._requests.get(request_id)

    def load(self, instance_id: str) -> InstanceLoad:
        """Totals for ``instance_id`` (zeros if nothing is in flight there)."""
        return self._loads.get(instance_id) or InstanceLoad()

    def requests(self, instance_id: str) -> int:
        return self.load(instance_id).requests

    def pending_prefill_tokens(self, instance_id: str) -> int:
        return self.load(instance_id).prefill_tokens

    def pending_decode_tokens(self, instance_id: str) -> int:
        return self.load(instance_id).decode_tokens

    def instance_ids(self) -> list[str]:
        """Instances with at least one request in flight."""
        return [i for i, load in self._loads.items() if load.requests]

    def on_dispatched(
        self,
        request_id: str,
        instance_id: str,
        *,
        prompt_tokens: int,
        uncached_tokens: int,
        max_tokens: int,
        now: float,
        queued_ahead_tokens: int | None = None,
    ) -> InflightRequest:
        """Record a dispatch; ``queued_ahead_tokens`` defaults to this tracker's own count."""
        self.on_finished(request_id)
        load = self._loads.setdefault(instance_id, InstanceLoad())
        if queued_ahead_tokens is None:
            queued_ahead_tokens = load.prefill_tokens
        uncached_tokens = max(0, min(uncached_tokens, prompt_tokens))
        entry = InflightRequest(
            request_id=request_id,
            instance_id=instance_id,
            prompt_tokens=prompt_tokens,
            uncached_tokens=uncached_tokens,
            max_tokens=max_tokens,
            dispatched_at=now,
            queued_ahead_tokens=queued_ahead_tokens,
        )
        self._requests[request_id] = entry
        load.requests += 1
        load.prefill_tokens += uncached_tokens
        load.decode_tokens += max_tokens
        return entry

    def on_first_token(self, request_id: str) -> InflightRequest | None:
        """The request's prefill is done; returns its entry (None if unknown)."""
        entry = self._requests.get(request_id)
        if entry is None or not entry.prefilling:
            return entry
        entry.prefilling = False
        self._loads[entry.instance_id].prefill_tokens -= entry.uncached_tokens
        return entry

    def on_finished(self, request_id: str) -> InflightRequest | None:
        """The request left its instance; returns its entry (None if unknown)."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return None
        load = self._loads[entry.instance_id]
        load.requests -= 1
        load.decode_tokens -= entry.max_tokens
        if entry.prefilling:
            load.prefill_tokens -= entry.uncached_tokens
        if load.requests == 0:
            del self._loads[entry.instance_id]
        return entry

    def drop_instance(self, instance_id: str) -> list[InflightRequest]:
        """Forget everything in flight on an instance that left; returns what was there."""
        dropped = [r for r in self._requests.values() if r.instance_id == instance_id]
        for entry in dropped:
            self.on_finished(entry.request_id)
        return dropped
