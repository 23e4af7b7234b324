"""Live migration ordered by the gateway: by hand (admin API) and to drain replicas.

The protocol itself is ``migration.coordinator`` (reserve, staged pre-copy while the
request keeps decoding, stop-and-copy, commit) between the replicas' migration agents; the
client's stream follows the request through the gateway's stream resumer
(``router.stream_resume``). This module decides *what* to move:

* ``migrate(request_id, target)`` — one request, found in this gateway's streams or in the
  request table, to ``target`` or to the replica with the most free KV blocks per running
  request (Llumnix's freeness);
* ``drain_job`` (a control-loop job on every gateway replica) — while a replica is drained
  (``/admin/instances/{id}/drain``, scale-in), the streams *this* gateway relays from it are
  moved off by ``migration.policy.drain``; each gateway replica knows the streams it relays,
  so together they empty it. Non-streamed requests cannot follow a move and finish in place.
  The drained replica is out of the rings meanwhile (the leader leaves draining replicas out
  of the published membership), so nothing new goes to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from migration.coordinator import MigrationCoordinator, MigrationResult
from migration.policy import InstanceLoad, RunningRequest, drain, freeness
from migration.transport import ChannelPool
from proto.openai import OpenAIError
from proto.registry import InstanceRecord
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
    trigger: str  # "admin" | "drain"
    state: str = "running"  # running | committed | not_migratable | refused | aborted
    downtime_s: float = 0.0
    total_s: float = 0.0
    bytes: int = 0
    stages: int = 0
    reason: str = ""
    started: float = 0.0


class GatewayMigrations:
    """Orders live migrations for one gateway replica (see the module docstring)."""

    def __init__(self, store: ClusterStateStore, metrics: GatewayMetrics,
                 records: Callable[[], Mapping[str, InstanceRecord]],
                 snapshot: Callable[[], ClusterSnapshot],
                 streams: Mapping[str, RequestContext],
                 coordinator: MigrationCoordinator | None = None, recent: int = 100) -> None:
        self.store = store
        self.metrics = metrics
        self.records = records
        self.snapshot = snapshot
        self.streams = streams
        self.pool = ChannelPool()
        self.coordinator = coordinator or MigrationCoordinator(pool=self.pool)
        self._in_flight: dict[str, MigrationRecord] = {}
        self._recent: deque[MigrationRecord] = deque(maxlen=recent)

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
        record = await self._run(request_id, source_record, target_record, "admin")
        return asdict(record)

    def _roomiest(self, exclude: set[str]) -> str | None:
        records = self.records()
        best, best_freeness = None, float("-inf")
        for view in self.snapshot().instances:
            record = records.get(view.instance_id)
            if view.instance_id in exclude or not view.healthy or view.draining \
                    or record is None or not record.migration:
                continue
            room = freeness(view.free_blocks, view.num_running)
            if room > best_freeness:
                best, best_freeness = view.instance_id, room
        return best

    # -- draining --------------------------------------------------------------------------
    async def drain_job(self, now: float, leader: bool) -> None:
        snapshot = self.snapshot()
        draining = [v.instance_id for v in snapshot.instances if v.draining]
        if not draining:
            return
        mine = [ctx for ctx in self.streams.values()
                if ctx.instance_id in draining and ctx.request_id not in self._in_flight]
        if not mine:
            return
        records = self.records()
        loads = [InstanceLoad(v.instance_id, v.free_blocks, v.num_running,
                              accepts_migrations=v.healthy and not v.draining
                              and bool(getattr(records.get(v.instance_id), "migration", "")))
                 for v in snapshot.instances]
        running = []
        for ctx in mine:
            record = records.get(ctx.instance_id)
            block_size = record.block_size if record is not None else 16
            running.append(RunningRequest(
                ctx.request_id, ctx.instance_id, len(ctx.routing.token_ids) // block_size,
                ctx.started, migratable=record is not None and bool(record.migration)))
        moves, _stuck = drain(draining, loads, running)
        jobs = []
        for move in moves:
            source, target = records.get(move.source), records.get(move.destination)
            if source is not None and target is not None:
                jobs.append(self._run(move.request_id, source, target, "drain"))
        if jobs:
            await asyncio.gather(*jobs)

    # -- running one -----------------------------------------------------------------------
    async def _run(self, request_id: str, source: InstanceRecord, target: InstanceRecord,
                   trigger: str) -> MigrationRecord:
        record = MigrationRecord(request_id, source.instance_id, target.instance_id, trigger,
                                 started=time.time())
        self._in_flight[request_id] = record
        self.metrics.migrations_in_flight.inc()
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
        self.metrics.migrations.labels(outcome=outcome).inc()
        self.metrics.migration_duration.observe(result.total_s)
        if result.committed:
            self.metrics.migration_downtime.observe(result.stopped_s)
        log.info("migration of %s %s -> %s (%s): %s %s", request_id, source.instance_id,
                 target.instance_id, trigger, result.status, result.reason)
        self._recent.appendleft(record)
        return record

    async def close(self) -> None:
        await self.coordinator.close()
        await self.pool.close()
