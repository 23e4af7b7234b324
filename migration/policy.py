"""Migration policy: which running requests to move where (pure functions, no I/O, no clock).

The control loop (``router``) feeds these its view of the fleet and orders the moves they
return through ``migration.coordinator``.

* **Freeness** (Llumnix): an instance's free KV blocks per running request (after the blocks
  its queued requests will need). Below ``threshold`` an instance is crowded: its requests
  are about to be preempted or to slow each other down; above it, it has room.
  ``rebalance`` pairs the most crowded instances with the roomiest and picks one request to
  move out of each crowded one, until the pair would cross the threshold or ``max_moves``.
* **Drain** (scale-in, shutdown, an instance marked unhealthy): ``drain`` spreads every
  running request of the draining instances over the others, each to the one with the most
  freeness left after the moves already planned, if it fits.

Which request leaves an instance: ``last_come`` (Llumnix's default: the newest has the least
KV, so it is the cheapest to copy and the least likely to finish during the copy) or
``fewest_blocks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_FREENESS_THRESHOLD = 3.0  # Llumnix: migrate out below it, in above it
SELECTIONS = ("last_come", "fewest_blocks")


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    free_blocks: int
    num_running: int
    queued_blocks: int = 0  # KV blocks the instance's waiting requests will need
    accepts_migrations: bool = True  # healthy, not draining, has a migration agent

    @property
    def freeness(self) -> float:
        """Free blocks per running request (infinite when nothing runs)."""
        return freeness(self.free_blocks - self.queued_blocks, self.num_running)


@dataclass(frozen=True)
class RunningRequest:
    request_id: str
    instance_id: str
    num_blocks: int  # KV blocks it holds (what the move copies)
    arrival: float  # when it started (any monotonic unit: only the order matters)
    migratable: bool = True  # decoding and its client can follow a move (a stream)


@dataclass(frozen=True)
class Move:
    request_id: str
    source: str
    destination: str
    num_blocks: int


def freeness(free_blocks: int, num_running: int) -> float:
    """Llumnix's load metric: free blocks per running request."""
    if num_running <= 0:
        return math.inf
    return free_blocks / num_running


def pick_request(requests: Sequence[RunningRequest], selection: str = "last_come",
                 exclude: frozenset[str] = frozenset()) -> RunningRequest | None:
    """The request to move out of an instance, or None if none can move."""
    candidates = [r for r in requests if r.migratable and r.request_id not in exclude]
    if not candidates:
        return None
    if selection == "last_come":
        return max(candidates, key=lambda r: (r.arrival, r.request_id))
    if selection == "fewest_blocks":
        return min(candidates, key=lambda r: (r.num_blocks, -r.arrival, r.request_id))
    raise ValueError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")


@dataclass
class _State:
    instance_id: str
    free: int
    running: int
    accepts: bool

    @property
    def freeness(self) -> float:
        return freeness(self.free, self.running)


def rebalance(
    loads: Sequence[InstanceLoad],
    requests: Sequence[RunningRequest],
    threshold: float = DEFAULT_FREENESS_THRESHOLD,
    max_moves: int = 4,
    selection: str = "last_come",
    busy: frozenset[str] = frozenset(),
) -> list[Move]:
    """Moves from instances below ``threshold`` freeness to instances above it.

    Most crowded source with roomiest destination first; a move is planned only if the
    destination stays above the threshold after taking the request's blocks (so moves do
    not create a new hotspot) and at most one request leaves each source per call (the
    next call sees the fresh loads). ``busy`` request ids (already migrating) are skipped.
    """
    states = {load.instance_id: _State(load.instance_id, load.free_blocks - load.queued_blocks,
                                       load.num_running, load.accepts_migrations)
              for load in loads}
    by_instance: dict[str, list[RunningRequest]] = {}
    for request in requests:
        by_instance.setdefault(request.instance_id, []).append(request)
    sources = sorted((s for s in states.values() if s.freeness < threshold),
                     key=lambda s: (s.freeness, s.instance_id))
    moves: list[Move] = []
    for source in sources:
        if len(moves) >= max_moves:
            break
        chosen = pick_request(by_instance.get(source.instance_id, ()), selection, busy)
        if chosen is None:
            continue
        destination = _roomiest(states, source.instance_id, chosen.num_blocks, threshold)
        if destination is None:
            continue  # too big for any roomy instance; a smaller one elsewhere may fit
        _apply(states, source, destination, chosen)
        moves.append(Move(chosen.request_id, source.instance_id, destination.instance_id,
                          chosen.num_blocks))
    return moves


def drain(
    draining: Sequence[str],
    loads: Sequence[InstanceLoad],
    requests: Sequence[RunningRequest],
    busy: frozenset[str] = frozenset(),
) -> tuple[list[Move], list[RunningRequest]]:
    """Moves that empty the ``draining`` instances, and the requests that fit nowhere (or
    cannot move: their clients cannot follow; they finish where they are).

    Largest requests are placed first, each on the instance with the most freeness after
    the moves already planned that has room for its blocks.
    """
    leaving = set(draining)
    states = {load.instance_id: _State(load.instance_id, load.free_blocks - load.queued_blocks,
                                       load.num_running,
                                       load.accepts_migrations
                                       and load.instance_id not in leaving)
              for load in loads}
    moves: list[Move] = []
    stuck: list[RunningRequest] = []
    pending = sorted((r for r in requests if r.instance_id in leaving
                      and r.request_id not in busy),
                     key=lambda r: (-r.num_blocks, r.request_id))
    for request in pending:
        if not request.migratable:
            stuck.append(request)
            continue
        destination = _roomiest(states, request.instance_id, request.num_blocks, -math.inf)
        source = states.get(request.instance_id)
        if destination is None or source is None:
            stuck.append(request)
            continue
        _apply(states, source, destination, request)
        moves.append(Move(request.request_id, request.instance_id, destination.instance_id,
                          request.num_blocks))
    return moves, stuck


def _roomiest(states: dict[str, _State], source: str, num_blocks: int,
              threshold: float) -> _State | None:
    best: _State | None = None
    best_after = -math.inf
    for state in states.values():
        if not state.accepts or state.instance_id == source or state.free < num_blocks:
            continue
        after = freeness(state.free - num_blocks, state.running + 1)
        if after <= threshold:
            continue
        if after > best_after or (after == best_after and best is not None
                                  and state.instance_id < best.instance_id):
            best, best_after = state, after
    return best


def _apply(states: dict[str, _State], source: _State, destination: _State,
           request: RunningRequest) -> None:
    source.free += request.num_blocks
    source.running -= 1
    destination.free -= request.num_blocks
    destination.running += 1
    states[source.instance_id] = source
    states[destination.instance_id] = destination
