"""The migration coordinator: drives one live migration between two replicas' agents.

Llumnix's protocol (``llumnix/llumlet/migration_coordinator.py``), over ``MigrationAgent``:

1. Pre-copy stages, at most ``max_stages``: the source reserves the request's full blocks
   not yet sent on the destination (which may refuse) and pushes them while the request
   keeps decoding. A stage ends when its blocks are sent; the request has produced new
   blocks meanwhile, and the next stage sends those.
2. As soon as at most ``last_stage_max_blocks`` unsent full blocks remain (or the stages
   are used up): ``Handoff`` — the source stops the request, pushes the rest, commits it on
   the destination with its state and frees it. Only this phase stops the request, so the
   downtime is the copy of a few blocks plus two round trips, whatever the context length.
   One refinement over Llumnix: the pace of the previous stage (seconds per block, so the
   link's speed however slow) predicts the stop-and-copy; while it would exceed
   ``stop_copy_target_s`` and stages remain, one more pre-copy stage runs instead (on a
   10 Gb/s link, 16 blocks of Llama-3-8B KV take 27 ms; a stage of them shrinks the rest to
   a block or two).

Abort paths: the request finished, was preempted or is not decoding on the source
(``not_migratable``); the destination refused the reservation (``refused``) or failed
(``aborted``, the source resumes it); any RPC timing out. After a failed stage the
coordinator aborts the migration on the destination (best effort: if the destination is
gone its lease runs out). The request always ends up running exactly once: only the
source's ``Handoff`` both stops and commits it, and it resumes the request unless the
destination confirms the commit.

Only control messages go through the coordinator; the KV bytes go from agent to agent.
The coordinator holds no state that outlives a call: if it dies, the source keeps running
the request and the destination's lease expires (or a handoff already started finishes).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from migration.agent import DEFAULT_RESERVATION_TTL_S, DEFAULT_RPC_TIMEOUT_S
from migration.transport import DEFAULT_MAX_BATCH_BYTES, ChannelPool
from proto import migration_pb2 as pb

DEFAULT_MAX_STAGES = 3
DEFAULT_LAST_STAGE_MAX_BLOCKS = 16


@dataclass(frozen=True)
class LinkModel:
    """Benchmarks: pace the copy as if each block were ``modelled_bytes_per_block`` bytes
    over a ``gbytes_per_s`` link (the real payloads still travel)."""

    gbytes_per_s: float
    modelled_bytes_per_block: int

    def to_proto(self) -> pb.LinkModel:
        return pb.LinkModel(gbytes_per_s=self.gbytes_per_s,
                            modelled_bytes_per_block=self.modelled_bytes_per_block)


@dataclass(frozen=True)
class MigrationConfig:
    max_stages: int = DEFAULT_MAX_STAGES  # pre-copy stages before the stop-and-copy
    last_stage_max_blocks: int = DEFAULT_LAST_STAGE_MAX_BLOCKS
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S  # control calls and the handoff's calls
    stage_timeout_s: float = 120.0  # one pre-copy stage (it moves most of the bytes)
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    link: LinkModel | None = None
    # Predicted stop-and-copy above this: one more pre-copy stage first (None: Llumnix's
    # rule only, the block count).
    stop_copy_target_s: float | None = 0.005

    def __post_init__(self) -> None:
        if self.max_stages < 0 or self.last_stage_max_blocks < 0:
            raise ValueError("max_stages and last_stage_max_blocks must be >= 0")

    def stop_and_copy_now(self, remaining_blocks: int, seconds_per_block: float) -> bool:
        """Whether the unsent full blocks are few enough for the stop-and-copy: at most
        ``last_stage_max_blocks``, and (with ``stop_copy_target_s``) predicted to copy
        within it at the last stage's pace. The stage count is the caller's."""
        return remaining_blocks <= self.last_stage_max_blocks and (
            self.stop_copy_target_s is None
            or remaining_blocks * seconds_per_block <= self.stop_copy_target_s)


@dataclass
class MigrationResult:
    """What one ``migrate`` call did. ``status``: committed | not_migratable | refused |
    aborted. ``stages`` counts pre-copy stages plus the stop-and-copy (when reached)."""

    migration_id: str
    request_id: str
    status: str
    reason: str = ""
    stages: int = 0
    blocks: int = 0
    bytes: int = 0
    total_s: float = 0.0
    stopped_s: float = 0.0  # the request was stopped on the source this long
    destination_instance: str = ""
    destination_url: str = ""
    num_output_tokens: int = 0  # tokens generated before the stop (the continuation's start)
    stage_blocks: list[int] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        return self.status == "committed"


class MigrationCoordinator:
    """Runs migrations between agents addressed as ``host:port`` (see module docstring)."""

    def __init__(
        self,
        config: MigrationConfig | None = None,
        pool: ChannelPool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config or MigrationConfig()
        self._pool = pool or ChannelPool()
        self._own_pool = pool is None
        self._clock = clock

    async def close(self) -> None:
        if self._own_pool:
            await self._pool.close()

    async def migrate(
        self, request_id: str, source: str, destination: str, migration_id: str | None = None
    ) -> MigrationResult:
        """Move a running request from the agent at ``source`` to the one at
        ``destination``; never raises for protocol failures (see ``MigrationResult``)."""
        config = self.config
        migration_id = migration_id or f"mig-{uuid.uuid4().hex[:16]}"
        result = MigrationResult(migration_id, request_id, "aborted")
        began = self._clock()
        link = config.link.to_proto() if config.link is not None else None
        source_stub = self._pool.stub(source)
        sent = 0
        seconds_per_block = 0.0  # pace of the last pre-copy stage
        try:
            for _ in range(config.max_stages):
                state = await source_stub.GetRequestState(
                    pb.RequestStateQuery(request_id=request_id), timeout=config.rpc_timeout_s)
                if state.phase != pb.REQUEST_PHASE_DECODING:
                    result.status, result.reason = "not_migratable", pb.RequestPhase.Name(
                        state.phase)
                    await self._abort_destination(destination, migration_id)
                    return result
                if config.stop_and_copy_now(state.num_full_blocks - sent, seconds_per_block):
                    break
                stage_began = self._clock()
                stage = await source_stub.SendBlocks(pb.SendBlocksRequest(
                    migration_id=migration_id, request_id=request_id, destination=destination,
                    start_block=sent, ttl_s=config.reservation_ttl_s, link=link,
                    max_batch_bytes=config.max_batch_bytes), timeout=config.stage_timeout_s)
                result.stages += 1
                result.stage_blocks.append(stage.blocks_sent)
                result.blocks += stage.blocks_sent
                result.bytes += stage.bytes_sent
                if stage.status != pb.STAGE_STATUS_SENT:
                    result.status = {
                        pb.STAGE_STATUS_NOT_MIGRATABLE: "not_migratable",
                        pb.STAGE_STATUS_REFUSED: "refused",
                    }.get(stage.status, "aborted")
                    result.reason = stage.reason or pb.StageStatus.Name(stage.status)
                    await self._abort_destination(destination, migration_id)
                    return result
                sent += stage.blocks_sent
                if stage.blocks_sent:
                    seconds_per_block = (self._clock() - stage_began) / stage.blocks_sent
            handoff = await source_stub.Handoff(pb.HandoffRequest(
                migration_id=migration_id, request_id=request_id, destination=destination,
                start_block=sent, ttl_s=config.reservation_ttl_s, link=link,
                rpc_timeout_s=config.rpc_timeout_s, max_batch_bytes=config.max_batch_bytes),
                timeout=config.stage_timeout_s)
        except grpc.RpcError as exc:
            # The source is unreachable (or a stage timed out): nothing was committed by us;
            # a handoff the source did start settles itself there.
            result.status, result.reason = "aborted", f"source: {exc.code().name}"  # type: ignore[attr-defined]
            await self._abort_destination(destination, migration_id)
            return result
        finally:
            result.total_s = self._clock() - began
        result.stages += 1
        result.stage_blocks.append(handoff.blocks_sent)
        result.blocks += handoff.blocks_sent
        result.bytes += handoff.bytes_sent
        result.stopped_s = handoff.stopped_s
        result.num_output_tokens = handoff.num_output_tokens
        result.reason = handoff.reason
        if handoff.status == pb.HANDOFF_STATUS_COMMITTED:
            result.status = "committed"
            result.destination_instance, result.destination_url = handoff.instance_id, handoff.url
        elif handoff.status == pb.HANDOFF_STATUS_NOT_MIGRATABLE:
            result.status = "not_migratable"
            await self._abort_destination(destination, migration_id)
        else:
            result.status = "aborted"
        result.total_s = self._clock() - began
        return result

    async def _abort_destination(self, destination: str, migration_id: str) -> None:
        # A destination that does not answer is gone: its lease on the reservation runs out.
        with contextlib.suppress(grpc.RpcError):
            await self._pool.stub(destination).Abort(
                pb.AbortRequest(migration_id=migration_id, reason="coordinator aborted"),
                timeout=self.config.rpc_timeout_s)


async def locate_request(
    request_id: str, agents: Sequence[str], pool: ChannelPool, timeout_s: float = 1.0
) -> tuple[str, pb.RequestStateReply] | None:
    """The first agent (in ``agents`` order) on which ``request_id`` runs or waits, with
    its state; None if none has it. For recovery after a replica died mid-migration."""
    for address in agents:
        try:
            state = await pool.stub(address).GetRequestState(
                pb.RequestStateQuery(request_id=request_id), timeout=timeout_s)
        except grpc.RpcError:
            continue
        if state.phase != pb.REQUEST_PHASE_UNKNOWN:
            return address, state
    return None
