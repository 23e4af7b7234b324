"""Executor interface: turns one scheduled iteration into its duration and sampled tokens.

The scheduler hands the executor a ``ScheduledBatch``; for every sequence it says which
positions to compute (``[num_computed_tokens, num_computed_tokens + num_new_tokens)``) and
whether the sequence *samples* (its computed tokens then reach the end of its known tokens:
a prompt whose prefill completes, or a decode step). The executor returns one new token id
per sampling sequence and the device time the iteration took. Executors never read the
clock: time comes from a ``HardwareProfile``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from instances.engine.profile import HardwareProfile
from instances.engine.request import Request
from instances.engine.types import SamplingParams


class ScheduledSequence:
    """One request's share of an iteration. ``request`` is read-only for executors."""

    __slots__ = ("num_computed_tokens", "num_new_tokens", "request", "samples")

    def __init__(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int, samples: bool
    ) -> None:
        self.request = request
        self.num_computed_tokens = num_computed_tokens
        self.num_new_tokens = num_new_tokens
        self.samples = samples

    @property
    def is_decode(self) -> bool:
        """One token past the prompt: an ordinary decode step (not a (re)prefill)."""
        return self.num_new_tokens == 1 and self.num_computed_tokens >= (
            self.request.num_prompt_tokens
        )


@dataclass
class ScheduledBatch:
    """An iteration: sequences in schedule order plus the aggregates the timing model uses."""

    sequences: list[ScheduledSequence]
    num_prefill_tokens: int = 0  # tokens computed by non-decode sequences
    prefill_attn_pairs: int = 0  # causal (query, key) pairs of those tokens
    num_decode_seqs: int = 0
    decode_context_tokens: int = 0  # summed context (keys) of decoding sequences

    def iteration_time(self, profile: HardwareProfile) -> float:
        return profile.iteration_time(
            self.num_prefill_tokens,
            self.prefill_attn_pairs,
            self.num_decode_seqs,
            self.decode_context_tokens,
        )


@dataclass(frozen=True)
class ExecuteResult:
    """Device time of the iteration and, aligned with ``batch.sequences``, the sampled token
    of each sampling sequence (-1 where the sequence did not sample)."""

    duration_s: float
    sampled_token_ids: list[int]


class Executor(ABC):
    """Runs iterations. Subclasses own any device state (KV tensors, per-request caches)."""

    profile: HardwareProfile | None = None
    seed: int = 0  # engine seed: random sampling of requests without their own seed

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids the model accepts are ``0 .. vocab_size - 1``."""

    def default_num_blocks(self, block_size: int) -> int:
        """KV capacity in blocks when the config does not fix it (profile's capacity)."""
        if self.profile is None:
            raise ValueError("executor has no profile: set EngineConfig.num_gpu_blocks")
        return self.profile.kv_capacity_tokens // block_size

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        """Called once by the core before the first iteration (allocate KV storage here)."""

    @abstractmethod
    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        """Compute the iteration; must not read the clock."""

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: drop per-request state."""

    @abstractmethod
    def read_block(self, block_id: int, token_ids: Sequence[int], parent_hash: int | None) -> bytes:
        """The KV bytes of block ``block_id``, which holds ``token_ids`` (for migration)."""

    @abstractmethod
    def write_block(
        self, block_id: int, token_ids: Sequence[int], parent_hash: int | None, payload: bytes
    ) -> None:
        """Store a copied block's KV bytes into ``block_id``; ValueError if they cannot be
        this block's (wrong size, or a checksum mismatch where the executor can tell)."""


def sampling_seed(params: SamplingParams, request_id: str, engine_seed: int) -> int:
    """The seed random sampling uses: the request's own, else one from (engine seed, id).

    Greedy requests (temperature 0) ignore seeds altogether.
    """
    if params.seed is not None:
        return params.seed & 0xFFFFFFFFFFFFFFFF
    return xxhash.xxh3_64_intdigest(request_id.encode("utf-8"), engine_seed & 0xFFFFFFFFFFFFFFFF)


def uniform_for_position(seed: int, position: int) -> float:
    """A uniform [0, 1) draw that depends only on (seed, position of the sampled token), so a
    recomputed (preempted) or batched sequence draws the same number."""
    return xxhash.xxh3_64_intdigest(position.to_bytes(8, "little"), seed) / 2.0**64
