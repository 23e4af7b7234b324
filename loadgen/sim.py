"""Discrete-event simulator: N reference-engine cores and one routing policy on a virtual clock.

The simulator runs the gateway's policy objects unchanged and the engine core with its
``emulated`` executor; only the clock is virtual. Events sit in a heap ordered by
(time, kind, sequence number) and are processed in time order:

* ``ARRIVAL`` — a request reaches the router at its trace time. The router builds a
  ``ClusterSnapshot`` from each core's ``stats()`` (the fields an instance's load report
  carries; with ``report_interval_s > 0`` a view is refreshed only when it is that old, as
  periodic load reports would be), calls ``policy.route`` then ``policy.on_dispatched``,
  and hands the request to the chosen core (after ``dispatch_delay_s``, if any).
* ``DISPATCH`` — the request enters the core (``add_request``). An idle core starts a step.
* ``STEP_DONE`` — a core that called ``step(t)`` and was told the iteration lasts ``d`` is
  busy until ``t + d``; at that time the step's token events are delivered (first token →
  ``policy.on_first_token``, finish → ``policy.on_finished``) and, if the core still has
  unfinished requests, its next step starts at once.

At equal times, finished steps are handled before dispatches and arrivals, so a request
arriving exactly when a step ends sees the post-step load.

The run ends when every request has finished (or, with ``early_stop_attainment``, as soon as
more measured requests missed the TTFT SLO than that attainment allows — capacity search
uses it to skip the rest of an overloaded run). Everything is deterministic given the config:
the same seed gives the same JSON except ``wall_seconds``.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from instances.engine.core import EngineCore, InsufficientKVBlocks
from instances.engine.types import (
    EngineRequest,
    EngineStats,
    KVBlockCopy,
    SamplingParams,
    StepResult,
)
from loadgen.config import RunConfig, load_workload, warmup_count
from loadgen.metrics import (
    FOLLOWUP_FIELDS,
    RequestOutcome,
    followup_colocation,
    imbalance,
    percentile,
    summarize,
)
from loadgen.request import TraceRequest
from migration.coordinator import MigrationConfig
from migration.policy import FreenessRebalancer, Move, RebalanceConfig, RunningRequest
from proto.registry import InstanceRecord
from router.admission import Admission, Release, admission_defaults, build_admission
from router.admission.decide import route as route_admitted
from router.admission.rebalancer import HotspotRebalancer, apply_moves, supports_rebalancing
from router.migrations import fleet_loads
from router.policy.interfaces import (
    ClusterSnapshot,
    InstanceView,
    NoInstanceAvailable,
    RoutingPolicy,
    RoutingRequest,
)

_STEP_DONE = 0
_WAKE = 1
_DISPATCH = 2
_ARRIVAL = 3
_TICK = 4  # an admission deadline (batching window, aging, bounded wait)
_CONTROL = 5  # a period of the control loop (hotspot rebalancing of queued requests)
_MIGRATE = 6  # a round of freeness rebalancing (live migration of running requests)
_COPIED = 7  # a migration's copy (a pre-copy stage or the stop-and-copy) has arrived

# Control messages of one stop-and-copy (suspend, commit), on top of the copy itself.
MIGRATION_HANDOFF_RTT_S = 0.001

# Control-loop period of the simulated gateway (rebalancing of router-queued requests).
CONTROL_INTERVAL_S = 0.1

# A core with unfinished requests may return an empty step (e.g. holding short prefills for
# a batching window); it is stepped again after this much virtual time.
_IDLE_POLL_S = 0.002
# ...but not forever: after this many empty steps in a row it stays idle until a dispatch.
_MAX_EMPTY_STEPS = 5000


class EngineCoreLike(Protocol):
    """What the simulator needs of an engine core (``instances.engine`` provides it)."""

    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self, now: float) -> StepResult: ...

    def stats(self) -> EngineStats: ...

    def has_unfinished_requests(self) -> bool: ...


EngineFactory = Callable[[str, int, RunConfig], EngineCoreLike]
PolicyFactory = Callable[[RunConfig], RoutingPolicy]


def default_engine_factory(instance_id: str, index: int, config: RunConfig) -> EngineCoreLike:
    """A reference engine core with the emulated executor and ``config.profile``."""
    from instances.engine.factory import build_engine_core

    core: EngineCoreLike = build_engine_core(
        executor="emulated", profile=config.profile, seed=config.seed + index,
        **config.engine_params,
    )
    return core


def fleet_policy_params(config: RunConfig) -> dict[str, Any]:
    """Parameters a policy should get from the simulated fleet itself (the same derivation
    the gateway uses, ``router.fleet_params``): the run's TTFT SLO, the profile's prefill
    cost per token, the engine's KV capacity and block size."""
    from instances.engine.config import EngineConfig
    from router.fleet_params import fleet_policy_params as derive

    engine = EngineConfig(**config.engine_params)
    return derive(config.slo_ttft_s, config.profile, engine.num_gpu_blocks, engine.block_size)


