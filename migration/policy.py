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
* **Rate limits** (``FreenessRebalancer``, what the control loop calls each period): one
  planning round per ``period_s``, at most ``max_per_source`` moves out of an instance at a
  time and ``max_moves`` per round, and a request that moved stays where it went for
  ``cooldown_s`` (nothing ping-pongs). Moves the load reports do not show yet (under way, or
  ended after the last report) are counted into the loads by the planner itself. It keeps
  that memory but reads no clock: ``now`` is passed in.

Which request leaves an instance: ``last_come`` (Llumnix's default: the newest has the least
KV, so it is the cheapest to copy and the least likely to finish during the copy) or
``fewest_blocks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_FREENESS_THRESHOLD = 3.0  # Llumnix: migrate out below it, in above it
SELECTIONS = ("last_come", "fewest_blocks")


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    free_blocks: int
    num_running: int
    queued_blocks: int = 0  # KV blocks the instance's waiting requests will need
    accepts_migrations: bool = True  # healthy, not draining, has a migration agent
    report_time: float = 0.0  # when the load was measured (any clock: only its order counts)

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
    max_per_source: int = 1,
    quota: Mapping[str, int] | None = None,
) -> list[Move]:
    """Moves from instances below ``threshold`` freeness to instances above it.

    Most crowded source with roomiest destination first; a move is planned only if the
    destination stays above the threshold after taking the request's blocks (so moves do
    not create a new hotspot) and at most ``max_per_source`` requests leave each source per
    call (in rounds: each round takes one from every source still below the threshold after
    the moves already planned; the next call sees the fresh loads), fewer where ``quota``
    says so (moves a source may still give). An instance below the threshold when the call
    starts never takes a request in it, even once its own moves out lift it: a request
    moving in while another moves out is churn that copies KV for nothing. ``busy``
    request ids (already migrating) are skipped.
    """
    states = {load.instance_id: _State(load.instance_id, load.free_blocks - load.queued_blocks,
                                       load.num_running, load.accepts_migrations)
              for load in loads}
    by_instance: dict[str, list[RunningRequest]] = {}
    for request in requests:
        by_instance.setdefault(request.instance_id, []).append(request)
    crowded = frozenset(s.instance_id for s in states.values() if s.freeness < threshold)
    moves: list[Move] = []
    taken = set(busy)
    given: dict[str, int] = {}
    quota = quota or {}
    for _ in range(max_per_source):
        sources = sorted((s for s in states.values() if s.freeness < threshold),
                         key=lambda s: (s.freeness, s.instance_id))
        planned = len(moves)
        for source in sources:
            if len(moves) >= max_moves:
                return moves
            if given.get(source.instance_id, 0) >= quota.get(source.instance_id,
                                                             max_per_source):
                continue
            chosen = pick_request(by_instance.get(source.instance_id, ()), selection,
                                  frozenset(taken))
            if chosen is None:
                continue
            destination = _roomiest(states, crowded, chosen.num_blocks, threshold)
            if destination is None:
                continue  # too big for any roomy instance; a smaller one elsewhere may fit
            _apply(states, source, destination, chosen)
            taken.add(chosen.request_id)
            given[source.instance_id] = given.get(source.instance_id, 0) + 1
            moves.append(Move(chosen.request_id, source.instance_id,
                              destination.instance_id, chosen.num_blocks))
        if len(moves) == planned:
            break
    return moves


