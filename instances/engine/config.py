"""Configuration of the reference engine core (scheduler + block manager)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine core; defaults follow vLLM v1 where it has the same knob.

    ``long_prefill_token_threshold > 0`` turns on the engine-level LAPS mode (see
    ``instances.engine.scheduler``): waiting requests whose uncached prompt tokens exceed the
    threshold go to a long queue, the others to a short queue that is served first but may
    hold its requests up to ``laps_short_wait_s`` so that several short prefills share an
    iteration.
    """

    block_size: int = 16
    num_gpu_blocks: int | None = None  # None -> profile's KV capacity / block_size
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_kv_events: bool = False
    long_prefill_token_threshold: int = 0  # engine-level LAPS mode when > 0
    laps_short_wait_s: float = 0.0
    # LAPS anti-starvation: a long request (waiting or mid-prefill) that got no tokens for
    # this many consecutive non-idle steps is served before the short queue in the next one.
    laps_long_max_skipped_steps: int = 8

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError(f"num_gpu_blocks must be positive, got {self.num_gpu_blocks}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if self.laps_short_wait_s < 0:
            raise ValueError("laps_short_wait_s must be >= 0")
        if self.laps_long_max_skipped_steps <= 0:
            raise ValueError("laps_long_max_skipped_steps must be positive")

    @property
    def laps_enabled(self) -> bool:
        return self.long_prefill_token_threshold > 0
