"""The reference engine's side of live migration: ``migration.agent.EngineHandle`` over an
``AsyncEngine`` (and its ``EngineCore``), converting to and from ``proto.migration_pb2``.

Blocks travel as runs of consecutive full blocks (``BlockBatch``): chained hashes, the
run's token ids as one int32 buffer and the payloads back to back in one ``bytes`` field,
so a batch costs a handful of Python objects however many blocks it holds. Only full,
computed blocks move; the destination recomputes the last partial block (at most
``block_size`` tokens, one small prefill) when the request resumes there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from instances.async_engine import AsyncEngine, MigratedTo
from instances.engine.core import InsufficientKVBlocks
from instances.engine.types import EngineRequest, KVBlockCopy, RequestStatus, SamplingParams
from migration.agent import NotMigratable, OutOfBlocks
from proto import migration_pb2 as pb


class EngineMigrationHandle:
    """Implements ``migration.agent.EngineHandle`` for one ``AsyncEngine``."""

    def __init__(
        self, engine: AsyncEngine, instance_id: str, url: str, orphan_timeout_s: float = 30.0
    ) -> None:
        self.engine = engine
        self.core = engine.core
        self._instance_id = instance_id
        self._url = url
        self.orphan_timeout_s = orphan_timeout_s
        self._payload_bytes = 0  # bytes per block payload, learnt from the first export

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def url(self) -> str:
        return self._url

    # ---- state ----------------------------------------------------------------------------

    def request_state(self, request_id: str) -> pb.RequestStateReply:
        core = self.core
        state = core.get_request(request_id)
        reply = pb.RequestStateReply(instance_id=self._instance_id, url=self._url)
        if state is None:
            if self.engine.has_continuation(request_id):
                reply.phase = pb.REQUEST_PHASE_FINISHED
            return reply
        reply.num_tokens = state.num_tokens
        reply.num_output_tokens = len(state.output_token_ids)
        reply.num_full_blocks = self._num_full_blocks(request_id)
        if core.is_suspended(request_id):
            reply.phase = pb.REQUEST_PHASE_SUSPENDED
        elif core.is_decoding(request_id):
            reply.phase = (pb.REQUEST_PHASE_DECODING if self.engine.is_migratable(request_id)
                           else pb.REQUEST_PHASE_PINNED)
        elif state.status is RequestStatus.RUNNING:
            reply.phase = pb.REQUEST_PHASE_PREFILL
        else:
            reply.phase = pb.REQUEST_PHASE_WAITING
        return reply

    def _num_full_blocks(self, request_id: str) -> int:
        state = self.core.get_request(request_id)
        if state is None:
            return 0
        return min(state.num_computed_tokens // self.core.block_size, len(state.block_table))

    # ---- source ---------------------------------------------------------------------------

    def export_batch(
        self, request_id: str, start_block: int, end_block: int, max_bytes: int
    ) -> tuple[pb.BlockBatch, list[bytes]]:
        core = self.core
        if not (core.is_decoding(request_id) or core.is_suspended(request_id)):
            raise NotMigratable(f"request {request_id!r} is not decoding here")
        end = min(end_block, self._num_full_blocks(request_id))
        if end <= start_block:
            raise NotMigratable(f"request {request_id!r} has no block {start_block} any more")
        if self._payload_bytes:
            end = min(end, start_block + max(1, max_bytes // self._payload_bytes))
        else:
            end = start_block + 1
        copies = core.export_request_blocks(request_id, start_block, end)
        self._payload_bytes = len(copies[0].payload)
        first_parent = copies[0].parent_block_hash
        return pb.BlockBatch(
            first_block=start_block,
            block_hashes=[c.block_hash for c in copies],
            has_parent=first_parent is not None,
            parent_hash=first_parent or 0,
            token_ids=np.asarray([c.token_ids for c in copies], dtype="<i4").tobytes(),
            payload_bytes_per_block=self._payload_bytes,
        ), [c.payload for c in copies]

    def suspend(self, request_id: str) -> pb.RequestState:
        try:
            state, client_state = self.engine.suspend(request_id)
        except ValueError as exc:
            raise NotMigratable(str(exc)) from exc
        params = state.params
        partial = self.core.export_partial_block(request_id)
        reply = pb.RequestState(
            request_id=request_id,
            prompt_token_ids=state.prompt.astype("<i4", copy=False).tobytes(),
            output_token_ids=np.asarray(state.output_token_ids, dtype="<i4").tobytes(),
            max_tokens=state.max_tokens,
            temperature=params.temperature,
            seed=self.core.resolved_sampling_seed(request_id),
            stop_token_ids=list(params.stop_token_ids),
            num_cached_tokens=state.num_cached_tokens,
            client_state=client_state,
            num_full_blocks=self._num_full_blocks(request_id),
        )
        if partial is not None:
            tokens, parent, payload = partial
            reply.partial_block_token_ids = np.asarray(tokens, dtype="<i4").tobytes()
            reply.partial_block_payload = payload
            reply.partial_block_has_parent = parent is not None
            reply.partial_block_parent_hash = parent or 0
        return reply

    def resume(self, request_id: str) -> None:
        self.engine.resume(request_id)

    def release_migrated(self, request_id: str, instance_id: str, url: str) -> None:
        state = self.core.get_request(request_id)
        count = len(state.output_token_ids) if state is not None else 0
        self.engine.release_migrated(request_id, MigratedTo(instance_id, url, count))

    # ---- destination ----------------------------------------------------------------------

    def free_blocks(self) -> int:
        return self.core.block_manager.num_free_blocks

    def reserve_blocks(self, key: str, num_blocks: int) -> bool:
        return self.core.reserve_blocks(key, num_blocks)

    def num_reserved_blocks(self, key: str) -> int:
        return self.core.num_reserved_blocks(key)

    def release_reservation(self, key: str) -> None:
        self.core.release_reservation(key)

    def import_batch(self, key: str, batch: pb.BlockBatch, payload: memoryview) -> int:
        count = len(batch.block_hashes)
        block_size = self.core.block_size
        size = batch.payload_bytes_per_block
        tokens = np.frombuffer(batch.token_ids, dtype="<i4")
        if len(tokens) != count * block_size or len(payload) != count * size:
            raise ValueError("a block batch's tokens or payload do not match its block count")
        rows = tokens.reshape(count, block_size).tolist()
        parent: int | None = batch.parent_hash if batch.has_parent else None
        copies: list[KVBlockCopy] = []
        for index, block_hash in enumerate(batch.block_hashes):
            copies.append(KVBlockCopy(block_hash, parent, tuple(rows[index]),
                                      payload[index * size:(index + 1) * size].tobytes()))
            parent = block_hash
        try:
            return self.core.import_blocks(copies, reservation=key)
        except InsufficientKVBlocks as exc:
            raise OutOfBlocks(str(exc)) from exc

    def unpin_blocks(self, block_hashes: list[int]) -> None:
        self.core.unpin_blocks(block_hashes)

    def adopt(self, state: pb.RequestState, on_finish: Callable[[], None]) -> None:
        request = EngineRequest(
            request_id=state.request_id,
            prompt_token_ids=np.frombuffer(state.prompt_token_ids, dtype="<i4").tolist(),
            params=SamplingParams(max_tokens=state.max_tokens, temperature=state.temperature,
                                  seed=state.seed, stop_token_ids=tuple(state.stop_token_ids)),
            arrival_time=self.engine.engine_now(),
            output_token_ids=np.frombuffer(state.output_token_ids, dtype="<i4").tolist(),
        )
        self.engine.adopt(request, state.client_state, state.num_cached_tokens,
                          on_finish=on_finish, orphan_timeout_s=self.orphan_timeout_s)
        if state.partial_block_payload:
            # Best effort: without it the destination recomputes the partial block.
            self.core.preload_partial_block(
                state.request_id,
                np.frombuffer(state.partial_block_token_ids, dtype="<i4").tolist(),
                state.partial_block_parent_hash if state.partial_block_has_parent else None,
                state.partial_block_payload)
