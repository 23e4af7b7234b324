"""What the dashboard shows, read from a gateway without slowing it down.

``FleetObserver`` reads only a gateway's public state (``snapshot``, ``records``,
``policy``, ``metrics``, ``is_leader``, ``config``, the admission policy in ``gate``, and
``migrations`` once it exists) and keeps:

* **on the request path**: ``on_decision`` appends one tuple to a bounded deque (the last
  requests, with their ring key for the ring picture). Nothing else runs per request: rates
  and latencies come from the gateway's own Prometheus counters and histograms.
* **once a second** (``tick``): the raw cumulative counters (a few reads), the event log
  (joins, leaves, health changes, drains, epoch bumps, leader changes, failovers, found by
  diffing the snapshot, the records and the leader id against the last tick: O(instances);
  the caller reads the leader id from Redis) and the admission queue lengths (a gauge).
* **only while someone watches** (``build_state``): the aggregation: per-second series of
  request rate, routing decisions by reason and windowed TTFT p50/p99 from the counters'
  deltas, the per-instance table, the ring arcs (recomputed only when membership or
  eligibility changed) and the positions of the last requests' keys.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

from router.admission import ADMISSION_MODES
from router.metrics import ADMISSION_CLASSES, GatewayMetrics
from router.policy.filters.healthy import is_routable
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingPolicy
from router.policy.registry import POLICY_NAMES
from router.policy.ring_keys import KeyedRings

RING_BINS = 720  # arcs are drawn at half-degree resolution
RING_SPACE = 1 << 64  # ring positions and key hashes are 64-bit
RECENT_KEYS = 64  # request keys drawn on the rings
SERIES_POINTS = 120  # seconds of history in the charts
TTFT_WINDOW_S = 10  # TTFT quantiles over the last this many seconds
RATE_WINDOW_S = 10  # per-instance routed rate and prefix hit rate window


class ObservedGateway(Protocol):
    """The part of ``router.gateway.Gateway`` the dashboard reads (and, for the admin
    actions, ``policy`` and ``config`` it sets)."""

    snapshot: ClusterSnapshot
    records: Mapping[str, Any]  # instance id -> proto.registry.InstanceRecord
    policy: RoutingPolicy
    metrics: GatewayMetrics
    config: Any  # router.gateway.GatewayConfig

    @property
    def is_leader(self) -> bool: ...


@dataclass(frozen=True)
class FleetEvent:
    """One line of the event log."""

    t: float  # wall clock, seconds
    kind: str  # join | leave | down | up | drain | undrain | epoch | leader | failover | ...
    message: str
    instance_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "kind": self.kind, "message": self.message,
                "instance": self.instance_id}


@dataclass(frozen=True)
class _Sample:
    """Cumulative counters read at one tick."""

    t: float
    requests: float
    reasons: dict[str, float]
    ttft_buckets: tuple[float, ...]  # cumulative count per bucket bound, +Inf last
    retries: float
    stream_errors: float
    prefix: dict[str, tuple[float, float]]  # instance -> (hits, queries), where reported


@dataclass(frozen=True)
class _InstanceState:
    healthy: bool
    draining: bool


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]
                       ) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding
    rank ``q * total``; None for an empty histogram. ``bounds`` ascend and end with +Inf."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            lower = bounds[i - 1] if i else 0.0
            upper = bounds[i]
            if math.isinf(upper):
                return lower  # past the last finite bound: as Prometheus, its lower edge
            below = cumulative[i - 1] if i else 0.0
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
    return bounds[-2] if len(bounds) > 1 else None


def _counter_totals(metric: Any, label: str | None = None) -> tuple[float, dict[str, float]]:
    """Sum of a counter's ``_total`` samples, and the sums by ``label``."""
    total = 0.0
    by: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            total += sample.value
            if label is not None:
                key = sample.labels.get(label, "")
                by[key] = by.get(key, 0.0) + sample.value
    return total, by


