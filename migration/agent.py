"""The instance-side migration agent: a ``MigrationAgent`` gRPC service over one engine.

Every reference-engine replica runs one next to its HTTP API. It plays both roles of the
Llumnix protocol (``proto/migration.proto``):

* destination — ``Reserve`` takes free KV blocks out of circulation for a migration (or
  refuses), ``PushBlocks`` imports a stream of block batches into them (hash- and
  payload-checked; the blocks are pinned in the prefix cache), ``Commit`` adds the request
  with its state (generated tokens, sampling seed, stop tokens, budget) so it resumes
  decoding from the imported blocks, ``Abort`` undoes an open migration. A migration is
  leased: each Reserve/PushBlocks renews it for ``ttl_s``; one neither committed nor renewed
  in time is aborted here (reservation released, blocks unpinned). Aborted ids are fenced:
  a late Commit is refused, so a request never runs twice.
* source — ``SendBlocks`` is one pre-copy stage (reserve on the destination, then push the
  request's full blocks while it keeps decoding); ``Handoff`` is the stop-and-copy: suspend
  the request, push its remaining blocks, commit it on the destination, release it here. A
  failure before the commit resumes it here; an unanswered Commit is settled by asking the
  destination (``Abort`` reports whether it had committed) before resuming or releasing.
  The handoff runs in a task of its own, so a coordinator that dies mid-call changes nothing.

The engine is reached through ``EngineHandle`` (implemented in ``instances``); this package
imports nothing but ``proto``. Time comes from the injected ``clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from migration.transport import (
    CHANNEL_OPTIONS,
    DEFAULT_MAX_BATCH_BYTES,
    ChannelPool,
    decode_batch,
    encode_batch,
    serve_migration_agent,
    tune_allocator,
)
from proto import migration_pb2 as pb
from proto import migration_pb2_grpc as pb_grpc

log = logging.getLogger("llmfleet.migration")

DEFAULT_RESERVATION_TTL_S = 10.0
DEFAULT_RPC_TIMEOUT_S = 5.0
_FINISHED_MEMORY = 4096  # migration ids remembered after commit/abort (fencing, retries)


class NotMigratable(Exception):
    """The request is not (or no longer) in a state that can be migrated."""


class OutOfBlocks(Exception):
    """The destination has no room for the blocks."""


class EngineHandle(Protocol):
    """What the agent needs from the engine it serves (``instances.migration_adapter``)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def url(self) -> str: ...

    def request_state(self, request_id: str) -> pb.RequestStateReply:
        """Where a request stands here (phase, token and block counts)."""
        ...

    def export_batch(
        self, request_id: str, start_block: int, end_block: int, max_bytes: int
    ) -> tuple[pb.BlockBatch, list[bytes]]:
        """Full blocks ``[start, ≤ end)`` of a decoding or suspended request, as many as fit
        in ``max_bytes`` of payload (at least one): the batch without its ``payload`` and
        the blocks' payloads, in order (joined straight into the message by
        ``migration.transport.encode_batch``). NotMigratable if it is neither."""
        ...

    def free_blocks(self) -> int: ...

    def reserve_blocks(self, key: str, num_blocks: int) -> bool: ...

    def num_reserved_blocks(self, key: str) -> int: ...

    def release_reservation(self, key: str) -> None: ...

    def import_batch(self, key: str, batch: pb.BlockBatch, payload: memoryview) -> int:
        """Import and pin a batch (taking the reservation's blocks first); ``payload`` is
        the blocks' KV bytes back to back, a view of the received message. Returns blocks
        copied. OutOfBlocks when they do not fit, ValueError on a bad block."""
        ...

    def unpin_blocks(self, block_hashes: list[int]) -> None: ...

    def suspend(self, request_id: str) -> pb.RequestState:
        """Stop a decoding request, keeping its blocks; its full state. NotMigratable."""
        ...

    def resume(self, request_id: str) -> None: ...

    def release_migrated(self, request_id: str, instance_id: str, url: str) -> None:
        """The request runs elsewhere now: free it here, end its stream with a migration
        event naming where it went."""
        ...

    def adopt(self, state: pb.RequestState, on_finish: Callable[[], None]) -> None:
        """Start a migrated request here; ``on_finish`` runs when it leaves this engine.
        ValueError if it cannot run here."""
        ...


