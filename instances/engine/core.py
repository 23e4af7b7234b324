"""The reference engine core: scheduler + block manager + executor, driven by a clock.

``EngineCore`` never reads the clock and never does I/O. A driver (the HTTP server in real
time, the simulator in virtual time) calls ``add_request`` / ``abort_request`` whenever it
likes and ``step(now)`` in a loop, advancing its clock by ``StepResult.duration_s``:

    while core.has_unfinished_requests():
        result = core.step(clock)
        clock += result.duration_s
        deliver(result.events)

``step`` schedules one iteration (``instances.engine.scheduler``), runs it on the executor,
and applies the result: one ``TokenEvent`` per request that sampled a token this iteration,
plus a finished event (``finish_reason="abort"``, no tokens) for each request aborted since
the previous step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from instances.engine.block_manager import (
    BlockManager,
    as_token_array,
    compute_block_hashes,
    hash_block_tokens,
)
from instances.engine.config import EngineConfig
from instances.engine.executor import Executor, sampling_seed
from instances.engine.profile import HardwareProfile
from instances.engine.request import Request
from instances.engine.scheduler import Scheduler
from instances.engine.types import (
    EngineRequest,
    EngineStats,
    KVBlockCopy,
    RequestStatus,
    StepResult,
    TokenEvent,
)
from proto.kv_events import KVEvent


class InsufficientKVBlocks(RuntimeError):
    """Not enough free KV blocks to take imported blocks (the import changed nothing)."""


class EngineCore:
    """One engine replica's core (see module docstring)."""

    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        num_blocks = config.num_gpu_blocks or executor.default_num_blocks(config.block_size)
        if num_blocks <= 0:
            raise ValueError("the KV cache must hold at least one block")
        executor.initialize_cache(num_blocks, config.block_size)
        self.block_manager = BlockManager(
            num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_kv_events=config.enable_kv_events,
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self._requests: dict[str, Request] = {}
        self._aborted_events: list[TokenEvent] = []
        self._pinned: dict[int, int] = {}  # imported block hash -> block id (one reference)
        self._suspended: dict[str, Request] = {}  # stopped for a migration handoff
        self._reservations: dict[str, list[int]] = {}  # migration key -> reserved blocks
        self.num_steps = 0

    # ---- properties -----------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.executor.vocab_size

    @property
    def profile(self) -> HardwareProfile | None:
        return self.executor.profile

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue ``request``; raises ValueError if it can never be served.

        Rejected: a duplicate id, an empty prompt, ``max_tokens < 1``, a token id outside
        ``0 .. vocab_size - 1``, or prompt + ``max_tokens`` above the KV capacity in tokens.
        ``request.output_token_ids`` is appended to as tokens are generated.
        """
        request_id = request.request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt = self._validated_prompt(request.prompt_token_ids)
        max_tokens = request.params.max_tokens
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        # Tokens already generated (a migrated request) count against max_tokens.
        needed = len(prompt) + max(max_tokens, len(request.output_token_ids) + 1)
        if needed > self.kv_capacity_tokens:
            raise ValueError(
                f"request {request_id!r} needs {len(prompt)} prompt + {max_tokens} output "
                f"tokens = {needed} KV slots, more than this engine's capacity of "
                f"{self.kv_capacity_tokens} tokens ({self.num_blocks} blocks of "
                f"{self.block_size})"
            )
        state = Request(request, self.config.block_size, prompt=prompt)
        self._requests[request_id] = state
        self.scheduler.add_request(state)

    def abort_request(self, request_id: str, finish_reason: str = "abort") -> None:
        """Drop a request and free its blocks; the next step reports it finished with
        ``finish_reason`` ("abort", or "migrated" once a migration committed it elsewhere).
        Unknown or already finished ids are ignored."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        if self._suspended.pop(request_id, None) is not None:
            self.block_manager.free(state.block_table)  # not in any scheduler queue
        else:
            self.scheduler.remove_request(state)
        state.status = RequestStatus.FINISHED
        state.finish_reason = finish_reason
        self.executor.release(request_id)
        self._aborted_events.append(
            TokenEvent(
                request_id, (), True, finish_reason, state.num_prompt_tokens,
                state.num_cached_tokens,
            )
        )

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued or running, or an abort is not yet reported.

        Suspended requests (``suspend_request``) do not count: they do not step."""
        return self.scheduler.has_requests() or bool(self._aborted_events)

    # ---- the loop -------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and execute one iteration at engine time ``now``.

        Returns the iteration's device time and events. With nothing to run it returns
        ``duration_s == 0`` (or, in LAPS mode while short requests are held to batch, the
        time until they are released) and only pending abort events.
        """
        aborted = self._aborted_events
        self._aborted_events = []
        output = self.scheduler.schedule(now)
        batch = output.batch
        if not batch.sequences:
            return StepResult(duration_s=output.hold_s, events=tuple(aborted))
        result = self.executor.execute(batch)
        events, finished = self.scheduler.update_from_output(batch, result.sampled_token_ids)
        for state in finished:
            del self._requests[state.request_id]
            self.executor.release(state.request_id)
        self.num_steps += 1
        if aborted:
            events = aborted + events
        return StepResult(
            duration_s=result.duration_s,
            events=tuple(events),
            num_prefill_tokens=batch.num_prefill_tokens,
            num_decode_seqs=batch.num_decode_seqs,
        )

    # ---- observation ----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """A load snapshot (O(1))."""
        manager = self.block_manager
        scheduler = self.scheduler
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=scheduler.num_waiting,
            kv_usage=manager.usage,
            free_blocks=manager.num_free_blocks,
            total_blocks=manager.num_blocks,
            block_size=manager.block_size,
            waiting_prefill_tokens=scheduler.pending_prefill_tokens,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
        )

    def drain_kv_events(self) -> list[KVEvent]:
        """KV cache events since the last call (only with ``enable_kv_events``)."""
        return self.block_manager.drain_events()

    def num_cached_prefix_tokens(self, token_ids: Sequence[int] | npt.NDArray[np.integer]) -> int:
        """Tokens of ``token_ids``' longest cached prefix (full blocks); changes nothing."""
        block_hashes = compute_block_hashes(token_ids, self.config.block_size)
        return self.block_manager.num_cached_prefix_blocks(block_hashes) * self.config.block_size

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; False (nothing done) while any block is in use."""
        return self.block_manager.reset_prefix_cache()

    # ---- live migration support -----------------------------------------------------------

    def export_request_blocks(
        self, request_id: str, start_block: int = 0, end_block: int | None = None
    ) -> list[KVBlockCopy]:
        """Copies of a running request's full, computed KV blocks ``[start, end)``.

        ``end_block`` defaults to every full computed block. Read-only; the request keeps
        running (pre-copy stages export while it decodes). KeyError for an unknown request.
        """
        state = self._requests[request_id]
        block_size = self.config.block_size
        num_full = min(state.num_computed_tokens // block_size, len(state.block_table))
        end = num_full if end_block is None else min(end_block, num_full)
        state.ensure_block_hashes(end, block_size)
        copies = []
        for index in range(start_block, end):
            tokens = state.token_slice(index * block_size, (index + 1) * block_size).tolist()
            parent = state.block_hashes[index - 1] if index > 0 else None
            payload = self.executor.read_block(state.block_table[index], tokens, parent)
            copies.append(KVBlockCopy(state.block_hashes[index], parent, tuple(tokens), payload))
        return copies

    def is_decoding(self, request_id: str) -> bool:
        """Whether a request is running with its whole prompt computed (migratable): every
        token but the last sampled one has KV."""
        state = self._requests.get(request_id)
        return (
            state is not None
            and request_id not in self._suspended
            and state.status is RequestStatus.RUNNING
            and bool(state.output_token_ids)
            and state.num_computed_tokens == state.num_tokens - 1
        )

    def is_suspended(self, request_id: str) -> bool:
        return request_id in self._suspended

    def suspend_request(self, request_id: str) -> Request:
        """Stop a decoding request for a migration handoff; it keeps its blocks.

        The request takes no part in steps until ``resume_request`` (the handoff failed) or
        ``abort_request(request_id, "migrated")`` (it runs elsewhere now). Its blocks can
        still be exported. ValueError unless ``is_decoding``.
        """
        if not self.is_decoding(request_id):
            raise ValueError(f"request {request_id!r} is not decoding here")
        state = self._requests[request_id]
        self.scheduler.running.remove(state)
        self._suspended[request_id] = state
        return state

    def resume_request(self, request_id: str) -> None:
        """Put a suspended request back to decoding (it becomes the newest running one)."""
        state = self._suspended.pop(request_id)
        self.scheduler.running.append(state)

    def export_partial_block(
        self, request_id: str
    ) -> tuple[tuple[int, ...], int | None, bytes] | None:
        """The KV of a request's last, partly filled block: (its computed tokens, the
        previous block's hash, payload); None when its computed tokens fill whole blocks."""
        state = self._requests[request_id]
        block_size = self.config.block_size
        num_full, partial = divmod(state.num_computed_tokens, block_size)
        if partial == 0 or len(state.block_table) <= num_full:
            return None
        state.ensure_block_hashes(num_full, block_size)
        parent = state.block_hashes[num_full - 1] if num_full else None
        tokens = tuple(state.token_slice(num_full * block_size,
                                         state.num_computed_tokens).tolist())
        payload = self.executor.read_block(state.block_table[num_full], tokens, parent)
        return tokens, parent, payload

    def preload_partial_block(
        self, request_id: str, token_ids: Sequence[int], parent_hash: int | None,
        payload: bytes,
    ) -> bool:
        """Copy in the last partial block of a just-added migrated request, so that its
        admission computes only its last sampled token. Used only if every full block
        before it is cached then; False (nothing kept) if no block is free or the payload
        is refused."""
        state = self._requests.get(request_id)
        if state is None or not 0 < len(token_ids) < self.config.block_size:
            return False
        table: list[int] = []
        if not self.block_manager.allocate(table, 1):
            return False
        try:
            self.executor.write_block(table[0], token_ids, parent_hash, payload)
        except ValueError:
            self.block_manager.free(table)
            return False
        self.scheduler.drop_preload(request_id)
        self.scheduler.preloads[request_id] = (table[0], len(token_ids))
        return True

    def resolved_sampling_seed(self, request_id: str) -> int:
        """The seed the request's random draws use here (its own, else derived from the
        engine seed and its id): a destination given it explicitly draws the same."""
        state = self._requests[request_id]
        return sampling_seed(state.params, request_id, self.executor.seed)

    # ---- block reservations (migration destination) ----------------------------------------

    def reserve_blocks(self, key: str, num_blocks: int) -> bool:
        """Take ``num_blocks`` more free blocks out of circulation for the migration ``key``
        (``import_blocks(..., reservation=key)`` fills them); False, nothing taken, when
        there are not that many free blocks."""
        table = self._reservations.setdefault(key, [])
        if num_blocks <= 0:
            return True
        extra: list[int] = []
        if not self.block_manager.allocate(extra, num_blocks):
            return False
        table.extend(extra)
        return True

    def num_reserved_blocks(self, key: str | None = None) -> int:
        """Blocks held by one reservation, or by all of them."""
        if key is not None:
            return len(self._reservations.get(key, ()))
        return sum(len(table) for table in self._reservations.values())

    def release_reservation(self, key: str) -> None:
        """Give a reservation's unused blocks back (unknown keys are ignored)."""
        table = self._reservations.pop(key, None)
        if table:
            self.block_manager.free(table)

    def import_blocks(
        self, blocks: Sequence[KVBlockCopy], reservation: str | None = None
    ) -> int:
        """Store copied blocks in this engine's prefix cache and pin them.

        Each block's hash is checked against its tokens and parent, its payload by the
        executor (ValueError on a mismatch). Blocks already cached here are pinned, not
        copied. Pinned blocks are never evicted until ``unpin_blocks``; a request added
        later whose tokens start with them reuses them through the ordinary prefix lookup,
        so a migrated request recomputes only its last partial block. With ``reservation``
        the blocks are taken from that reservation first (``reserve_blocks``). All or
        nothing: raises ``InsufficientKVBlocks`` when the blocks do not fit and ValueError
        on a bad copy, pinning nothing in either case.
        Returns how many blocks were copied (not already cached).
        """
        block_size = self.config.block_size
        if not self.config.enable_prefix_caching:
            raise ValueError("importing KV blocks needs prefix caching")
        for block in blocks:
            if len(block.token_ids) != block_size:
                raise ValueError(f"a KV block copy must hold {block_size} tokens")
            if hash_block_tokens(block.parent_block_hash, block.token_ids) != block.block_hash:
                raise ValueError("a KV block copy's hash does not match its tokens")
        manager = self.block_manager
        fresh = list({b.block_hash: b for b in blocks if b.block_hash not in self._pinned}.values())
        # Each fresh block takes one block out of the free queue: a new one, or a cached
        # one nobody references yet.
        needed = 0
        for block in fresh:
            block_id = manager.cached_block(block.block_hash)
            if block_id is None or manager.ref_count(block_id) == 0:
                needed += 1
        reserved = self._reservations.get(reservation, []) if reservation is not None else []
        if needed > manager.num_free_blocks + len(reserved):
            raise InsufficientKVBlocks(
                f"{needed} free KV blocks needed, {manager.num_free_blocks} available"
                + (f" + {len(reserved)} reserved" if reserved else "")
            )
        if reserved:
            # Hand the reserved blocks back just before taking them: they hold no cached
            # content, so the free queue gives them out first, and nothing runs in between.
            give_back = reserved[-min(needed, len(reserved)):] if needed else []
            del reserved[len(reserved) - len(give_back):]
            self.block_manager.free(give_back)
        copied = 0
        pinned_now: list[int] = []
        for block in fresh:
            block_id = manager.acquire_cached(block.block_hash)
            if block_id is None:
                block_id = manager.store_block(
                    block.block_hash, block.parent_block_hash, block.token_ids
                )
                assert block_id is not None  # room was checked above
                try:
                    self.executor.write_block(
                        block_id, block.token_ids, block.parent_block_hash, block.payload
                    )
                except ValueError:
                    manager.free([block_id])
                    manager.forget(block_id)
                    self.unpin_blocks(pinned_now)  # all or nothing
                    raise
                copied += 1
            self._pinned[block.block_hash] = block_id
            pinned_now.append(block.block_hash)
        return copied

    def unpin_blocks(self, block_hashes: Sequence[int]) -> None:
        """Release pinned imported blocks; they stay cached (evictable). Unknown: ignored."""
        for block_hash in block_hashes:
            block_id = self._pinned.pop(block_hash, None)
            if block_id is not None:
                self.block_manager.free([block_id])

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned)

    def get_request(self, request_id: str) -> Request | None:
        """The core's state of an unfinished request (read-only for callers)."""
        return self._requests.get(request_id)

    # ---- internals ------------------------------------------------------------------------

    def _validated_prompt(
        self, token_ids: Sequence[int] | npt.NDArray[np.integer]
    ) -> npt.NDArray[np.int32]:
        if len(token_ids) == 0:
            raise ValueError("the prompt is empty: at least one token is required")
        vocab_size = self.executor.vocab_size
        try:
            tokens = as_token_array(token_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(
                f"prompt token ids must be integers in 0..{vocab_size - 1}: {exc}"
            ) from exc
        if tokens.ndim != 1:
            raise ValueError("prompt token ids must be a flat sequence")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range: this model's vocabulary is 0..{vocab_size - 1}"
            )
        return tokens