def default_policy_factory(config: RunConfig) -> RoutingPolicy:
    """The gateway's policy ``config.policy``: ``fleet_policy_params`` for the parameters
    the policy accepts, overridden by ``config.policy_params``."""
    from router.fleet_params import build_fleet_policy

    return build_fleet_policy(config.policy, fleet_policy_params(config), config.policy_params)


def default_admission_factory(config: RunConfig) -> Admission:
    """The admission object of ``config.admission``: ``admission_defaults`` for the run's
    SLO and the engine's iteration size, overridden by ``config.admission_params``."""
    if config.admission == "none":
        return build_admission("none", **config.admission_params)
    from instances.engine.config import EngineConfig

    engine = EngineConfig(**config.engine_params)
    params = admission_defaults(config.slo_ttft_s, engine.max_num_batched_tokens)
    params.update(config.admission_params)
    return build_admission(config.admission, **params)


def view_from_stats(instance_id: str, stats: EngineStats, now: float) -> InstanceView:
    """The router's view of an instance whose load report carried ``stats`` at ``now``."""
    return InstanceView(
        instance_id=instance_id,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        waiting_prefill_tokens=stats.waiting_prefill_tokens,
        kv_usage=stats.kv_usage,
        free_blocks=stats.free_blocks,
        total_blocks=stats.total_blocks,
        block_size=stats.block_size,
        report_time=now,
    )


@dataclass
class InstanceAccount:
    """Work one simulated instance did."""

    instance_id: str
    core: EngineCoreLike
    busy: bool = False
    busy_s: float = 0.0
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    requests: int = 0
    empty_steps: int = 0
    wake_token: int = 0
    pending: StepResult | None = None
    view: InstanceView | None = None
    # Migrations out of this instance whose stop-and-copy waits for its step to end.
    handoffs: list[_Migration] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        stats = self.core.stats()
        return {
            "instance_id": self.instance_id,
            "requests": self.requests,
            "busy_s": round(self.busy_s, 6),
            "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "preemptions": stats.num_preemptions,
        }


@dataclass
class _Migration:
    """One live migration under way (``Simulator`` drives the engine cores' migration
    calls the way ``migration.agent`` / ``instances.migration_adapter`` do)."""

    move: Move
    key: str  # the reservation's key on the target
    source: InstanceAccount
    target: InstanceAccount
    started: float
    sent: int = 0  # full blocks already imported on the target
    stages: int = 0  # pre-copy stages done
    seconds_per_block: float = 0.0  # pace of the last pre-copy stage
    pinned: list[int] = field(default_factory=list)  # block hashes pinned on the target
    stopped_at: float | None = None  # when the stop-and-copy suspended the request


@dataclass
class MigrationCounters:
    """What live migration did in a run (``summary["migration"]``)."""

    started: int = 0
    committed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    bytes: int = 0
    downtime_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started, "committed": self.committed,
            "failed": dict(sorted(self.failed.items())),
            "blocks": self.blocks, "gbytes": round(self.bytes / 1e9, 3),
            "downtime_p50_s": _round(percentile(self.downtime_s, 50)),
            "downtime_max_s": _round(max(self.downtime_s, default=None)),
            "total_p50_s": _round(percentile(self.total_s, 50)),
        }


