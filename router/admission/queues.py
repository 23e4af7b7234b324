"""One instance's router-side queues: short and long requests, and its prefill in flight."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.admission.interfaces import LONG, SHORT
from router.policy.interfaces import Decision, RoutingRequest


@dataclass(eq=False)
class Entry:
    """A request queued in the router (``seq`` orders entries queued at the same time)."""

    request: RoutingRequest
    decision: Decision
    klass: str
    enqueued_at: float
    uncached_tokens: int
    seq: int
    moves: int = 0

    def key(self) -> tuple[float, int]:
        return (self.enqueued_at, self.seq)


@dataclass(eq=False)
class InstanceQueue:
    """Queued entries by class, oldest first (dicts keep insertion order and remove in
    O(1)), and the uncached prefill tokens of released requests with no first token yet."""

    instance_id: str
    short: dict[str, Entry] = field(default_factory=dict)
    long: dict[str, Entry] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    inflight_tokens: int = 0

    def of(self, klass: str) -> dict[str, Entry]:
        return self.short if klass == SHORT else self.long

    def __len__(self) -> int:
        return len(self.short) + len(self.long)

    def add(self, entry: Entry) -> None:
        """Append ``entry``; an entry older than the tail (a moved request keeps its wait)
        is put in its place by enqueue time."""
        queue = self.of(entry.klass)
        tail = next(reversed(queue.values()), None) if queue else None
        queue[entry.request.request_id] = entry
        if tail is not None and entry.key() < tail.key():
            ordered = sorted(queue.values(), key=Entry.key)
            queue.clear()
            queue.update((e.request.request_id, e) for e in ordered)

    def remove(self, request_id: str) -> Entry | None:
        entry = self.short.pop(request_id, None)
        return entry if entry is not None else self.long.pop(request_id, None)

    def oldest(self, klass: str) -> Entry | None:
        queue = self.short if klass == SHORT else self.long
        return next(iter(queue.values())) if queue else None

    def start(self, request_id: str, tokens: int) -> None:
        """A request was released here: its prefill takes room until its first token."""
        self.inflight[request_id] = tokens
        self.inflight_tokens += tokens

    def prefilled(self, request_id: str) -> bool:
        """Its first token came (or it ended): give its room back; False if unknown."""
        tokens = self.inflight.pop(request_id, None)
        if tokens is None:
            return False
        self.inflight_tokens -= tokens
        return True


CLASSES = (SHORT, LONG)