@dataclass
class Faults:
    """Fault injection for tests: awaited at the named points of the protocol."""

    before_commit: Callable[[str], Awaitable[None]] | None = None  # source, request stopped
    after_commit: Callable[[str], Awaitable[None]] | None = None  # source, before release
    on_push_batch: Callable[[str, int], Awaitable[None]] | None = None  # source, per batch


@dataclass
class _Incoming:
    """A migration this replica is the destination of."""

    migration_id: str
    request_id: str
    expires_at: float
    pinned: list[int] = field(default_factory=list)
    pinned_set: set[int] = field(default_factory=set)


@dataclass
class _PushOutcome:
    blocks: int = 0
    bytes: int = 0
    error: str = ""  # "" | "not_migratable" | "destination_failed" | "out_of_blocks" | ...
    detail: str = ""


class MigrationAgent(pb_grpc.MigrationAgentServicer):
    """Serves ``MigrationAgent`` for one engine (see module docstring)."""

    def __init__(
        self,
        engine: EngineHandle,
        clock: Callable[[], float] = time.monotonic,
        pool: ChannelPool | None = None,
        default_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        sweep_interval_s: float = 0.1,
        faults: Faults | None = None,
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._pool = pool or ChannelPool()
        self._own_pool = pool is None
        self.default_ttl_s = default_ttl_s
        self._sweep_interval_s = sweep_interval_s
        self.faults = faults or Faults()
        self._incoming: dict[str, _Incoming] = {}
        self._finished: OrderedDict[str, pb.AbortReply] = OrderedDict()
        self._pin_counts: Counter[int] = Counter()
        self._tasks: set[asyncio.Task[pb.HandoffReply]] = set()
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.address = ""

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); returns the ``host:port`` served."""
        tune_allocator()
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        serve_migration_agent(self, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; open incoming migrations are aborted (their blocks freed)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:  # a handoff may stop its own agent (fault injection)
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await task
        for migration_id in list(self._incoming):
            self._abort_incoming(migration_id)
        if self._own_pool:
            await self._pool.close()

    async def connect(self, peers: list[str], timeout_s: float = 5.0) -> None:
        """Open the channels to peer agents now, so a first migration does not pay for the
        connection while its request is stopped."""
        for address in peers:
            with contextlib.suppress(grpc.RpcError):
                await self._pool.stub(address).GetRequestState(
                    pb.RequestStateQuery(request_id=""), timeout=timeout_s)

    @property
    def num_open_migrations(self) -> int:
        return len(self._incoming)

    # ---- destination ----------------------------------------------------------------------

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveReply:
        self._expire()
        migration_id = request.migration_id
        if migration_id in self._finished:
            return pb.ReserveReply(accepted=False, reason="finished",
                                   free_blocks=self.engine.free_blocks())
        incoming = self._open(migration_id, request.request_id, request.ttl_s)
        if incoming is None:
            return pb.ReserveReply(accepted=False, reason="duplicate_request",
                                   free_blocks=self.engine.free_blocks())
        if not self.engine.reserve_blocks(migration_id, request.num_blocks):
            return pb.ReserveReply(
                accepted=False, reason="out_of_blocks", free_blocks=self.engine.free_blocks(),
                reserved_blocks=self.engine.num_reserved_blocks(migration_id))
        return pb.ReserveReply(
            accepted=True, free_blocks=self.engine.free_blocks(),
            reserved_blocks=self.engine.num_reserved_blocks(migration_id))

    async def PushBlocks(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushReply:
        """Served with ``migration.transport.serve_migration_agent``: each message arrives
        as the serialized ``BlockBatch`` and its payload is imported from a view of it."""
        received = copied = num_bytes = 0
        async for message in request_iterator:
            try:
                batch, payload = decode_batch(message)
            except ValueError as exc:
                return pb.PushReply(blocks_received=received, blocks_copied=copied,
                                    bytes_received=num_bytes, error=f"bad_block: {exc}")
            migration_id = batch.migration_id
            incoming = self._incoming.get(migration_id)
            if incoming is None:
                if migration_id in self._finished:
                    return pb.PushReply(blocks_received=received, blocks_copied=copied,
                                        bytes_received=num_bytes, error="finished")
                incoming = self._open(migration_id, "", 0.0)
                assert incoming is not None
            incoming.expires_at = self._clock() + self.default_ttl_s
            try:
                copied += self.engine.import_batch(migration_id, batch, payload)
            except OutOfBlocks:
                return pb.PushReply(blocks_received=received, blocks_copied=copied,
                                    bytes_received=num_bytes, error="out_of_blocks")
            except ValueError as exc:
                return pb.PushReply(blocks_received=received, blocks_copied=copied,
                                    bytes_received=num_bytes, error=f"bad_block: {exc}")
            for block_hash in batch.block_hashes:
                if block_hash not in incoming.pinned_set:
                    incoming.pinned_set.add(block_hash)
                    incoming.pinned.append(block_hash)
                    self._pin_counts[block_hash] += 1
            received += len(batch.block_hashes)
            num_bytes += len(payload)
        return pb.PushReply(blocks_received=received, blocks_copied=copied,
                            bytes_received=num_bytes)

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitReply:
        self._expire()
        migration_id = request.migration_id
        done = self._finished.get(migration_id)
        if done is not None:
            if done.committed:  # a retried Commit: already done
                return pb.CommitReply(committed=True, instance_id=done.instance_id,
                                      url=done.url)
            return pb.CommitReply(committed=False, reason="aborted")
        incoming = self._incoming.pop(migration_id, None)
        pinned = incoming.pinned if incoming is not None else []
        self.engine.release_reservation(migration_id)
        try:
            self.engine.adopt(request.state, on_finish=lambda: self._unpin(pinned))
        except ValueError as exc:
            self._unpin(pinned)
            self._remember(migration_id, pb.AbortReply(known=True, committed=False))
            return pb.CommitReply(committed=False, reason=f"rejected: {exc}")
        engine = self.engine
        self._remember(migration_id, pb.AbortReply(
            known=True, committed=True, instance_id=engine.instance_id, url=engine.url))
        return pb.CommitReply(committed=True, instance_id=engine.instance_id, url=engine.url)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortReply:
        done = self._finished.get(request.migration_id)
        if done is not None:
            return done
        known = request.migration_id in self._incoming
        self._abort_incoming(request.migration_id)
        return pb.AbortReply(known=known, committed=False)

    async def GetRequestState(
        self, request: pb.RequestStateQuery, context: grpc.aio.ServicerContext
    ) -> pb.RequestStateReply:
        return self.engine.request_state(request.request_id)

    # ---- source ---------------------------------------------------------------------------

    async def SendBlocks(
        self, request: pb.SendBlocksRequest, context: grpc.aio.ServicerContext
    ) -> pb.StageReply:
        state = self.engine.request_state(request.request_id)
        if state.phase != pb.REQUEST_PHASE_DECODING:
            return pb.StageReply(status=pb.STAGE_STATUS_NOT_MIGRATABLE,
                                 reason=pb.RequestPhase.Name(state.phase),
                                 num_full_blocks=state.num_full_blocks,
                                 num_output_tokens=state.num_output_tokens)
        end = state.num_full_blocks
        count = end - request.start_block
        if count <= 0:
            return pb.StageReply(status=pb.STAGE_STATUS_SENT, num_full_blocks=end,
                                 num_output_tokens=state.num_output_tokens)
        stub = self._pool.stub(request.destination)
        ttl_s = request.ttl_s or self.default_ttl_s
        try:
            reserved = await stub.Reserve(pb.ReserveRequest(
                migration_id=request.migration_id, request_id=request.request_id,
                num_blocks=count, ttl_s=ttl_s, source_instance_id=self.engine.instance_id),
                timeout=DEFAULT_RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            return pb.StageReply(status=pb.STAGE_STATUS_DESTINATION_FAILED,
                                 reason=_rpc_reason(exc))
        if not reserved.accepted:
            return pb.StageReply(status=pb.STAGE_STATUS_REFUSED, reason=reserved.reason)
        outcome = await self._push(request.destination, request.migration_id,
                                   request.request_id, request.start_block, end,
                                   request.link, request.max_batch_bytes, None)
        after = self.engine.request_state(request.request_id)
        status = {
            "": pb.STAGE_STATUS_SENT,
            "not_migratable": pb.STAGE_STATUS_NOT_MIGRATABLE,
        }.get(outcome.error, pb.STAGE_STATUS_DESTINATION_FAILED)
        reason = f"{outcome.error}: {outcome.detail}" if outcome.detail else outcome.error
        return pb.StageReply(status=status, reason=reason, blocks_sent=outcome.blocks,
                             bytes_sent=outcome.bytes, num_full_blocks=after.num_full_blocks,
                             num_output_tokens=after.num_output_tokens)

    async def Handoff(
        self, request: pb.HandoffRequest, context: grpc.aio.ServicerContext
    ) -> pb.HandoffReply:
        task = asyncio.get_running_loop().create_task(self.handoff(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Shielded: the handoff must finish (commit or resume) even if the caller is gone.
        return await asyncio.shield(task)

    async def handoff(self, request: pb.HandoffRequest) -> pb.HandoffReply:
        """The stop-and-copy phase (see module docstring); never leaves the request
        suspended."""
        request_id = request.request_id
        stopped_at = self._clock()
        try:
            state = self.engine.suspend(request_id)
        except NotMigratable as exc:
            return pb.HandoffReply(status=pb.HANDOFF_STATUS_NOT_MIGRATABLE, reason=str(exc))
        released = committed = False
        reply = pb.HandoffReply(status=pb.HANDOFF_STATUS_ABORTED,
                                num_output_tokens=len(state.output_token_ids) // 4)
        timeout = request.rpc_timeout_s or DEFAULT_RPC_TIMEOUT_S
        stub = self._pool.stub(request.destination)
        try:
            if state.num_full_blocks > request.start_block:
                outcome = await self._push(request.destination, request.migration_id, request_id,
                                           request.start_block, state.num_full_blocks,
                                           request.link, request.max_batch_bytes, timeout)
                reply.blocks_sent, reply.bytes_sent = outcome.blocks, outcome.bytes
                if outcome.error:
                    reply.reason = outcome.error
                    await self._abort_remote(stub, request.migration_id, timeout)
                    return reply
            if self.faults.before_commit is not None:
                await self.faults.before_commit(request_id)
            committed, instance_id, url, reason = await self._commit(
                stub, request.migration_id, state, timeout)
            if not committed:
                reply.reason = reason
                return reply
            reply.status = pb.HANDOFF_STATUS_COMMITTED
            reply.instance_id, reply.url = instance_id, url
            if self.faults.after_commit is not None:
                await self.faults.after_commit(request_id)
            self.engine.release_migrated(request_id, instance_id, url)
            released = True
            return reply
        finally:
            # Committed elsewhere: never resume here (it would run twice), release instead.
            if committed and not released:
                with contextlib.suppress(Exception):
                    self.engine.release_migrated(request_id, reply.instance_id, reply.url)
            elif not committed:
                with contextlib.suppress(KeyError):
                    self.engine.resume(request_id)
            reply.stopped_s = self._clock() - stopped_at

    # ---- internals ------------------------------------------------------------------------

    async def _commit(
        self, stub: pb_grpc.MigrationAgentStub, migration_id: str, state: pb.RequestState,
        timeout: float,
    ) -> tuple[bool, str, str, str]:
        """Commit on the destination: (committed, instance id, url, reason). An unanswered
        Commit is settled by Abort, which fences a late commit or reports that it happened."""
        try:
            reply = await stub.Commit(pb.CommitRequest(migration_id=migration_id, state=state),
                                      timeout=timeout)
            return reply.committed, reply.instance_id, reply.url, reply.reason
        except grpc.RpcError as exc:
            reason = _rpc_reason(exc)
        settled = await self._abort_remote(stub, migration_id, timeout)
        if settled is not None and settled.committed:
            return True, settled.instance_id, settled.url, ""
        return False, "", "", f"commit unanswered: {reason}"

    async def _abort_remote(
        self, stub: pb_grpc.MigrationAgentStub, migration_id: str, timeout: float
    ) -> pb.AbortReply | None:
        """Best-effort Abort on the destination; None if it did not answer (then it is dead
        or cut off, and so is any copy it holds: its lease runs out there)."""
        try:
            reply: pb.AbortReply = await stub.Abort(
                pb.AbortRequest(migration_id=migration_id, reason="source aborted"),
                timeout=timeout)
            return reply
        except grpc.RpcError:
            return None

    async def _push(
        self, destination: str, migration_id: str, request_id: str,
        start: int, end: int, link: pb.LinkModel, max_batch_bytes: int, timeout: float | None,
    ) -> _PushOutcome:
        """Stream blocks ``[start, end)`` to the destination, exporting lazily so the engine
        keeps stepping between batches; paced by ``link`` when it is set. Each batch's
        payloads are joined straight into its message (``encode_batch``)."""
        outcome = _PushOutcome()
        max_bytes = max_batch_bytes or DEFAULT_MAX_BATCH_BYTES
        engine = self.engine
        faults = self.faults
        paced = link.gbytes_per_s > 0 and link.modelled_bytes_per_block > 0

        async def batches() -> AsyncIterator[bytes]:
            index = start
            began = self._clock()
            modelled = 0
            while index < end:
                try:
                    batch, payloads = engine.export_batch(request_id, index, end, max_bytes)
                except NotMigratable as exc:
                    outcome.error = "not_migratable"
                    outcome.detail = str(exc)
                    return
                batch.migration_id = migration_id
                count = len(batch.block_hashes)
                if paced:
                    modelled += count * link.modelled_bytes_per_block
                    delay = began + modelled / (link.gbytes_per_s * 1e9) - self._clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if faults.on_push_batch is not None:
                    await faults.on_push_batch(request_id, index)
                index += count
                outcome.blocks += count
                outcome.bytes += sum(len(p) for p in payloads)
                yield encode_batch(batch, payloads)

        try:
            reply: pb.PushReply = await self._pool.push_blocks(destination)(
                batches(), timeout=timeout)
        except grpc.RpcError as exc:
            if not outcome.error:
                outcome.error = f"destination_failed: {_rpc_reason(exc)}"
            return outcome
        if reply.error and not outcome.error:
            outcome.error = reply.error
        elif not outcome.error and reply.blocks_received != outcome.blocks:
            outcome.error = "destination_failed: blocks lost"
        return outcome

    def _open(self, migration_id: str, request_id: str, ttl_s: float) -> _Incoming | None:
        incoming = self._incoming.get(migration_id)
        expires_at = self._clock() + (ttl_s or self.default_ttl_s)
        if incoming is None:
            incoming = _Incoming(migration_id, request_id, expires_at)
            self._incoming[migration_id] = incoming
        else:
            incoming.expires_at = expires_at
        return incoming

    def _abort_incoming(self, migration_id: str) -> None:
        incoming = self._incoming.pop(migration_id, None)
        self.engine.release_reservation(migration_id)
        if incoming is not None:
            self._unpin(incoming.pinned)
        self._remember(migration_id, pb.AbortReply(known=incoming is not None, committed=False))

    def _unpin(self, block_hashes: list[int]) -> None:
        last: list[int] = []
        counts = self._pin_counts
        for block_hash in block_hashes:
            counts[block_hash] -= 1
            if counts[block_hash] <= 0:
                del counts[block_hash]
                last.append(block_hash)
        if last:
            self.engine.unpin_blocks(last)

    def _remember(self, migration_id: str, outcome: pb.AbortReply) -> None:
        self._finished[migration_id] = outcome
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _expire(self) -> None:
        now = self._clock()
        for migration_id in [m for m, i in self._incoming.items() if i.expires_at <= now]:
            log.info("migration %s expired on %s", migration_id, self.engine.instance_id)
            self._abort_incoming(migration_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self._expire()


def _rpc_reason(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    return code.name if code is not None else type(exc).__name__