@dataclass
class SimResult:
    """Raw outcome of a simulation (``summary`` turns it into the common JSON)."""

    outcomes: list[RequestOutcome]
    instances: list[InstanceAccount]
    end_time_s: float
    early_stopped: bool
    wall_seconds: float
    decisions: dict[str, int] = field(default_factory=dict)
    admission: dict[str, Any] = field(default_factory=dict)
    rebalance: bool = False
    # Follow-up co-location (loadgen.metrics.followup_colocation) of the run's sessions.
    followup: dict[str, Any] = field(default_factory=dict)
    migration: dict[str, Any] | None = None  # MigrationCounters.as_dict(), when on


class Simulator:
    """Replays ``requests`` against ``config.instances`` cores routed by one policy."""

    def __init__(
        self,
        config: RunConfig,
        requests: Sequence[TraceRequest],
        *,
        engine_factory: EngineFactory = default_engine_factory,
        policy_factory: PolicyFactory = default_policy_factory,
        early_stop_attainment: float | None = None,
        admission_factory: Callable[[RunConfig], Admission] = default_admission_factory,
        control_interval_s: float = CONTROL_INTERVAL_S,
    ) -> None:
        if config.instances <= 0:
            raise ValueError("need at least one instance")
        self.config = config
        self.requests = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
        self.policy = policy_factory(config)
        self.admission = admission_factory(config)
        self.queueing = config.admission != "none"
        rebalance = config.rebalance
        if rebalance is None:
            rebalance = self.queueing and supports_rebalancing(self.policy)
        if rebalance and not (self.queueing and supports_rebalancing(self.policy)):
            raise ValueError(f"rebalancing needs admission queues and a policy that plans "
                             f"moves (dualmap); got admission {config.admission!r}, "
                             f"policy {config.policy!r}")
        self.rebalancer = (HotspotRebalancer(self.admission, self.policy)  # type: ignore[arg-type]
                           if rebalance else None)
        self.control_interval_s = control_interval_s
        self._tick_at: float | None = None
        self._control_at: float | None = None
        self._released: set[str] = set()
        self._last_snapshot: ClusterSnapshot | None = None
        width = max(2, len(str(config.instances - 1)))
        self.accounts = [
            InstanceAccount(instance_id=f"i{idx:0{width}d}",
                            core=engine_factory(f"i{idx:0{width}d}", idx, config))
            for idx in range(config.instances)
        ]
        self.by_id = {a.instance_id: a for a in self.accounts}
        self.outcomes = {
            r.request_id: RequestOutcome(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
            for r in self.requests
        }
        if len(self.outcomes) != len(self.requests):
            raise ValueError("request ids must be unique")
        self.warmup = warmup_count(config, len(self.requests))
        self.measured_ids = {r.request_id for r in self.requests[self.warmup:]}
        self.early_stop_attainment = early_stop_attainment
        self.allowed_misses = (
            None if early_stop_attainment is None
            else (1.0 - early_stop_attainment) * len(self.measured_ids)
        )
        self.misses = 0
        self.decisions: dict[str, int] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._routing: dict[str, RoutingRequest] = {}
        self._trace = {r.request_id: r for r in self.requests}
        # Live migration (config.migration): where each dispatched, unfinished request runs
        # now, the moves under way, the blocks pinned for migrated-in requests.
        self._where: dict[str, InstanceAccount] = {}
        self._migrations: dict[str, _Migration] = {}
        self._pins: dict[str, tuple[InstanceAccount, list[int]]] = {}
        self.migration_counters = MigrationCounters()
        self.migrator: FreenessRebalancer | None = None
        if config.migration:
            from instances.engine.config import EngineConfig
            from instances.engine.factory import load_profile

            if config.migration_gbytes_per_s <= 0:
                raise ValueError("migration_gbytes_per_s must be positive")
            self.migrator = FreenessRebalancer(
                RebalanceConfig.from_params(config.migration_params))
            self.migration_config = MigrationConfig()
            block_size = EngineConfig(**config.engine_params).block_size
            self.seconds_per_block = (load_profile(config.profile).kv_bytes_per_token
                                      * block_size / (config.migration_gbytes_per_s * 1e9))
            self.bytes_per_block = load_profile(config.profile).kv_bytes_per_token * block_size
            # Every simulated instance serves a migration agent (fleet_loads reads that).
            self._records = {a.instance_id: InstanceRecord(a.instance_id, "", "",
                                                           block_size=block_size,
                                                           migration="sim")
                             for a in self.accounts}

    # -- event plumbing -------------------------------------------------------------------
    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, kind, self._seq, payload))

    def _snapshot(self, now: float) -> ClusterSnapshot:
        interval = self.config.report_interval_s
        views = []
        for account in self.accounts:
            if account.view is None or now - account.view.report_time >= interval:
                account.view = view_from_stats(account.instance_id, account.core.stats(), now)
            views.append(account.view)
        self._last_snapshot = ClusterSnapshot(epoch=0, instances=tuple(views))
        return self._last_snapshot

    def _start_step(self, account: InstanceAccount, now: float) -> None:
        result = account.core.step(now)
        if result.duration_s <= 0 and not result.events:
            account.busy = False  # nothing runnable now; a dispatch or a wake-up retries
            account.empty_steps += 1
            account.wake_token += 1
            if account.core.has_unfinished_requests() and account.empty_steps <= _MAX_EMPTY_STEPS:
                self._push(now + _IDLE_POLL_S, _WAKE, (account, account.wake_token))
            return
        account.empty_steps = 0
        account.busy = True
        account.pending = result
        account.busy_s += max(0.0, result.duration_s)
        account.steps += 1
        account.prefill_tokens += result.num_prefill_tokens
        account.decode_tokens += result.num_decode_seqs
        self._push(now + max(0.0, result.duration_s), _STEP_DONE, account)

    # -- handlers -----------------------------------------------------------------------
    def _on_arrival(self, request: TraceRequest, now: float) -> None:
        outcome = self.outcomes[request.request_id]
        limit = self.config.max_model_len
        if limit is not None and request.prompt_len + request.output_len > limit:
            outcome.error = "context_length_exceeded"  # the replica's HTTP 400
            self._count_miss(request.request_id)
            return
        routing = RoutingRequest(request.request_id, request.token_ids(), request.output_len)
        try:
            if self.queueing:
                decision = route_admitted(self.policy, self.admission, routing,
                                          self._snapshot(now), now)
            else:
                decision = self.policy.route(routing, self._snapshot(now), now)
        except NoInstanceAvailable as exc:
            outcome.error = f"no instance: {exc}"
            self._count_miss(request.request_id)
            return
        if decision.instance_id not in self.by_id:
            raise RuntimeError(f"policy chose unknown instance {decision.instance_id!r}")
        self.policy.on_dispatched(routing, decision, now)
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        self._routing[request.request_id] = routing
        self._forward(self.admission.submit(routing, decision, now), now)

    def _forward(self, releases: list[Release], now: float) -> None:
        """Send released requests to their instances; keep the admission's timer and the
        control loop scheduled while anything is queued."""
        for release in releases:
            rid = release.request_id
            if rid in self._released:
                raise RuntimeError(f"request {rid!r} released twice")
            self._released.add(rid)
            self.outcomes[rid].instance_id = release.instance_id
            self._push(now + self.config.dispatch_delay_s, _DISPATCH, self._trace[rid])
        if not self.queueing:
            return
        deadline = self.admission.next_deadline()
        if deadline is not None and (self._tick_at is None or deadline < self._tick_at):
            self._tick_at = deadline
            self._push(deadline, _TICK, deadline)
        if (self.rebalancer is not None and self._control_at is None
                and len(self._routing) > len(self._released)):
            self._control_at = now + self.control_interval_s
            self._push(self._control_at, _CONTROL, self._control_at)

    def _on_tick(self, when: float, now: float) -> None:
        if when != self._tick_at:
            return  # superseded by an earlier deadline
        self._tick_at = None
        self._forward(self.admission.tick(now), now)

    def _on_control(self, now: float) -> None:
        self._control_at = None
        assert self.rebalancer is not None
        # The control loop works on the last snapshot the router took (as the gateway's loop
        # uses its last refresh): the policy already adopted it, so planning rebuilds nothing.
        snapshot = self._last_snapshot or self._snapshot(now)
        moves = self.rebalancer.plan_moves(now, snapshot)
        self._forward(apply_moves(self.admission, self.policy, moves, now), now)

    def _on_dispatch(self, request: TraceRequest, now: float) -> None:
        routing = self._routing[request.request_id]
        instance_id = self.outcomes[request.request_id].instance_id
        assert instance_id is not None
        account = self.by_id[instance_id]
        account.requests += 1
        self._where[request.request_id] = account
        account.core.add_request(EngineRequest(
            request_id=request.request_id,
            prompt_token_ids=list(routing.token_ids),
            params=SamplingParams(max_tokens=request.output_len),
            arrival_time=now,
        ))
        if not account.busy:
            self._start_step(account, now)

    def _on_step_done(self, account: InstanceAccount, now: float) -> None:
        result = account.pending
        account.pending = None
        assert result is not None
        for event in result.events:
            outcome = self.outcomes.get(event.request_id)
            if outcome is None:
                continue
            if event.new_token_ids:
                if outcome.ttft_s is None:
                    outcome.ttft_s = now - outcome.arrival_s
                    outcome.cached_tokens = event.num_cached_tokens
                    self.policy.on_first_token(event.request_id, account.instance_id,
                                               outcome.ttft_s, event.num_cached_tokens, now)
                    if self.queueing:
                        self._forward(self.admission.on_first_token(event.request_id, now),
                                      now)
                    if outcome.ttft_s > self.config.slo_ttft_s:
                        self._count_miss(event.request_id)
                outcome.output_tokens += len(event.new_token_ids)
            if event.finished and event.finish_reason == "migrated":
                continue  # it left for another instance and goes on there
            if event.finished:
                self._left(event.request_id, account)
                self._where.pop(event.request_id, None)
                outcome.e2e_s = now - outcome.arrival_s
                if event.finish_reason == "abort":
                    outcome.error = "aborted"
                self._routing.pop(event.request_id, None)
                self._released.discard(event.request_id)
                self.policy.on_finished(event.request_id, account.instance_id, now)
                if self.queueing:
                    self._forward(self.admission.on_finished(event.request_id, now), now)
        # A stop-and-copy begins between two steps of its source (every token the request
        # produced there has been delivered; none is in flight).
        handoffs, account.handoffs = account.handoffs, []
        for migration in handoffs:
            self._stop_and_copy(migration, now)
        if account.core.has_unfinished_requests():
            self._start_step(account, now)
        else:
            account.busy = False

    # -- live migration (config.migration) -------------------------------------------------
    # The engine calls are those of the migration agent over the reference core
    # (``instances.migration_adapter``), the stage logic the coordinator's
    # (``migration.coordinator``); only the copy's duration is modelled (blocks x bytes per
    # block / bandwidth) instead of sent.
    def _on_migrate(self, now: float) -> None:
        """One freeness round (``router.migrations.FreenessMoves``): the decoding requests
        and the instances' load reports go to the planner; its moves start."""
        migrator = self.migrator
        assert migrator is not None
        if self._heap:  # anything left to simulate: keep the rounds going
            period = max(migrator.config.period_s, self.control_interval_s)
            self._push(now + period, _MIGRATE, None)
        requests = []
        for request_id, account in self._where.items():
            core = self._core(account)
            if request_id in self._migrations or not core.is_decoding(request_id):
                continue
            state = core.get_request(request_id)
            assert state is not None
            requests.append(RunningRequest(request_id, account.instance_id,
                                           -(-state.num_tokens // core.block_size),
                                           self.outcomes[request_id].arrival_s))
        if not requests:
            return
        snapshot = self._snapshot(now)
        moves = migrator.plan(now, fleet_loads(snapshot, self._records), requests,
                              frozenset(self._migrations))
        for move in moves:
            migration = _Migration(move, f"mig-{move.request_id}-{self.migration_counters.started}",
                                   self.by_id[move.source], self.by_id[move.destination], now)
            self.migration_counters.started += 1
            self._migrations[move.request_id] = migration
            self._next_stage(migration, now)

    @staticmethod
    def _core(account: InstanceAccount) -> EngineCore:
        core = account.core
        if not isinstance(core, EngineCore):
            raise TypeError("live migration needs the reference engine core")
        return core

    def _full_blocks(self, core: EngineCore, request_id: str) -> int:
        state = core.get_request(request_id)
        assert state is not None
        return min(state.num_computed_tokens // core.block_size, len(state.block_table))

    def _next_stage(self, migration: _Migration, now: float) -> None:
        """Another pre-copy stage while the request decodes on, or (few blocks left, or
        the stages used up) the stop-and-copy at the source's next step boundary."""
        config = self.migration_config
        source, target = self._core(migration.source), self._core(migration.target)
        request_id = migration.move.request_id
        if not source.is_decoding(request_id):
            self._fail(migration, "not_migratable", now)
            return
        remaining = self._full_blocks(source, request_id) - migration.sent
        if migration.stages >= config.max_stages or config.stop_and_copy_now(
                remaining, migration.seconds_per_block):
            if migration.source.busy:
                migration.source.handoffs.append(migration)
            else:
                self._stop_and_copy(migration, now)
            return
        if not target.reserve_blocks(migration.key, remaining):
            self._fail(migration, "refused", now)
            return
        copies = source.export_request_blocks(request_id, migration.sent,
                                              migration.sent + remaining)
        duration = len(copies) * self.seconds_per_block
        self._push(now + duration, _COPIED, (migration, copies, None, False))

    def _stop_and_copy(self, migration: _Migration, now: float) -> None:
        """Suspend the request on its source and copy what is left (full blocks, the
        partial one); it commits on the target when the copy has arrived."""
        source, target = self._core(migration.source), self._core(migration.target)
        request_id = migration.move.request_id
        if not source.is_decoding(request_id):
            self._fail(migration, "not_migratable", now)
            return
        source.suspend_request(request_id)
        migration.stopped_at = now
        remaining = self._full_blocks(source, request_id) - migration.sent
        if remaining > 0 and not target.reserve_blocks(migration.key, remaining):
            self._fail(migration, "refused", now)
            return
        copies = source.export_request_blocks(request_id, migration.sent) if remaining else []
        partial = source.export_partial_block(request_id)
        duration = ((len(copies) + (partial is not None)) * self.seconds_per_block
                    + MIGRATION_HANDOFF_RTT_S)
        self._push(now + duration, _COPIED, (migration, copies, partial, True))

    def _on_copied(self, migration: _Migration, copies: list[KVBlockCopy],
                   partial: tuple[tuple[int, ...], int | None, bytes] | None, handoff: bool,
                   *, now: float) -> None:
        """Blocks arrived on the target: import them (into the reservation); after a
        pre-copy stage plan the next one, after the stop-and-copy commit."""
        target = self._core(migration.target)
        try:
            target.import_blocks(copies, reservation=migration.key)
        except InsufficientKVBlocks:
            self._fail(migration, "out_of_blocks", now)
            return
        migration.pinned.extend(c.block_hash for c in copies)
        migration.sent += len(copies)
        self.migration_counters.blocks += len(copies) + (partial is not None)
        self.migration_counters.bytes += (len(copies) + (partial is not None)) \
            * self.bytes_per_block
        if not handoff:
            migration.stages += 1
            if copies:
                migration.seconds_per_block = self.seconds_per_block
            self._next_stage(migration, now)
            return
        self._commit(migration, partial, now)

    def _commit(self, migration: _Migration,
                partial: tuple[tuple[int, ...], int | None, bytes] | None, now: float) -> None:
        """The target adopts the request with its tokens so far (its blocks are cached and
        pinned there: only the last sampled token is computed); the source lets it go."""
        source, target = self._core(migration.source), self._core(migration.target)
        request_id = migration.move.request_id
        state = source.get_request(request_id)
        assert state is not None
        target.release_reservation(migration.key)
        try:
            target.add_request(EngineRequest(
                request_id=request_id,
                prompt_token_ids=list(self._routing[request_id].token_ids),
                params=SamplingParams(max_tokens=state.max_tokens,
                                      seed=source.resolved_sampling_seed(request_id)),
                arrival_time=now,
                output_token_ids=list(state.output_token_ids),
            ))
        except ValueError:
            self._fail(migration, "rejected", now)
            return
        if partial is not None:
            tokens, parent, payload = partial
            target.preload_partial_block(request_id, tokens, parent, payload)
        source.abort_request(request_id, "migrated")
        del self._migrations[request_id]
        self._left(request_id, migration.source)
        self._pins[request_id] = (migration.target, migration.pinned)
        self._where[request_id] = migration.target
        counters = self.migration_counters
        counters.committed += 1
        assert migration.stopped_at is not None
        counters.downtime_s.append(now - migration.stopped_at)
        counters.total_s.append(now - migration.started)
        assert self.migrator is not None
        self.migrator.finished(request_id, True, self._report_times())
        # As the gateway's stream switch: the request is done on its source for the policy
        # and the admission, and runs on (the target's finish reports it again).
        self.policy.on_finished(request_id, migration.source.instance_id, now)
        if self.queueing:
            self._forward(self.admission.on_finished(request_id, now), now)
        for account in (migration.source, migration.target):
            if not account.busy:  # the source reports the handoff, the target starts it
                self._start_step(account, now)

    def _fail(self, migration: _Migration, reason: str, now: float) -> None:
        """The move ends without a commit: the target gives back what it holds; the
        request (if still there) goes on on its source, resumed if the stop-and-copy had
        suspended it."""
        request_id = migration.move.request_id
        target = self._core(migration.target)
        target.release_reservation(migration.key)
        target.unpin_blocks(migration.pinned)
        source = self._core(migration.source)
        if source.is_suspended(request_id):
            source.resume_request(request_id)
        del self._migrations[request_id]
        failed = self.migration_counters.failed
        failed[reason] = failed.get(reason, 0) + 1
        assert self.migrator is not None
        self.migrator.finished(request_id, False, self._report_times())
        if not migration.source.busy and migration.source.core.has_unfinished_requests():
            self._start_step(migration.source, now)

    def _left(self, request_id: str, account: InstanceAccount) -> None:
        """The request left ``account`` (finished or moved on): blocks pinned there when
        it migrated in are unpinned (the agent's ``on_finish``)."""
        pinned = self._pins.get(request_id)
        if pinned is not None and pinned[0] is account:
            del self._pins[request_id]
            self._core(account).unpin_blocks(pinned[1])

    def _report_times(self) -> dict[str, float]:
        return {a.instance_id: a.view.report_time for a in self.accounts if a.view is not None}

    def _count_miss(self, request_id: str) -> None:
        if request_id in self.measured_ids:
            self.misses += 1

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> SimResult:
        wall_start = time.perf_counter()
        for request in self.requests:
            self._push(request.arrival_s, _ARRIVAL, request)
        now = 0.0
        early_stopped = False
        if self.migrator is not None:
            self._push(max(self.migrator.config.period_s, self.control_interval_s), _MIGRATE,
                       None)
        bar = tqdm(total=len(self.requests), desc=f"sim {self.config.policy}", unit="req",
                   file=sys.stderr, disable=not self.config.progress, leave=False)
        with bar:
            while self._heap:
                now, kind, _, payload = heapq.heappop(self._heap)
                if kind == _STEP_DONE:
                    self._on_step_done(payload, now)
                elif kind == _WAKE:
                    account, token = payload
                    if not account.busy and token == account.wake_token:
                        self._start_step(account, now)
                elif kind == _DISPATCH:
                    self._on_dispatch(payload, now)
                elif kind == _TICK:
                    self._on_tick(payload, now)
                elif kind == _CONTROL:
                    self._on_control(now)
                elif kind == _MIGRATE:
                    self._on_migrate(now)
                elif kind == _COPIED:
                    self._on_copied(*payload, now=now)
                else:
                    self._on_arrival(payload, now)
                    bar.update(1)
                if self.allowed_misses is not None and self.misses > self.allowed_misses:
                    early_stopped = True
                    break
        served = {o.request_id: o.instance_id for o in self.outcomes.values()
                  if o.ttft_s is not None}
        return SimResult(
            followup=followup_colocation(self.requests, served),
            outcomes=list(self.outcomes.values()),
            instances=self.accounts,
            end_time_s=now,
            early_stopped=early_stopped,
            wall_seconds=time.perf_counter() - wall_start,
            decisions=dict(sorted(self.decisions.items())),
            admission=self.admission.counters(),
            rebalance=self.rebalancer is not None,
            migration=self.migration_counters.as_dict() if self.migrator is not None else None,
        )


# Requests with at most this many uncached prompt tokens (as the engine prefilled them) are
# "short" in the summary's per-class TTFTs, whatever the admission mode (a fixed line, so
# runs with and without admission are compared on the same requests).
SHORT_UNCACHED_TOKENS = 2048


def class_ttfts(
    outcomes: Sequence[RequestOutcome], warmup: int, short_tokens: int = SHORT_UNCACHED_TOKENS
) -> dict[str, Any]:
    """TTFT p50/p99 of measured short and long requests (by uncached prompt tokens at the
    engine; requests without a first token are left out)."""
    measured = sorted(outcomes, key=lambda o: (o.arrival_s, o.request_id))[warmup:]
    short: list[float] = []
    long: list[float] = []
    for outcome in measured:
        if outcome.ttft_s is None:
            continue
        uncached = outcome.prompt_len - (outcome.cached_tokens or 0)
        (short if uncached <= short_tokens else long).append(outcome.ttft_s)
    return {
        "short_uncached_tokens": short_tokens,
        "short_requests": len(short),
        "ttft_p50_short": _round(percentile(short, 50)),
        "ttft_p99_short": _round(percentile(short, 99)),
        "ttft_p50_long": _round(percentile(long, 50)),
        "ttft_p99_long": _round(percentile(long, 99)),
    }


def summarize_sim(config: RunConfig, result: SimResult) -> dict[str, Any]:
    """The ``llmfleet sim`` JSON of a finished simulation.

    ``load_imbalance`` is max/mean over instances of busy time (virtual seconds spent in
    engine steps); every request runs to completion, so busy time is the work each instance
    was handed, batching included. ``load_imbalance_tokens`` is the same ratio over tokens
    processed (uncached prefill tokens + decode tokens); ``request_imbalance`` over requests.
    """
    summary = summarize(
        result.outcomes,
        slo_ttft_s=config.slo_ttft_s,
        slo_tpot_s=config.slo_tpot_s,
        warmup_requests=warmup_count(config, len(result.outcomes)),
        wall_seconds=result.wall_seconds,
    )
    accounts = result.instances
    summary.update({k: result.followup.get(k) for k in FOLLOWUP_FIELDS})
    summary.update(class_ttfts(result.outcomes, warmup_count(config, len(result.outcomes))))
    summary.update({
        "mode": "sim",
        "policy": config.policy,
        "instances": len(accounts),
        "profile": config.profile,
        "trace": config.trace,
        "trace_format": config.trace_format,
        "rate": config.rate,
        "seed": config.seed,
        "load_imbalance": _round(imbalance([a.busy_s for a in accounts])),
        "load_imbalance_tokens": _round(
            imbalance([a.prefill_tokens + a.decode_tokens for a in accounts])),
        "request_imbalance": _round(imbalance([a.requests for a in accounts])),
        "early_stopped": result.early_stopped,
        "virtual_end_s": round(result.end_time_s, 6),
        "decisions": result.decisions,
        "admission": config.admission,
        "rebalance": result.rebalance,
        "admission_counters": result.admission,
        "per_instance": [a.as_dict() for a in accounts],
    })
    if result.migration is not None:
        summary["migration"] = result.migration
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def run_sim(
    config: RunConfig,
    *,
    requests: Sequence[TraceRequest] | None = None,
    engine_factory: EngineFactory = default_engine_factory,
    policy_factory: PolicyFactory = default_policy_factory,
    early_stop_attainment: float | None = None,
) -> dict[str, Any]:
    """Simulate ``config`` (its workload unless ``requests`` is given) and return the JSON
    summary (see ``summarize_sim``; fields of ``loadgen.metrics.summarize`` plus sim ones)."""
    wall_start = time.perf_counter()
    workload = list(requests) if requests is not None else load_workload(config)
    simulator = Simulator(config, workload, engine_factory=engine_factory,
                          policy_factory=policy_factory,
                          early_stop_attainment=early_stop_attainment)
    result = simulator.run()
    result.wall_seconds = time.perf_counter() - wall_start
    return summarize_sim(config, result)
