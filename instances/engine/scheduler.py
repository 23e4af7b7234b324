"""Continuous-batching scheduler with chunked prefill and preemption (vLLM v1 style).

Each ``schedule(now)`` builds one iteration under a token budget
(``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``):

1. Running requests first, oldest first: a decoding request takes 1 token, a request still
   prefilling takes as many prompt tokens as the budget allows (chunked prefill). When the
   KV blocks it needs are not free, the newest running request is preempted (its blocks are
   freed, its progress forgotten, it goes back to the front of the waiting queue to be
   recomputed) until the blocks fit; if the request itself is the newest, it is the one
   preempted.
2. Then, only if nobody was preempted this step, waiting requests in FCFS order: each
   admission looks up the request's longest cached prefix (full blocks only, never the whole
   sequence: at least one token is always computed so there are logits to sample from), takes
   those blocks, and schedules the rest of its prompt as far as the budget allows. Admission
   stops at the first request that does not fit (no overtaking).

A sequence *samples* one token when its computed tokens reach the end of its known tokens.
After the executor ran, ``update_from_output`` advances progress, indexes newly full blocks in
the prefix cache, appends sampled tokens and finishes requests on a stop token / EOS
("stop") or ``max_tokens`` ("length").

Engine-level LAPS mode (``long_prefill_token_threshold > 0``): a request is *long* if, on
arrival, its uncached prompt tokens exceed the threshold, else *short*; each class has its
own FCFS queue, and preempted requests have a resume queue ahead of both. Per step:

1. Running requests as above, except that long requests still prefilling are deferred.
2. Admission: resumed requests; a *starving* long request (see below); then short requests,
   but only once they are *released* — the oldest has waited ``laps_short_wait_s`` since the
   engine first saw it, or the waiting shorts already fill the remaining budget or sequence
   slots — so that short prefills are batched together; then long requests.
3. The deferred long prefills, with whatever budget is left; they preempt (newest first)
   only when nothing else was scheduled, since otherwise two long prefills holding part of
   their blocks could wait for each other forever.

Anti-starvation: a long request that is prefilling or heads the long queue and gets no token
in ``laps_long_max_skipped_steps`` consecutive non-empty steps is starving; it is then
scheduled with the running requests (step 1) or admitted before the short queue, and
admission does not pass it. So short traffic delays a long request by a bounded number of
steps. When the only schedulable work is held short requests, the step schedules nothing and
reports ``hold_s``: the engine time until the oldest short is released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from instances.engine.block_manager import BlockManager
from instances.engine.config import EngineConfig
from instances.engine.executor import ScheduledBatch, ScheduledSequence
from instances.engine.profile import prefill_attention_pairs
from instances.engine.request import Request
from instances.engine.types import RequestStatus, TokenEvent

# Window comparisons tolerate clocks advanced by float sums of the reported hold time.
_TIME_EPSILON = 1e-9


@dataclass
class SchedulerOutput:
    batch: ScheduledBatch
    hold_s: float = 0.0  # > 0: nothing scheduled because LAPS holds short requests
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    """Decides which tokens of which requests each iteration computes (see module doc)."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.running: list[Request] = []
        self._resumed: deque[Request] = deque()  # preempted; ahead of every other queue
        self._waiting: deque[Request] = deque()  # FCFS queue, or LAPS short queue
        self._long: deque[Request] = deque()  # LAPS long queue
        self._unseen: list[Request] = []  # added since the last schedule (first_seen unset)
        self._short_queue_tokens = 0  # uncached prompt tokens queued in the short queue
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.pending_prefill_tokens = 0  # uncached prompt tokens not yet computed
        # Migrated-in requests: (block id, tokens) of their last partial block, copied in
        # with its KV (one reference held here until the request is admitted with it).
        self.preloads: dict[str, tuple[int, int]] = {}

    # ---- queues ---------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._resumed) + len(self._waiting) + len(self._long)

    def has_requests(self) -> bool:
        return bool(self.running or self._resumed or self._waiting or self._long)

    def add_request(self, request: Request) -> None:
        """Queue a new request (its block hashes are already computed)."""
        uncached = self._estimate_uncached_tokens(request)
        self._account_prefill(request, uncached)
        self._unseen.append(request)
        if self.config.laps_enabled and uncached > self.config.long_prefill_token_threshold:
            request.is_long = True
            self._long.append(request)
        else:
            self._waiting.append(request)
            self._short_queue_tokens += uncached

    def remove_request(self, request: Request) -> None:
        """Take a request out of whichever queue holds it and free its blocks (abort)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self._resumed:
            self._resumed.remove(request)
        elif request in self._long:
            self._long.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
            self._short_queue_tokens -= request.prefill_accounted
        self.block_manager.free(request.block_table)
        self.drop_preload(request.request_id)
        self._account_prefill(request, 0)

    def drop_preload(self, request_id: str) -> None:
        """Give back a preloaded partial block that was not used (unknown ids: ignored)."""
        preload = self.preloads.pop(request_id, None)
        if preload is not None:
            self.block_manager.free([preload[0]])

    # ---- scheduling -----------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        """Build the next iteration (see module docstring); does not run it."""
        for request in self._unseen:
            if request.first_seen is None:
                request.first_seen = now
        self._unseen.clear()
        config = self.config
        laps = config.laps_enabled
        block_size = self.block_size
        allocate = self.block_manager.allocate
        running = self.running
        scheduled: list[ScheduledSequence] = []
        preempted: list[Request] = []
        deferred: list[Request] = []
        budget = config.max_num_batched_tokens

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            if (
                laps
                and request.is_long
                and remaining > 1
                and request.skipped_steps < config.laps_long_max_skipped_steps
            ):
                deferred.append(request)
                index += 1
                continue
            num_new = remaining if remaining < budget else budget
            required = -(-(request.num_computed_tokens + num_new) // block_size)
            if not self._preempt_until_fits(request, required, preempted):
                break
            scheduled.append(
                ScheduledSequence(
                    request, request.num_computed_tokens, num_new, num_new == remaining
                )
            )
            budget -= num_new
            index += 1

        # 2. Admission of waiting requests (never in a step that preempted).
        hold_until: float | None = None
        if not preempted:
            budget, hold_until = self._admit(now, budget, scheduled)

        # 3. LAPS: deferred long prefills take what is left, without preempting anybody.
        if laps:
            scheduled_deferred: set[str] = set()
            for request in deferred:
                if budget <= 0:
                    break
                if request.status is not RequestStatus.RUNNING:
                    continue
                remaining = request.num_tokens - request.num_computed_tokens
                num_new = remaining if remaining < budget else budget
                required = -(-(request.num_computed_tokens + num_new) // block_size)
                if not allocate(request.block_table, required):
                    if scheduled:
                        continue  # others progress this step and will free blocks
                    # Nothing else runs: long prefills deadlock on each other's blocks unless
                    # one yields. Preempt from the newest as in step 1 (nobody is scheduled
                    # yet, so no victim can be in this iteration).
                    if not self._preempt_until_fits(request, required, preempted):
                        break
                scheduled.append(
                    ScheduledSequence(
                        request, request.num_computed_tokens, num_new, num_new == remaining
                    )
                )
                scheduled_deferred.add(request.request_id)
                budget -= num_new
            if scheduled:
                for request in deferred:
                    if request.request_id not in scheduled_deferred:
                        request.skipped_steps += 1
                if self._long and self._long[0].status is not RequestStatus.RUNNING:
                    self._long[0].skipped_steps += 1

        batch = self._build_batch(scheduled)
        hold_s = 0.0
        if not scheduled and hold_until is not None:
            hold_s = max(hold_until - now, _TIME_EPSILON)
        return SchedulerOutput(batch=batch, hold_s=hold_s, preempted=preempted)

    def _preempt_until_fits(
        self, request: Request, required_blocks: int, preempted: list[Request]
    ) -> bool:
        """Preempt the newest running requests until ``request`` gets its blocks; False if
        ``request`` itself had to be preempted."""
        running = self.running
        while not self.block_manager.allocate(request.block_table, required_blocks):
            victim = running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit(
        self, now: float, budget: int, scheduled: list[ScheduledSequence]
    ) -> tuple[int, float | None]:
        """Admit waiting requests in queue order; returns (budget left, LAPS release time)."""
        config = self.config
        if not config.laps_enabled:
            for queue in (self._resumed, self._waiting):
                budget, blocked = self._admit_from(queue, budget, scheduled)
                if blocked:
                    break
            return budget, None

        budget, blocked = self._admit_from(self._resumed, budget, scheduled)
        if blocked:
            return budget, None
        if self._long and self._long[0].skipped_steps >= config.laps_long_max_skipped_steps:
            budget, blocked = self._admit_from(self._long, budget, scheduled, limit=1)
            if blocked:
                return budget, None
        hold_until: float | None = None
        if self._waiting:
            release_at = self._short_release_time()
            free_slots = config.max_num_seqs - len(self.running)
            batch_full = len(self._waiting) >= free_slots or self._short_queue_tokens >= budget
            if batch_full or now + _TIME_EPSILON >= release_at:
                budget, blocked = self._admit_from(self._waiting, budget, scheduled)
                if blocked:
                    return budget, None
            else:
                hold_until = release_at
        budget, _ = self._admit_from(self._long, budget, scheduled)
        return budget, hold_until

    def _short_release_time(self) -> float:
        first_seen = self._waiting[0].first_seen
        assert first_seen is not None
        return first_seen + self.config.laps_short_wait_s

    def _admit_from(
        self,
        queue: deque[Request],
        budget: int,
        scheduled: list[ScheduledSequence],
        limit: int | None = None,
    ) -> tuple[int, bool]:
        """Admit from the front of ``queue``; returns (budget left, stopped by a misfit)."""
        config = self.config
        block_size = self.block_size
        manager = self.block_manager
        admitted = 0
        while queue and budget > 0 and (limit is None or admitted < limit):
            if len(self.running) >= config.max_num_seqs:
                return budget, True
            request = queue[0]
            num_tokens = request.num_tokens
            request.ensure_block_hashes(num_tokens // block_size, block_size)
            computed = manager.find_cached_prefix(
                request.block_hashes, (num_tokens - 1) // block_size
            )
            num_full_cached = len(computed)
            num_cached = num_full_cached * block_size
            preload = self.preloads.get(request.request_id) if self.preloads else None
            if preload is not None:
                if num_cached + preload[1] == num_tokens - 1:
                    # A migrated request whose full blocks are all here: its copied partial
                    # block completes the prefix, only the last sampled token is computed.
                    computed = [*computed, preload[0]]
                    num_cached += preload[1]
                else:
                    self.drop_preload(request.request_id)
                    preload = None
            num_new = min(num_tokens - num_cached, budget)
            required = -(-(num_cached + num_new) // block_size)
            if not manager.allocate(request.block_table, required, computed):
                return budget, True
            if preload is not None:
                del self.preloads[request.request_id]
                manager.free([preload[0]])  # the block table holds it now
            queue.popleft()
            if queue is self._waiting:
                self._short_queue_tokens -= request.prefill_accounted
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_blocks = num_full_cached
            request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
            request.skipped_steps = 0
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_cached
            self._account_prefill(request, num_tokens - num_cached)
            self.running.append(request)
            scheduled.append(
                ScheduledSequence(request, num_cached, num_new, num_cached + num_new == num_tokens)
            )
            budget -= num_new
            admitted += 1
        return budget, False

    def _build_batch(self, scheduled: list[ScheduledSequence]) -> ScheduledBatch:
        num_prefill_tokens = 0
        prefill_pairs = 0
        num_decode = 0
        decode_context = 0
        for seq in scheduled:
            start = seq.num_computed_tokens
            if seq.num_new_tokens == 1 and start >= seq.request.num_prompt_tokens:
                num_decode += 1
                decode_context += start + 1
            else:
                num_prefill_tokens += seq.num_new_tokens
                prefill_pairs += prefill_attention_pairs(start, seq.num_new_tokens)
        return ScheduledBatch(
            sequences=scheduled,
            num_prefill_tokens=num_prefill_tokens,
            prefill_attn_pairs=prefill_pairs,
            num_decode_seqs=num_decode,
            decode_context_tokens=decode_context,
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.block_table)
        request.num_computed_tokens = 0
        request.num_cached_blocks = 0
        request.status = RequestStatus.PREEMPTED
        self._resumed.appendleft(request)
        self.num_preemptions += 1
        self._account_prefill(request, self._estimate_uncached_tokens(request))

    # ---- results --------------------------------------------------------------------------

    def update_from_output(
        self, batch: ScheduledBatch, sampled_token_ids: Sequence[int]
    ) -> tuple[list[TokenEvent], list[Request]]:
        """Apply an executed iteration; returns (token events, requests that finished)."""
        block_size = self.block_size
        manager = self.block_manager
        kv_events = manager.enable_kv_events
        events: list[TokenEvent] = []
        finished: list[Request] = []
        for seq, token in zip(batch.sequences, sampled_token_ids, strict=True):
            request = seq.request
            num_computed = seq.num_computed_tokens + seq.num_new_tokens
            request.num_computed_tokens = num_computed
            num_full = num_computed // block_size
            if num_full > request.num_cached_blocks:
                request.ensure_block_hashes(num_full, block_size)
                manager.cache_blocks(
                    request.block_table,
                    request.block_hashes,
                    request.num_cached_blocks,
                    num_full,
                    _block_tokens_of(request, block_size) if kv_events else None,
                )
                request.num_cached_blocks = num_full
            if request.prefill_accounted:
                self._account_prefill(request, request.num_tokens - num_computed)
            if request.is_long:
                request.skipped_steps = 0
            if not seq.samples:
                continue
            request.output_token_ids.append(token)
            if token in request.stop_token_ids:
                request.finish_reason = "stop"
            elif len(request.output_token_ids) >= request.max_tokens:
                request.finish_reason = "length"
            events.append(
                TokenEvent(
                    request.request_id,
                    (token,),
                    request.finish_reason is not None,
                    request.finish_reason,
                    request.num_prompt_tokens,
                    request.num_cached_tokens,
                )
            )
            if request.finish_reason is not None:
                request.status = RequestStatus.FINISHED
                manager.free(request.block_table)
                self._account_prefill(request, 0)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return events, finished

    # ---- accounting -----------------------------------------------------------------------

    def _estimate_uncached_tokens(self, request: Request) -> int:
        num_tokens = request.num_tokens
        request.ensure_block_hashes(num_tokens // self.block_size, self.block_size)
        max_blocks = (num_tokens - 1) // self.block_size
        cached_blocks = self.block_manager.num_cached_prefix_blocks(
            request.block_hashes[:max_blocks]
        )
        return num_tokens - cached_blocks * self.block_size

    def _account_prefill(self, request: Request, tokens: int) -> None:
        """Set ``request``'s share of ``pending_prefill_tokens`` (prefill work not yet done)."""
        self.pending_prefill_tokens += tokens - request.prefill_accounted
        request.prefill_accounted = tokens


def _block_tokens_of(request: Request, block_size: int) -> Callable[[int], Sequence[int]]:
    def block_tokens(index: int) -> Sequence[int]:
        return request.token_slice(index * block_size, (index + 1) * block_size).tolist()

    return block_tokens