@dataclass(frozen=True)
class RebalanceConfig:
    """Freeness rebalancing's knobs (``--migration-param KEY=VALUE`` on the gateway)."""

    threshold: float = DEFAULT_FREENESS_THRESHOLD  # below: migrate out; above: may take in
    period_s: float = 1.0  # one planning round at most this often
    max_moves: int = 4  # moves per round, all sources together
    max_per_source: int = 1  # migrations out of one instance at a time
    cooldown_s: float = 30.0  # a moved request is not moved again for this long
    selection: str = "last_come"  # which request leaves: last_come | fewest_blocks

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; known: "
                             f"{', '.join(SELECTIONS)}")
        if self.period_s < 0 or self.cooldown_s < 0 or self.max_moves < 1 \
                or self.max_per_source < 1:
            raise ValueError("period_s and cooldown_s must be >= 0, max_moves and "
                             "max_per_source >= 1")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RebalanceConfig:
        """The config with ``params`` overriding the defaults; ``ValueError`` on an unknown
        name."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown migration parameter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(known)}")
        defaults = cls()
        values: dict[str, Any] = {}
        for name, value in params.items():
            # Coerce to the defaults' types (a CLI ``threshold=2`` parses as an int), but
            # never truncate: ``max_moves=2.5`` is an error, not 2.
            kind = type(getattr(defaults, name))
            if kind is int and not float(value).is_integer():
                raise ValueError(f"migration parameter {name} wants an integer, got {value!r}")
            values[name] = kind(value)
        return cls(**values)


@dataclass
class _Pending:
    """A move the loads may not show yet: under way (``reported`` None), or committed and
    waiting, at each end, for a report newer than the one held when it ended."""

    move: Move
    reported: dict[str, float] | None = None


class FreenessRebalancer:
    """Llumnix freeness rebalancing, rate-limited, for a control loop (see the module
    docstring): ``plan`` each tick, ``finished`` when an ordered move ended. Pure: no I/O,
    no clock (``now`` is any monotonic reading, the same clock on every call).

    Load reports lag the moves: until an instance's report is newer than a move's end (or
    while the move is under way), the planner counts the move into that instance's load
    itself (the source without the request's blocks, the destination with them), so the
    next round neither moves a second request for the same shortage nor overfills a
    destination, and need not wait for the report either.
    """

    def __init__(self, config: RebalanceConfig | None = None) -> None:
        self.config = config or RebalanceConfig()
        self._next_round = -math.inf
        self._pending: dict[str, _Pending] = {}
        self._moved_at: dict[str, float] = {}  # request id -> when it was last ordered

    @property
    def in_flight(self) -> list[Move]:
        return [p.move for p in self._pending.values() if p.reported is None]

    def plan(self, now: float, loads: Sequence[InstanceLoad],
             requests: Sequence[RunningRequest],
             busy: frozenset[str] = frozenset()) -> list[Move]:
        """This round's moves (empty between rounds); they count as in flight until
        ``finished``. ``busy`` request ids are migrating for another reason."""
        config = self.config
        if now < self._next_round:
            return []
        self._next_round = now + config.period_s
        self._moved_at = {r: t for r, t in self._moved_at.items() if now - t < config.cooldown_s}
        adjusted = self._adjusted(loads)
        quota = {load.instance_id: config.max_per_source for load in loads}
        for move in self.in_flight:
            quota[move.source] = quota.get(move.source, config.max_per_source) - 1
        moves = rebalance(adjusted, requests, config.threshold, config.max_moves,
                          config.selection, busy | frozenset(self._moved_at),
                          config.max_per_source, quota)
        for move in moves:
            self._pending[move.request_id] = _Pending(move)
            self._moved_at[move.request_id] = now
        return moves

    def _adjusted(self, loads: Sequence[InstanceLoad]) -> list[InstanceLoad]:
        """``loads`` with the moves their reports may not show counted in."""
        report_time = {load.instance_id: load.report_time for load in loads}
        delta: dict[str, tuple[int, int]] = {}  # instance -> (free blocks, running)
        for request_id, pending in list(self._pending.items()):
            move = pending.move
            if pending.reported is not None:
                # An end whose report is newer than the move's end shows it already.
                pending.reported = {end: seen for end, seen in pending.reported.items()
                                    if report_time.get(end, math.inf) <= seen}
                if not pending.reported:
                    del self._pending[request_id]
                    continue
            for end, sign in ((move.source, 1), (move.destination, -1)):
                if pending.reported is None or end in pending.reported:
                    free, running = delta.get(end, (0, 0))
                    delta[end] = (free + sign * move.num_blocks, running - sign)
        if not delta:
            return list(loads)
        return [replace(load, free_blocks=load.free_blocks + delta[load.instance_id][0],
                        num_running=max(0, load.num_running + delta[load.instance_id][1]))
                if load.instance_id in delta else load for load in loads]

    def finished(self, request_id: str, committed: bool,
                 report_times: Mapping[str, float]) -> None:
        """The move of ``request_id`` ended. Committed: each end's load counts it until a
        report newer than ``report_times`` (what the caller holds now) arrives; not
        committed: the request stayed, nothing to count."""
        pending = self._pending.get(request_id)
        if pending is None or pending.reported is not None:
            return
        if not committed:
            del self._pending[request_id]
            return
        move = pending.move
        pending.reported = {end: report_times.get(end, -math.inf)
                            for end in (move.source, move.destination)}


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
        destination = _roomiest(states, frozenset((request.instance_id,)), request.num_blocks,
                                -math.inf)
        source = states.get(request.instance_id)
        if destination is None or source is None:
            stuck.append(request)
            continue
        _apply(states, source, destination, request)
        moves.append(Move(request.request_id, request.instance_id, destination.instance_id,
                          request.num_blocks))
    return moves, stuck


def _roomiest(states: dict[str, _State], excluded: frozenset[str], num_blocks: int,
              threshold: float) -> _State | None:
    """The instance, not ``excluded``, with the most freeness after taking ``num_blocks``
    (ties to the lower id), if that stays above ``threshold``."""
    best: _State | None = None
    best_after = -math.inf
    for state in states.values():
        if not state.accepts or state.instance_id in excluded or state.free < num_blocks:
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
