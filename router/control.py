"""The gateway's control loop, apart from the request path.

Every gateway replica runs one: it re-reads the registry (the replicas' records and load
reports) and the ring, adopts the new snapshot into the routing policy (the O(instances)
work happens here, never in a request's decision), keeps the KV-event subscriptions in step
with the fleet, and writes the request table to Redis in batches. One replica at a time is
the leader (a lease in Redis, taken over within ``leader_lease_s`` when the leader dies):
it publishes ring membership, and runs the leader-only jobs that later work plugs in
through ``add_job``.

Moves share one interface, ``ControlAction``: ``plan_moves(now, snapshot)`` plans from the
snapshot and changes nothing; the caller carries the plan out. Admission's hotspot
rebalancer plans moves of router-queued requests (applied through ``Admission.move``);
``router.migrations`` plans live migrations of running ones (drain, freeness rebalancing),
run here with ``add_action(name, action, apply)``.

Nothing here runs per request: a request reads the snapshot this loop last built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from proto.registry import InstanceRecord
from router.policy.interfaces import ClusterSnapshot
from router.state import ClusterStateStore, snapshot_from_records

log = logging.getLogger("llmfleet.control")

# A job gets the loop's clock reading and whether this replica leads.
Job = Callable[[float, bool], Awaitable[None]]

MoveT = TypeVar("MoveT")
MoveT_co = TypeVar("MoveT_co", covariant=True)


class ControlAction(Protocol[MoveT_co]):
    """What the control loop runs each period: plans moves from the snapshot, changes
    nothing itself (the moves are applied by the caller: ``Admission.move`` for queued
    requests, live migration for running ones)."""

    def plan_moves(self, now: float, snapshot: ClusterSnapshot) -> Sequence[MoveT_co]: ...


@dataclass
class _JobEntry:
    name: str
    job: Job
    leader_only: bool


class ControlLoop:
    """Registry refresh, leader lease, ring publishing and periodic jobs for one gateway."""

    def __init__(self, store: ClusterStateStore, replica_id: str, clock: Callable[[], float],
                 on_snapshot: Callable[[ClusterSnapshot, dict[str, InstanceRecord]], None],
                 interval_s: float, leader_lease_s: float) -> None:
        self.store = store
        self.replica_id = replica_id
        self.clock = clock
        self.on_snapshot = on_snapshot
        self.interval_s = interval_s
        self.leader_lease_s = leader_lease_s
        self.is_leader = False
        self.leader_changes = 0
        self._jobs: list[_JobEntry] = []
        self._pending_requests: list[tuple[str, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.first_refresh = asyncio.Event()
        self.snapshot = ClusterSnapshot(epoch=0, instances=())  # the last one built

    # -- jobs ---------------------------------------------------------------------------
    def add_job(self, name: str, job: Job, leader_only: bool = False) -> None:
        """Run ``job(now, is_leader)`` after each refresh (only on the leader if asked)."""
        self._jobs.append(_JobEntry(name, job, leader_only))

    def add_action(self, name: str, action: ControlAction[MoveT],
                   apply: Callable[[Sequence[MoveT], float], Awaitable[None]],
                   leader_only: bool = False) -> None:
        """Each tick, plan with ``action`` on the last snapshot and ``apply(moves, now)``
        what it planned (not called when nothing was)."""
        async def job(now: float, leader: bool) -> None:
            moves = action.plan_moves(now, self.snapshot)
            if moves:
                await apply(moves, now)

        self.add_job(name, job, leader_only)

    def note_request(self, request_id: str, instance_id: str) -> None:
        """Queue a request-table entry; written with the next tick, not per request."""
        self._pending_requests.append((request_id, instance_id))

    # -- running --------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            # The flag, not only the cancel: redis-py can swallow a CancelledError that lands
            # inside a command, and the loop would then run on forever.
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush_requests()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except Exception as exc:  # Redis away: keep routing on the last view
                log.warning("control loop tick failed: %s", exc)
            self.first_refresh.set()
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        """One round: refresh, lead, publish, flush the request table, run the jobs."""
        await self.refresh()
        await self.flush_requests()
        now = self.clock()
        for entry in self._jobs:
            if entry.leader_only and not self.is_leader:
                continue
            try:
                await entry.job(now, self.is_leader)
            except Exception:
                log.exception("control job %s failed", entry.name)

    async def refresh(self) -> None:
        """Re-read the registry; the leader also publishes ring membership (new epoch)."""
        live = await self.store.live_instances()
        leading = await self.store.try_lead(self.replica_id, self.leader_lease_s)
        if leading != self.is_leader:
            self.leader_changes += 1
            log.info("gateway %s %s the control-loop lease", self.replica_id,
                     "took" if leading else "lost")
        self.is_leader = leading
        if leading:
            # A drained replica leaves the rings (its arcs pass to the others) until it is
            # taken back; it stays in the registry and finishes what it has.
            await self.store.publish_ring([(r.instance_id, r.weight) for r in live
                                           if not (r.load or {}).get("draining")])
        epoch, members = await self.store.ring()
        records = {r.instance_id: r for r in live}
        self.snapshot = snapshot_from_records(epoch, members, live)
        self.on_snapshot(self.snapshot, records)

    async def flush_requests(self) -> None:
        if not self._pending_requests:
            return
        pending, self._pending_requests = self._pending_requests, []
        await self.store.record_requests(pending)
