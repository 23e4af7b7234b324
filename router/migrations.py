"""Live migration ordered by the gateway: by hand (admin API) and to drain replicas.

The protocol itself is ``migration.coordinator`` (reserve, staged pre-copy while the
request keeps decoding, stop-and-copy, commit) between the replicas' migration agents; the
client's stream follows the request through the gateway's stream resumer
(``router.stream_resume``). This module decides *what* to move:

* ``migrate(request_id, target)`` — one request, found in this gateway's streams or in the
  request table, to ``target`` or to the replica with the most free KV blocks per running
  request (Llumnix's freeness);
* drain (a control-loop action on every gateway replica) — while a replica is drained
  (``/admin/instances/{id}/drain``, scale-in), the streams *this* gateway relays from it are
  moved off by ``migration.policy.drain``; each gateway replica knows the streams it relays,
  so together they empty it. Non-streamed requests cannot follow a move and finish in place.
  The drained replica is out of the rings meanwhile (the leader leaves draining replicas out
  of the published membership), so nothing new goes to it.
* freeness rebalancing (``--migration-rebalance on``, a control-loop action on every
  gateway replica, like drain) — Llumnix: the streams this gateway relays from replicas
  whose freeness (free KV blocks per running request, queued demand subtracted) is below
  the threshold move to replicas that stay above it, rate-limited by
  ``migration.policy.FreenessRebalancer`` (a round per period, a few moves per source at a
  time, moves the load reports do not show yet counted in, a cooldown per request); only
  streams that relayed tokens since the previous tick (decoding) are candidates.

Both are ``router.control.ControlAction``s (``plan_moves(now, snapshot)``, pure planning on
the snapshot's load reports) whose moves run through the same path as the admin API's:
``_execute``, in the background, so the control loop keeps refreshing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from migration.coordinator import MigrationCoordinator, MigrationResult
from migration.policy import (
    FreenessRebalancer,
    InstanceLoad,
    Move,
    RebalanceConfig,
    RunningRequest,
    drain,
)
from migration.transport import ChannelPool
from proto.openai import OpenAIError
from proto.registry import InstanceRecord
from router.control import ControlLoop
from router.forward import RequestContext
from router.metrics import GatewayMetrics
from router.policy.interfaces import ClusterSnapshot
from router.state import ClusterStateStore

log = logging.getLogger("llmfleet.migrations")


@dataclass
class MigrationRecord:
    """One migration as the dashboard lists it."""

    request_id: str
    source: str
    target: str
    trigger: str  # "admin" | "drain" | "freeness" (the metrics' reason label)
    state: str = "running"  # running | committed | not_migratable | refused | aborted
    downtime_s: float = 0.0
    total_s: float = 0.0
    bytes: int = 0
    stages: int = 0
    reason: str = ""
    started: float = 0.0


def fleet_loads(snapshot: ClusterSnapshot,
                records: Mapping[str, InstanceRecord]) -> list[InstanceLoad]:
    """Every instance's load as the migration policy reads it, from its last load report:
    free KV blocks, running requests, the blocks its queued prompts will need; it takes
    migrations if healthy, not draining and serving a migration agent."""
    loads = []
    for view in snapshot.instances:
        record = records.get(view.instance_id)
        block_size = max(1, view.block_size)
        loads.append(InstanceLoad(
            view.instance_id, view.free_blocks, view.num_running,
            queued_blocks=-(-view.waiting_prefill_tokens // block_size),
            accepts_migrations=view.healthy and not view.draining
            and record is not None and bool(record.migration),
            report_time=view.report_time))
    return loads


def running_request(ctx: RequestContext, record: InstanceRecord | None) -> RunningRequest:
    """A stream this gateway relays, as the migration policy reads it: the KV blocks its
    prompt and the tokens streamed so far fill, when it started, and whether it can move
    now (its replica has a migration agent and it is decoding: a first token went out)."""
    block_size = max(1, record.block_size) if record is not None else 16
    tokens = len(ctx.routing.token_ids) + ctx.chunks
    return RunningRequest(ctx.request_id, ctx.instance_id, -(-tokens // block_size),
                          ctx.started,
                          migratable=record is not None and bool(record.migration)
                          and ctx.first_token_at is not None)


class GatewayMigrations:
    """Orders live migrations for one gateway replica (see the module docstring)."""

    def __init__(self, store: ClusterStateStore, metrics: GatewayMetrics,
                 records: Callable[[], Mapping[str, InstanceRecord]],
                 snapshot: Callable[[], ClusterSnapshot],
                 streams: Mapping[str, RequestContext],
                 coordinator: MigrationCoordinator | None = None, recent: int = 100,
                 rebalance: RebalanceConfig | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.records = records
        self.snapshot = snapshot
        self.streams = streams
        self.pool = ChannelPool()
        self.coordinator = coordinator or MigrationCoordinator(pool=self.pool)
        self._in_flight: dict[str, MigrationRecord] = {}
        self._recent: deque[MigrationRecord] = deque(maxlen=recent)
        self._tasks: set[asyncio.Task[MigrationRecord]] = set()
        self.drainer = DrainMoves(self)
        # Freeness rebalancing, when on (None: off).
        self.rebalancer = FreenessMoves(self, FreenessRebalancer(rebalance)) \
            if rebalance is not None else None

    def install(self, control: ControlLoop) -> None:
        """Run drain (and freeness rebalancing, when on) in ``control``'s ticks, on every
        gateway replica: each moves the streams it relays."""
        control.add_action("drain", self.drainer, self._order_drain)
        if self.rebalancer is not None:
            control.add_action("rebalance", self.rebalancer, self.rebalancer.order)

    # -- the dashboard's view --------------------------------------------------------------
    def in_flight(self) -> list[MigrationRecord]:
        return list(self._in_flight.values())

    def recent(self) -> list[MigrationRecord]:
        return list(self._recent)

    # -- by hand ---------------------------------------------------------------------------
    async def migrate(self, request_id: str, target: str | None = None) -> dict[str, Any]:
        """Move ``request_id`` to ``target`` (or the roomiest other replica); what the
        admin API answers. ``OpenAIError`` when it cannot even start."""
        ctx = self.streams.get(request_id)
        source = ctx.instance_id if ctx is not None else await self.store.request_instance(
            request_id)
        if source is None:
            raise OpenAIError(f"No running request '{request_id}' is known", 404,
                              param="request_id", code="request_not_found")
        records = self.records()
        source_record = records.get(source)
        if source_record is None or not source_record.migration:
            raise OpenAIError(f"Replica '{source}' serving '{request_id}' cannot export its "
                              "KV cache (no migration agent)", 409, param="request_id",
                              code="source_not_migratable")
        if target is None:
            target = self._roomiest(exclude={source})
            if target is None:
                raise OpenAIError("No other replica can take the request", 409,
                                  param="target", code="no_migration_target")
        target_record = records.get(target)
        if target == source or target_record is None or not target_record.migration:
            raise OpenAIError(f"Replica '{target}' cannot take migrations", 400,
                              param="target", code="bad_migration_target")
        record = self._start(request_id, source_record, target_record, "admin")
        return asdict(await self._execute(record, source_record, target_record))

    def _roomiest(self, exclude: set[str]) -> str | None:
        best, best_freeness = None, float("-inf")
        for load in fleet_loads(self.snapshot(), self.records()):
            if load.instance_id in exclude or not load.accepts_migrations:
                continue
            if load.freeness > best_freeness:
                best, best_freeness = load.instance_id, load.freeness
        return best

    # -- planned moves (drain, freeness) -----------------------------------------------------
    def movable_streams(self, where: Callable[[RequestContext], bool]) -> list[RunningRequest]:
        """The streams this gateway relays that ``where`` accepts, not migrating now."""
        records = self.records()
        return [running_request(ctx, records.get(ctx.instance_id))
                for ctx in list(self.streams.values())
                if where(ctx) and ctx.request_id not in self._in_flight]

    @property
    def busy(self) -> frozenset[str]:
        """Requests being migrated now (for any reason)."""
        return frozenset(self._in_flight)

    async def _order_drain(self, moves: Sequence[Move], now: float) -> None:
        self.order(moves, "drain")

    def order(self, moves: Iterable[Move], trigger: str,
              done: Callable[[Move, bool], None] | None = None) -> None:
        """Start ``moves`` in the background (the admin API's path); ``done(move,
        committed)`` once each has ended, however it ended (also when it could not start)."""
        records = self.records()
        for move in moves:
            source, target = records.get(move.source), records.get(move.destination)
            if source is None or target is None or move.request_id in self._in_flight:
                if done is not None:
                    done(move, False)
                continue
            record = self._start(move.request_id, source, target, trigger)
            task = asyncio.ensure_future(self._execute(record, source, target))
            self._tasks.add(task)
            task.add_done_callback(self._reap)
            if done is not None:
                task.add_done_callback(functools.partial(_call_done, done, move))

    def _reap(self, task: asyncio.Task[MigrationRecord]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("migration task failed", exc_info=task.exception())

    # -- running one -----------------------------------------------------------------------
    def _start(self, request_id: str, source: InstanceRecord, target: InstanceRecord,
               trigger: str) -> MigrationRecord:
        """Note a migration as under way (before it runs: the next tick must see it)."""
        record = MigrationRecord(request_id, source.instance_id, target.instance_id, trigger,
                                 started=time.time())
        self._in_flight[request_id] = record
        self.metrics.migrations_in_flight.inc()
        return record

    async def _execute(self, record: MigrationRecord, source: InstanceRecord,
                       target: InstanceRecord) -> MigrationRecord:
        request_id = record.request_id
        try:
            result: MigrationResult = await self.coordinator.migrate(
                request_id, source.migration, target.migration)
        finally:
            self._in_flight.pop(request_id, None)
            self.metrics.migrations_in_flight.dec()
        record.state = result.status
        record.downtime_s = result.stopped_s
        record.total_s = result.total_s
        record.bytes, record.stages, record.reason = result.bytes, result.stages, result.reason
        outcome = "committed" if result.committed else (
            "aborted" if result.status in ("aborted", "refused") else "failed")
        self.metrics.migrations.labels(outcome=outcome, reason=record.trigger).inc()
        self.metrics.migration_duration.observe(result.total_s)
        if result.committed:
            self.metrics.migration_downtime.observe(result.stopped_s)
        log.info("migration of %s %s -> %s (%s): %s %s", request_id, source.instance_id,
                 target.instance_id, record.trigger, result.status, result.reason)
        self._recent.appendleft(record)
        return record

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.coordinator.close()
        await self.pool.close()


def _call_done(done: Callable[[Move, bool], None], move: Move,
               task: asyncio.Future[MigrationRecord]) -> None:
    committed = not task.cancelled() and task.exception() is None \
        and task.result().state == "committed"
    done(move, committed)


class DrainMoves:
    """Drain as a ``ControlAction``: the streams this gateway relays from draining
    replicas, spread over the others (``migration.policy.drain``)."""

    def __init__(self, migrations: GatewayMigrations) -> None:
        self.migrations = migrations

    def plan_moves(self, now: float, snapshot: ClusterSnapshot) -> list[Move]:
        draining = {v.instance_id for v in snapshot.instances if v.draining}
        if not draining:
            return []
        mine = self.migrations.movable_streams(lambda ctx: ctx.instance_id in draining)
        if not mine:
            return []
        moves, _stuck = drain(sorted(draining),
                              fleet_loads(snapshot, self.migrations.records()), mine)
        return moves


class FreenessMoves:
    """Llumnix freeness rebalancing as a ``ControlAction``: plans with the rate-limited
    ``FreenessRebalancer`` over the streams this gateway relays (those on draining
    replicas are the drain's), and ``order`` runs the moves as ``freeness`` migrations.

    A stream that relayed nothing since the previous tick is not decoding now (preempted
    and waiting to be recomputed, most likely: engines preempt the newest request, the one
    ``last_come`` would pick) and cannot move; it is left out of this round rather than
    tried and refused."""

    def __init__(self, migrations: GatewayMigrations, planner: FreenessRebalancer) -> None:
        self.migrations = migrations
        self.planner = planner
        self._chunks: dict[str, int] = {}  # request id -> chunks relayed at the last tick

    def plan_moves(self, now: float, snapshot: ClusterSnapshot) -> list[Move]:
        streams = self.migrations.streams
        before, self._chunks = self._chunks, {r: ctx.chunks for r, ctx in streams.items()}
        staying = {v.instance_id for v in snapshot.instances if not v.draining}
        requests = self.migrations.movable_streams(
            lambda ctx: ctx.instance_id in staying
            and ctx.chunks > before.get(ctx.request_id, ctx.chunks))
        if not requests:
            return []
        return self.planner.plan(now, fleet_loads(snapshot, self.migrations.records()),
                                 requests, self.migrations.busy)

    async def order(self, moves: Sequence[Move], now: float) -> None:
        self.migrations.order(moves, "freeness", self._finished)

    def _finished(self, move: Move, committed: bool) -> None:
        reports = {v.instance_id: v.report_time for v in self.migrations.snapshot().instances}
        self.planner.finished(move.request_id, committed, reports)
