"""The engine core's per-request state (internal; callers see ``EngineRequest``)."""

from __future__ import annotations

import numpy as np

from instances.engine.block_manager import compute_block_hashes
from instances.engine.types import EngineRequest, RequestStatus, SamplingParams
from proto.byte_tokenizer import EOS_TOKEN_ID
from proto.tokens import TokenArray, as_token_array


class Request:
    """A request as the scheduler tracks it.

    Tokens are ``prompt`` (an int32 array, hashed once) followed by ``output_token_ids``.
    ``num_computed_tokens`` of them have KV in the blocks of ``block_table``. The block hashes
    of full blocks are computed once and extended as output tokens fill blocks.
    """

    __slots__ = (
        "block_hashes",
        "block_table",
        "engine_request",
        "finish_reason",
        "first_seen",
        "is_long",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_prompt_tokens",
        "output_token_ids",
        "params",
        "prefill_accounted",
        "prompt",
        "request_id",
        "skipped_steps",
        "status",
        "stop_token_ids",
    )

    def __init__(
        self, engine_request: EngineRequest, block_size: int, prompt: TokenArray | None = None
    ) -> None:
        self.engine_request = engine_request
        self.request_id = engine_request.request_id
        self.params: SamplingParams = engine_request.params
        self.prompt: TokenArray = (
            as_token_array(engine_request.prompt_token_ids) if prompt is None else prompt
        )
        self.num_prompt_tokens = len(self.prompt)
        # Shared with the caller's EngineRequest so it sees the generated tokens too.
        self.output_token_ids: list[int] = engine_request.output_token_ids
        self.max_tokens = self.params.max_tokens
        # The caller's stop tokens (its tokenizer's EOS); byte-level EOS when it names none.
        self.stop_token_ids = frozenset(self.params.stop_token_ids) or frozenset({EOS_TOKEN_ID})
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = compute_block_hashes(self.prompt, block_size)
        self.num_cached_blocks = 0  # leading blocks of block_table indexed in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from cache at (last) admission
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.first_seen: float | None = None  # engine time of the first step that saw it
        self.is_long = False  # LAPS class, fixed on arrival
        self.prefill_accounted = 0  # this request's share of the waiting-prefill counter
        self.skipped_steps = 0  # LAPS: consecutive steps a long request got no tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> TokenArray:
        """Token ids at positions ``[start, end)`` (prompt and output) as int32."""
        prompt_len = self.num_prompt_tokens
        if end <= prompt_len:
            return self.prompt[start:end]
        outputs = np.asarray(
            self.output_token_ids[max(start - prompt_len, 0) : end - prompt_len], dtype="<i4"
        )
        if start >= prompt_len:
            return outputs
        return np.concatenate([self.prompt[start:], outputs])

    def all_token_ids(self) -> TokenArray:
        return self.token_slice(0, self.num_tokens)

    def ensure_block_hashes(self, num_full_blocks: int, block_size: int) -> None:
        """Extend ``block_hashes`` to cover ``num_full_blocks`` blocks (tokens must exist)."""
        have = len(self.block_hashes)
        if have >= num_full_blocks:
            return
        parent = self.block_hashes[-1] if have else None
        tokens = self.token_slice(have * block_size, num_full_blocks * block_size)
        self.block_hashes.extend(compute_block_hashes(tokens, block_size, parent))
