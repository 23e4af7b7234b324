"""Hardware profiles and the iteration-time model shared by every executor.

One iteration (one ``EngineCore.step``) of a batch takes, in this model::

    duration = iteration_floor_s
             + prefill_s_per_token       * P
             + prefill_attn_s_per_ktoken * A_prefill / 1000
             + decode_s_per_seq          * D
             + decode_attn_s_per_ktoken  * A_decode  / 1000

where ``P`` is the number of prompt tokens computed in the iteration (cached prefix tokens are
never computed, so they cost nothing), ``A_prefill`` is the number of (query, key) pairs those
prompt tokens attend to (a token at position ``p`` attends to ``p + 1`` keys, so a chunk
``[c, c + n)`` contributes ``n * c + n * (n + 1) / 2``), ``D`` is the number of sequences
decoding one token, and ``A_decode`` is the summed context length of the decoding sequences.

Why this affine form rather than ``max(floor, compute)``: a vLLM iteration pays a fixed cost
(reading the weights once, kernel launches, scheduling) whatever the batch holds, and measured
TTFT/ITL curves are straight lines in prompt length / batch size with that cost as intercept;
the linear terms are the compute-bound GEMM cost per token and the memory-bound KV read of
decode attention. The prefill attention term is quadratic in prompt length and matters for
the 10k+-token prompts of the Mooncake trace; profiles whose source gives only a linear fit
(DualMap) set it to zero.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    """Timing and KV-capacity coefficients of one (accelerator, model) pair, with sources."""

    name: str
    prefill_s_per_token: float
    iteration_floor_s: float
    decode_s_per_seq: float
    decode_attn_s_per_ktoken: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    source: str
    prefill_attn_s_per_ktoken: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        for field_name in (
            "prefill_s_per_token",
            "iteration_floor_s",
            "decode_s_per_seq",
            "decode_attn_s_per_ktoken",
            "prefill_attn_s_per_ktoken",
        ):
            if getattr(self, field_name) < 0:
                raise ValueError(f"profile {self.name}: {field_name} must be >= 0")
        if self.kv_bytes_per_token <= 0 or self.kv_capacity_tokens <= 0:
            raise ValueError(f"profile {self.name}: KV size and capacity must be positive")

    def iteration_time(
        self,
        num_prefill_tokens: int,
        prefill_attn_pairs: int,
        num_decode_seqs: int,
        decode_context_tokens: int,
    ) -> float:
        """Duration of one iteration (see the module docstring); 0 for an empty batch."""
        if num_prefill_tokens == 0 and num_decode_seqs == 0:
            return 0.0
        return (
            self.iteration_floor_s
            + self.prefill_s_per_token * num_prefill_tokens
            + self.prefill_attn_s_per_ktoken * prefill_attn_pairs / 1000.0
            + self.decode_s_per_seq * num_decode_seqs
            + self.decode_attn_s_per_ktoken * decode_context_tokens / 1000.0
        )

    def prefill_time(self, num_tokens: int, num_cached_tokens: int = 0) -> float:
        """Duration of one iteration that prefills only ``[num_cached_tokens, num_tokens)``."""
        new_tokens = num_tokens - num_cached_tokens
        return self.iteration_time(
            new_tokens, prefill_attention_pairs(num_cached_tokens, new_tokens), 0, 0
        )

    def decode_time(self, num_seqs: int, context_tokens_per_seq: int) -> float:
        """Duration of one pure-decode iteration of ``num_seqs`` equally long sequences."""
        return self.iteration_time(0, 0, num_seqs, num_seqs * context_tokens_per_seq)


def prefill_attention_pairs(start: int, num_tokens: int) -> int:
    """(query, key) pairs of causal attention for the tokens at positions ``[start, start+n)``."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2
