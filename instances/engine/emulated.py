"""Emulated executor: calibrated GPU timing, deterministic text, checksum-verifiable KV bytes.

Timing: ``HardwareProfile.iteration_time`` of the batch (see ``instances.engine.profile``).

Tokens: a sampling sequence's next token is a function of (seed, whole token history) only.
The history is folded into a 64-bit polynomial rolling hash
``h_n = h_{n-1} * P + (t_n + 1)  (mod 2**64)``, kept per request so each step folds only the
new tokens (a prompt is folded once, vectorized); the token is
``ALPHABET[splitmix64(h ^ seed_key) >> 59]`` — lowercase letters and spaces, so the text reads
like words and never contains EOS (requests end on ``max_tokens`` or a stop token). Greedy
requests (temperature 0) use seed_key 0, so the same prompt always gives the same output on
any replica; a prompt that already holds earlier output (token-replay migration) continues
exactly where the original left off.

KV bytes: a block's payload is ``block_payload(block token ids, parent hash)``, bytes derived
from the block's chained hash (PCG64 raw stream); generated on demand, never in ``execute``,
so migration can copy a block and check it with ``verify_block_payload``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from instances.engine.block_manager import hash_block_tokens
from instances.engine.executor import (
    ExecuteResult,
    Executor,
    ScheduledBatch,
    sampling_seed,
)
from instances.engine.profile import HardwareProfile
from proto.byte_tokenizer import VOCAB_SIZE
from proto.tokenize import Tokenizer, text_alphabet

_MASK64 = 0xFFFFFFFFFFFFFFFF
_ROLL_MULTIPLIER = 0x100000001B3  # FNV-64 prime: odd, so the fold is a bijection per step
# 26 letters (frequency order) + 6 spaces = 32 entries, indexed by the top 5 hash bits.
ALPHABET: tuple[int, ...] = tuple(b"etaoinshrdlcumwfgypbvkjxqz      ")
DEFAULT_PAYLOAD_BYTES = 4096


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def fold_tokens(state: int, token_ids: npt.NDArray[np.integer] | Sequence[int]) -> int:
    """Continue the rolling history hash ``state`` over ``token_ids`` (vectorized)."""
    tokens = np.asarray(token_ids, dtype=np.uint64)
    n = len(tokens)
    if n == 0:
        return state
    if n <= 4:
        for t in tokens.tolist():
            state = (state * _ROLL_MULTIPLIER + t + 1) & _MASK64
        return state
    # h = state * P^n + sum_i (t_i + 1) * P^(n-1-i), all mod 2^64 (uint64 wraps).
    powers = np.full(n, _ROLL_MULTIPLIER, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)  # P^0 .. P^(n-1)
    weighted = (tokens + np.uint64(1)) * powers[::-1]
    total = int(weighted.sum(dtype=np.uint64))
    p_n = int(powers[-1]) * _ROLL_MULTIPLIER & _MASK64
    return (state * p_n + total) & _MASK64


def alphabet_for(tokenizer: Tokenizer) -> tuple[int, ...]:
    """``ALPHABET``'s characters in ``tokenizer``'s ids (cycled to 32 entries if some
    character is not a single token), so emulated text reads as letters and spaces."""
    ids = text_alphabet(tokenizer, bytes(ALPHABET).decode())
    return tuple(ids[i % len(ids)] for i in range(len(ALPHABET)))


def history_token(history_hash: int, seed_key: int) -> int:
    """The emulated model's next token for a history hash."""
    return ALPHABET[_splitmix64(history_hash ^ seed_key) >> 59]


def block_payload(
    token_ids: Sequence[int] | npt.NDArray[np.integer],
    parent_hash: int | None,
    num_bytes: int = DEFAULT_PAYLOAD_BYTES,
) -> bytes:
    """The emulated KV bytes of one block: a PCG64 stream seeded by the block's chained hash.

    A scaled-down stand-in for the real tensors (a few KiB instead of MiBs), deterministic
    on every machine, so a copied block can be verified against its tokens.
    """
    seed = hash_block_tokens(parent_hash, token_ids)
    words = np.random.PCG64(seed).random_raw((num_bytes + 7) // 8)
    return np.asarray(words, dtype="<u8").tobytes()[:num_bytes]


def verify_block_payload(
    token_ids: Sequence[int] | npt.NDArray[np.integer], parent_hash: int | None, payload: bytes
) -> bool:
    """Whether ``payload`` is exactly the emulated KV bytes of that block."""
    return payload == block_payload(token_ids, parent_hash, len(payload))


class EmulatedExecutor(Executor):
    """Profile-timed executor with deterministic output tokens (see module docstring)."""

    def __init__(self, profile: HardwareProfile, seed: int = 0,
                 alphabet: tuple[int, ...] = ALPHABET, vocab_size: int = VOCAB_SIZE) -> None:
        """``alphabet`` (32 token ids, indexed by the top 5 hash bits) and ``vocab_size``
        follow the replica's tokenizer (``alphabet_for``); the defaults are byte-level."""
        if len(alphabet) != len(ALPHABET):
            raise ValueError(f"the alphabet needs {len(ALPHABET)} token ids, got {len(alphabet)}")
        self.profile: HardwareProfile = profile
        self.seed = seed
        self.alphabet = alphabet
        self._vocab_size = vocab_size
        # request id -> (number of tokens folded, rolling hash, seed key)
        self._history: dict[str, tuple[int, int, int]] = {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        sampled: list[int] = []
        history = self._history
        alphabet = self.alphabet
        for seq in batch.sequences:
            if not seq.samples:
                sampled.append(-1)
                continue
            request = seq.request
            num_tokens = request.num_tokens
            state = history.get(request.request_id)
            if state is None:
                params = request.params
                seed_key = (
                    0
                    if params.temperature <= 0.0
                    else _splitmix64(sampling_seed(params, request.request_id, self.seed))
                )
                folded, rolling = 0, 0
            else:
                folded, rolling, seed_key = state
            if folded < num_tokens:
                if num_tokens - folded == 1 and request.output_token_ids:
                    rolling = (
                        rolling * _ROLL_MULTIPLIER + request.output_token_ids[-1] + 1
                    ) & _MASK64
                else:
                    rolling = fold_tokens(rolling, request.token_slice(folded, num_tokens))
            history[request.request_id] = (num_tokens, rolling, seed_key)
            sampled.append(alphabet[_splitmix64(rolling ^ seed_key) >> 59])
        return ExecuteResult(batch.iteration_time(self.profile), sampled)

    def release(self, request_id: str) -> None:
        self._history.pop(request_id, None)

    def read_block(self, block_id: int, token_ids: Sequence[int], parent_hash: int | None) -> bytes:
        # Emulated KV bytes are a pure function of the block's tokens: derived on demand.
        return block_payload(token_ids, parent_hash)

    def write_block(
        self, block_id: int, token_ids: Sequence[int], parent_hash: int | None, payload: bytes
    ) -> None:
        if not verify_block_payload(token_ids, parent_hash, payload):
            raise ValueError(f"KV payload for block {block_id} does not match its tokens")
