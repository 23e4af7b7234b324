"""Data types shared by the reference engine's core, its executors and its callers.

The engine core is clock-agnostic: the caller passes the current engine time into
``EngineCore.step(now)`` and advances its own clock (real or virtual) by the returned
``StepResult.duration_s``. Nothing in ``instances.engine`` reads the wall clock or does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class SamplingParams:
    """What the client asked for. Token ids are engine token ids (byte-level, see tokenizer)."""

    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings are matched by the server on decoded text; the core only sees token ids.


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """One request inside the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TokenEvent:
    """What one iteration produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort" | None while running
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache at (last) admission


@dataclass(frozen=True)
class StepResult:
    """The outcome of one engine iteration; ``duration_s`` is device time it took."""

    duration_s: float
    events: tuple[TokenEvent, ...]
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A load snapshot, as vLLM's /metrics would report it."""

    num_running: int
    num_waiting: int
    kv_usage: float  # used blocks / total blocks, 0..1
    free_blocks: int
    total_blocks: int
    block_size: int
    waiting_prefill_tokens: int  # uncached prompt tokens not yet prefilled (waiting + partial)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int  # of which served from cache, cumulative
    num_preemptions: int


@dataclass(frozen=True)
class KVBlockCopy:
    """One full, computed KV block as it travels between engines (live migration).

    ``block_hash`` is the chained hash of ``token_ids`` under ``parent_block_hash``
    (``instances.engine.block_manager.hash_block_tokens``); ``payload`` is the block's KV
    bytes as the executor reads and writes them.
    """

    block_hash: int
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    payload: bytes