def _histogram_buckets(metric: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(upper bounds, cumulative counts) of an unlabelled histogram."""
    bounds: list[float] = []
    counts: list[float] = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds.append(float(sample.labels["le"]))
                counts.append(sample.value)
    return tuple(bounds), tuple(counts)


class RingPicture:
    """The arcs of a policy's rings, as drawn: ``RING_BINS`` slices per ring, each given to
    the instance a key at its middle goes to now (unroutable owners pass their arcs to the
    next routable member clockwise, as routing does). Recomputed only when the rings'
    membership or the routable set changed."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self.version = 0
        self.payload: dict[str, Any] | None = None

    def update(self, policy: RoutingPolicy, snapshot: ClusterSnapshot) -> dict[str, Any] | None:
        keyed = getattr(policy, "rings", None)
        if not isinstance(keyed, KeyedRings):
            if self._key is not None or self.payload is None:
                self._key = None
                self.version += 1
                self.payload = {"policy": policy.name, "rings": [], "members": [],
                                "bins": RING_BINS}
            return self.payload
        routable = frozenset(v.instance_id for v in snapshot.instances if is_routable(v))
        key = (policy.name, *(id(ring.lookup) for ring in keyed.rings), routable)
        if key == self._key:
            return self.payload
        self._key = key
        self.version += 1
        members = sorted(keyed.rings[0].members)
        slot_of = {name: i for i, name in enumerate(members)}
        rings = []
        for ring in keyed.rings:
            mask = ring.eligibility_mask(routable)
            names = ring.names
            owners: list[int] = []
            for b in range(RING_BINS):
                slot = ring.lookup.first(((2 * b + 1) * RING_SPACE) // (2 * RING_BINS), mask) \
                    if len(ring) else -1
                owners.append(slot_of[names[slot]] if slot >= 0 else -1)
            arcs: list[list[int]] = []  # [first bin, bins, owner index]
            for b, owner in enumerate(owners):
                if arcs and arcs[-1][2] == owner:
                    arcs[-1][1] += 1
                else:
                    arcs.append([b, 1, owner])
            shares = Counter(o for o in owners if o >= 0)
            rings.append({"seed": f"{ring.seed:#018x}", "arcs": arcs,
                          "share": {members[i]: n / RING_BINS for i, n in shares.items()}})
        self.payload = {"policy": policy.name, "members": members, "bins": RING_BINS,
                        "rings": rings}
        return self.payload


class FleetObserver:
    """Keeps what the dashboard shows (see the module docstring)."""

    def __init__(self, gateway: ObservedGateway, *, recent: int = 4096, events: int = 500,
                 history: int = 300, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.gateway = gateway
        self._clock = clock
        self._wall = wall
        # (monotonic time, request id, the decision, its ring key hash or -1)
        self._decisions: deque[tuple[float, str, Decision, int]] = deque(maxlen=recent)
        self._record = self._decisions.append
        self._samples: deque[_Sample] = deque(maxlen=history)
        self.events: deque[FleetEvent] = deque(maxlen=events)
        self._instances: dict[str, _InstanceState] | None = None
        self._epoch: int | None = None
        self._leader: str | None = None
        self._leader_known = False
        self._is_leader: bool | None = None
        self._policy_name: str | None = None
        # Derived chart points (t, requests/s, decisions/s by reason, TTFT p50, TTFT p99).
        self._points: deque[tuple[float, float, dict[str, float], float | None,
                                  float | None]] = deque(maxlen=SERIES_POINTS)
        self.rings = RingPicture()
        self.ticks = 0
        # The policy's prepared-prompt memo (where the ring key of a request being routed
        # is), looked up once per tick rather than once per decision.
        self._prepared: Mapping[str, Any] | None = None
        self._prepared_of: RoutingPolicy | None = None

    # -- the request path ---------------------------------------------------------------
    def on_decision(self, request_id: str, decision: Decision) -> None:
        """The gateway routed ``request_id``: O(1), one append to a bounded deque.

        The ring key is taken from the policy's prepared prompt while it is still held
        (between ``route`` and ``on_dispatched``), so it costs no hashing here.
        """
        prepared = self._prepared
        entry = prepared.get(request_id) if prepared is not None else None
        key = entry.key[0] if entry is not None and entry.key is not None else -1
        self._record((self._clock(), request_id, decision, key))

    # -- once a second --------------------------------------------------------------------
    def note(self, kind: str, message: str, instance_id: str | None = None) -> None:
        """Add an event that was not found by diffing (an operator's action)."""
        self.events.append(FleetEvent(self._wall(), kind, message, instance_id))

    def tick(self, leader: str | None = None, leader_known: bool = False) -> None:
        """Sample the counters and log what changed since the last tick. ``leader``: the
        leader id read from Redis (``leader_known`` False when it could not be read)."""
        gateway = self.gateway
        now = self._wall()
        if gateway.policy is not self._prepared_of:
            self._prepared_of = gateway.policy
            self._prepared = getattr(gateway.policy, "_prepared", None)
        metrics = gateway.metrics
        requests, _ = _counter_totals(metrics.requests)
        _, reasons = _counter_totals(metrics.decisions, "reason")
        _, ttft = _histogram_buckets(metrics.ttft)
        retries, _ = _counter_totals(metrics.retries)
        stream_errors, _ = _counter_totals(metrics.stream_errors)
        prefix: dict[str, tuple[float, float]] = {}
        for instance_id, record in gateway.records.items():
            load = record.load or {}
            if "prefix_cache_queries" in load:
                prefix[instance_id] = (float(load.get("prefix_cache_hits", 0.0)),
                                       float(load["prefix_cache_queries"]))
        previous = self._samples[-1] if self._samples else None
        self._samples.append(_Sample(now, requests, reasons, ttft, retries, stream_errors,
                                     prefix))
        self._diff(gateway, previous, now, leader, leader_known)
        self._sample_queues()
        self.ticks += 1

    def _diff(self, gateway: ObservedGateway, previous: _Sample | None, now: float,
              leader: str | None, leader_known: bool) -> None:
        add = self.events.append
        snapshot = gateway.snapshot
        current = {v.instance_id: _InstanceState(v.healthy, v.draining)
                   for v in snapshot.instances}
        if self._instances is None:
            if current:
                add(FleetEvent(now, "observe", f"watching {len(current)} instances at ring "
                                               f"epoch {snapshot.epoch}"))
        else:
            old = self._instances
            for instance_id, state in current.items():
                before = old.get(instance_id)
                if before is None:
                    add(FleetEvent(now, "join", f"{instance_id} joined", instance_id))
                    if state.draining:
                        add(FleetEvent(now, "drain", f"{instance_id} is draining", instance_id))
                    continue
                if before.healthy and not state.healthy:
                    add(FleetEvent(now, "down", f"{instance_id} stopped heartbeating",
                                   instance_id))
                elif state.healthy and not before.healthy:
                    add(FleetEvent(now, "up", f"{instance_id} is back", instance_id))
                if state.draining and not before.draining:
                    add(FleetEvent(now, "drain", f"{instance_id} is draining", instance_id))
                elif before.draining and not state.draining:
                    add(FleetEvent(now, "undrain", f"{instance_id} takes requests again",
                                   instance_id))
            for instance_id in old.keys() - current.keys():
                add(FleetEvent(now, "leave", f"{instance_id} left the fleet", instance_id))
        self._instances = current
        if self._epoch is not None and snapshot.epoch != self._epoch:
            add(FleetEvent(now, "epoch", f"ring epoch {self._epoch} → {snapshot.epoch} "
                                         f"({len(current)} members)"))
        self._epoch = snapshot.epoch
        if leader_known:
            if self._leader_known and leader != self._leader:
                add(FleetEvent(now, "leader", f"leader {self._leader or 'none'} → "
                                              f"{leader or 'none'}"))
            self._leader, self._leader_known = leader, True
        if self._is_leader is not None and gateway.is_leader != self._is_leader:
            add(FleetEvent(now, "leader", f"this gateway ({gateway.config.gateway_id}) "
                                          + ("became leader" if gateway.is_leader
                                             else "is no longer leader")))
        self._is_leader = gateway.is_leader
        if self._policy_name is not None and gateway.policy.name != self._policy_name:
            add(FleetEvent(now, "policy", f"routing policy {self._policy_name} → "
                                          f"{gateway.policy.name}"))
        self._policy_name = gateway.policy.name
        if previous is not None:
            sample = self._samples[-1]
            retried = sample.retries - previous.retries
            if retried > 0:
                add(FleetEvent(now, "failover", f"{retried:.0f} request(s) failed over to "
                                                "another replica"))
            broken = sample.stream_errors - previous.stream_errors
            if broken > 0:
                add(FleetEvent(now, "failover", f"{broken:.0f} stream(s) broke mid-stream"))

    # -- only while watched -----------------------------------------------------------------
    def build_state(self, include_rings: bool = True) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready data."""
        gateway = self.gateway
        now_mono = self._clock()
        snapshot = gateway.snapshot
        rings = self.rings.update(gateway.policy, snapshot)
        state: dict[str, Any] = {
            "t": self._wall(),
            "gateway_id": gateway.config.gateway_id,
            "is_leader": gateway.is_leader,
            "leader": self._leader,
            "epoch": snapshot.epoch,
            "policy": gateway.policy.name,
            "policies": list(POLICY_NAMES),
            "slo_ttft_s": gateway.config.slo_ttft_s,
            "instances": self._instance_rows(snapshot, now_mono),
            "series": self._series(),
            "recent": self._recent(now_mono),
            "admission": self._admission(),
            "migrations": self._migrations(),
            "events": [e.to_json() for e in list(self.events)[-200:]],
            "rings_version": self.rings.version,
        }
        if include_rings:
            state["rings"] = rings
        return state

    def _instance_rows(self, snapshot: ClusterSnapshot, now_mono: float) -> list[dict[str, Any]]:
        records = self.gateway.records
        decisions = list(self._decisions)
        since = bisect.bisect_left(decisions, now_mono - RATE_WINDOW_S, key=itemgetter(0))
        routed = Counter(d[2].instance_id for d in decisions[since:])
        window = self._window_start(RATE_WINDOW_S)
        last = self._samples[-1] if self._samples else None
        wall = self._wall()
        queued = self._queued_by_instance()
        rows = []
        for view in snapshot.instances:
            record = records.get(view.instance_id)
            hit_rate = None
            if last is not None and view.instance_id in last.prefix:
                hits, queries = last.prefix[view.instance_id]
                if window is not None and view.instance_id in window.prefix:
                    old_hits, old_queries = window.prefix[view.instance_id]
                    if queries > old_queries:
                        hits, queries = hits - old_hits, queries - old_queries
                hit_rate = hits / queries if queries > 0 else None
            rows.append({
                "id": view.instance_id,
                "url": view.url,
                "api": getattr(record, "api", None),
                "model": getattr(record, "model", None),
                "healthy": view.healthy,
                "draining": view.draining,
                "routable": is_routable(view),
                "weight": view.weight,
                "running": view.num_running,
                "waiting": view.num_waiting,
                "kv_usage": view.kv_usage,
                "prefix_hit_rate": hit_rate,
                "report_age_s": (wall - view.report_time) if view.report_time else None,
                "routed_per_s": routed.get(view.instance_id, 0) / RATE_WINDOW_S,
                "queued": queued.get(view.instance_id) if queued is not None else None,
            })
        return rows

    def _window_start(self, seconds: float) -> _Sample | None:
        """The sample about ``seconds`` before the newest one."""
        samples = self._samples
        if len(samples) < 2:
            return None
        return samples[max(0, len(samples) - 1 - int(seconds))]

    def _series(self) -> dict[str, Any]:
        """Per-second points from consecutive samples: request rate, decisions by reason,
        TTFT p50/p99 over the last ``TTFT_WINDOW_S`` seconds. A point depends only on its
        samples, so each is derived once (on the first build that needs it) and kept."""
        samples = self._samples
        points = self._points
        bounds, _ = _histogram_buckets(self.gateway.metrics.ttft)
        done = points[-1][0] if points else -math.inf
        first = max(1, len(samples) - SERIES_POINTS)
        for i in range(first, len(samples)):
            b = samples[i]
            if b.t <= done:
                continue
            a = samples[i - 1]
            dt = max(b.t - a.t, 1e-6)
            reasons = {name: max(0.0, (value - a.reasons.get(name, 0.0)) / dt)
                       for name, value in b.reasons.items()}
            start = samples[max(0, i - TTFT_WINDOW_S)]
            if len(start.ttft_buckets) == len(b.ttft_buckets):
                delta = [x - y for x, y in zip(b.ttft_buckets, start.ttft_buckets, strict=True)]
            else:
                delta = list(b.ttft_buckets)
            points.append((b.t, max(0.0, (b.requests - a.requests) / dt), reasons,
                           histogram_quantile(0.5, bounds, delta),
                           histogram_quantile(0.99, bounds, delta)))
        names = sorted({name for point in points for name in point[2]})
        return {"t": [p[0] for p in points], "rps": [p[1] for p in points],
                "reasons": {name: [p[2].get(name, 0.0) for p in points] for name in names},
                "ttft_p50": [p[3] for p in points], "ttft_p99": [p[4] for p in points],
                "ttft_window_s": TTFT_WINDOW_S}

    def _recent(self, now_mono: float) -> list[dict[str, Any]]:
        rows = []
        for when, request_id, decision, key in list(self._decisions)[-RECENT_KEYS:]:
            rows.append({"id": request_id, "instance": decision.instance_id,
                         "reason": decision.reason, "candidates": list(decision.candidates),
                         "age_s": now_mono - when,
                         "position": key / RING_SPACE if key >= 0 else None})
        return rows

    def _admission_object(self) -> Any:
        """The gateway's admission policy (``gateway.gate.admission``), or None."""
        gate = getattr(self.gateway, "gate", None)
        return getattr(gate, "admission", None)

    def admission_mode(self) -> str:
        """The gateway's admission mode (``none``: forwarded as soon as routed)."""
        admission = self._admission_object()
        return "none" if admission is None else str(admission.mode)

    def _queued_by_instance(self) -> dict[str, int] | None:
        admission = self._admission_object()
        if admission is None or admission.mode == "none":
            return None
        return dict(Counter(q.instance_id for q in admission.queued()))

    def _sample_queues(self) -> None:
        """Queue lengths by class into ``llmfleet_admission_queued_requests`` (1 Hz)."""
        admission = self._admission_object()
        queued = admission.counters().get("queued", {}) if admission is not None else {}
        gauge = self.gateway.metrics.queue_length
        for klass in ADMISSION_CLASSES:
            gauge.labels(queue=klass).set(float(queued.get(klass, 0)))

    def _admission(self) -> dict[str, Any]:
        admission = self._admission_object()
        mode = "none" if admission is None else str(admission.mode)
        state: dict[str, Any] = {"enabled": mode != "none", "mode": mode,
                                 "modes": list(ADMISSION_MODES)}
        if admission is not None and mode != "none":
            counters = admission.counters()
            state["queued"] = _jsonable(counters.get("queued", {}))
            state["counters"] = _jsonable(counters)
        return state

    def _migrations(self) -> dict[str, Any]:
        migrations = getattr(self.gateway, "migrations", None)
        if migrations is None:
            return {"enabled": False, "in_flight": [], "recent": []}
        return {"enabled": True, "in_flight": _jsonable(migrations.in_flight()),
                "recent": _jsonable(migrations.recent())}


def _jsonable(value: Any) -> Any:
    """Plain JSON data from counters and records (dataclasses, tuples, mappings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
