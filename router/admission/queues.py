"""One instance's router-side queues: short and long requests (and, in goodput order, those
deferred because they can no longer meet the SLO), and its prefill in flight."""

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
    O(1)), and the uncached prefill tokens of released requests with no first token yet.

    ``deferred`` holds, per class and oldest first, entries taken out of the release order
    because they can no longer meet the SLO (``LapsAdmission`` with ``order="goodput"``):
    they go only when no other entry is waiting, or at their bound."""

    instance_id: str
    short: dict[str, Entry] = field(default_factory=dict)
    long: dict[str, Entry] = field(default_factory=dict)
    deferred: dict[str, dict[str, Entry]] = field(
        default_factory=lambda: {SHORT: {}, LONG: {}})
    inflight: dict[str, int] = field(default_factory=dict)
    inflight_tokens: int = 0

    def of(self, klass: str) -> dict[str, Entry]:
        return self.short if klass == SHORT else self.long

    def __len__(self) -> int:
        deferred = self.deferred
        return len(self.short) + len(self.long) + len(deferred[SHORT]) + len(deferred[LONG])

    def deferred_count(self) -> int:
        return len(self.deferred[SHORT]) + len(self.deferred[LONG])

    def add(self, entry: Entry) -> None:
        """Append ``entry`` to its class; an entry older than the tail (a moved request
        keeps its wait) is put in its place by enqueue time."""
        _insert(self.of(entry.klass), entry)

    def defer(self, entry: Entry) -> None:
        """Move a queued ``entry`` of its class to the deferred entries of its class."""
        del self.of(entry.klass)[entry.request.request_id]
        _insert(self.deferred[entry.klass], entry)

    def remove(self, request_id: str) -> Entry | None:
        for queue in (self.short, self.long, *self.deferred.values()):
            entry = queue.pop(request_id, None)
            if entry is not None:
                return entry
        return None

    def oldest(self, klass: str) -> Entry | None:
        queue = self.short if klass == SHORT else self.long
        return next(iter(queue.values())) if queue else None

    def oldest_deferred(self) -> Entry | None:
        """The deferred entry queued first, of either class."""
        heads = [next(iter(q.values())) for q in self.deferred.values() if q]
        return min(heads, key=Entry.key) if heads else None

    def heads(self) -> list[Entry]:
        """The oldest entry of each non-empty queue (class and deferred): every entry is
        at least as young as the head of its queue."""
        return [next(iter(q.values())) for q in (self.short, self.long, *self.deferred.values())
                if q]

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


def _insert(queue: dict[str, Entry], entry: Entry) -> None:
    """Append ``entry`` to ``queue`` (oldest first), in its place by enqueue time if it is
    older than the tail."""
    tail = next(reversed(queue.values()), None) if queue else None
    queue[entry.request.request_id] = entry
    if tail is not None and entry.key() < tail.key():
        ordered = sorted(queue.values(), key=Entry.key)
        queue.clear()
        queue.update((e.request.request_id, e) for e in ordered)


CLASSES = (SHORT, LONG)
