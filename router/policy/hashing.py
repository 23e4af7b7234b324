"""Token hashing for routing: prefix-block hashes and prompt keys, compiled.

Two hashes serve two jobs:

* **Prefix-block hashes** identify "the first ``k`` blocks of this prompt" for the cache
  views (below).
* **Key hashes** place a prompt on the consistent-hash rings: a function of the first ``n``
  tokens only, the same on every gateway replica and machine (``PrefixHasher.key_hash``).
  When ``n`` is a whole number of blocks the key is the splitmix64-finalised prefix-block
  hash below (which a cache-aware policy computes anyway, so the key is nearly free);
  otherwise it is xxh64 over the little-endian int32 bytes of the tokens
  (``csrc/hashing.h``, ``csrc/xxh64.h``).

**Prefix-block hashes** identify "the first ``k`` blocks of this prompt" for the cache
  views. An 8k-token prompt has 512 blocks of 16 tokens; a Python loop of 512 xxhash calls
  costs ~80 µs, more than the whole routing budget. Instead, all prefix hashes are computed
  in one compiled pass (``_fastpath.prefix_hashes``: ~0.5 µs for 8k tokens with AVX-512,
  ~2 µs without; the numpy form, ``words @ mult``, XOR, ``add.accumulate``, took ~9 µs):
  each block (pairs of int32 tokens
  viewed as little-endian uint64 words) gets a multilinear hash with fixed odd 64-bit
  multipliers, salted per position, and prefix hashes are the running sum (mod 2^64) of the
  block hashes. The
  hash of prefix ``k`` therefore depends on exactly the tokens of blocks ``0..k`` and their
  positions. These hashes are router-internal: the precise cache view maps the engine's own
  chained block hashes onto them through the ``token_ids`` carried by ``BlockStored`` events,
  so the router never has to reproduce the engine's hash function on the hot path.

All constants derive from xxh64 of fixed strings: deterministic across processes, machines
and numpy versions.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt
import xxhash

from proto.tokens import as_token_array
from router.policy.fastpath import PromptKey, key_hash, prefix_hashes, prompt_key
from router.policy.fastpath import mix64 as mix64  # re-exported: the key finaliser

if sys.byteorder != "little":  # the compiled kernels read int32 pairs as little-endian words
    raise ImportError("llmfleet's routing kernels need a little-endian machine")

TokenArray = npt.NDArray[np.int32]
HashArray = npt.NDArray[np.uint64]
# A prompt's prefix hashes as consumers take them: uint64 values in a numpy array, or in a
# bytes buffer where the routing path made them (``_fastpath.locate``); the compiled
# consumers read either through the buffer protocol.
PrefixHashes = HashArray | bytes
_INT32_LE = np.dtype("<i4")

MAX_BLOCK_SIZE = 256  # tokens per hash block (the compiled key code pads one block on the stack)
_MULT_LABEL = b"llmfleet/prefix-block/multiplier"
_SALT_LABEL = b"llmfleet/prefix-block/salt"


def token_array(token_ids: Sequence[int] | npt.NDArray[np.integer]) -> TokenArray:
    """``token_ids`` as a contiguous little-endian int32 array.

    No copy for an int32 numpy array; a Python list goes through ``array('i')`` (about 3×
    faster than ``np.asarray`` on a list). Callers on a hot path should hand over numpy
    arrays (e.g. ``np.frombuffer(text.encode(), np.uint8).astype(np.int32)`` for the
    byte-level tokenizer).
    """
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype is _INT32_LE and token_ids.flags.c_contiguous:
            return cast(TokenArray, token_ids)  # the gateway's form: nothing to do
        return as_token_array(token_ids)
    if isinstance(token_ids, list):
        return np.frombuffer(array("i", token_ids), dtype="<i4")
    if isinstance(token_ids, bytes | bytearray | memoryview):
        return np.frombuffer(token_ids, dtype=np.uint8).astype("<i4")
    return as_token_array(np.asarray(token_ids))


def common_prefix_length(a: TokenArray, b: TokenArray) -> int:
    """How many leading tokens ``a`` and ``b`` share (one vectorised compare, ~1.5 µs at 8k)."""
    m = min(len(a), len(b))
    if m == 0:
        return 0
    first = int(np.not_equal(a[:m], b[:m]).argmax())  # 0 also when nothing differs
    if first:
        return first
    return 0 if a.item(0) != b.item(0) else m


def ring_point_hash(member: str, replica: int, seed: int) -> int:
    """Position of virtual node ``replica`` of ``member`` on a ring seeded with ``seed``."""
    return xxhash.xxh64_intdigest(f"{member}#{replica}".encode(), seed)


def _constants(label: bytes, count: int) -> HashArray:
    values = [xxhash.xxh64_intdigest(label, i) for i in range(count)]
    return np.array(values, dtype=np.uint64)


class PrefixHasher:
    """Prefix-block hashes of a token array for one block size (see the module docstring).

    ``hashes(tokens)[k]`` identifies the first ``k + 1`` full blocks of ``tokens``; a trailing
    partial block has no hash. ``hashes(tokens, start_block=d, start_prefix=p)`` continues a
    chain: with ``p`` the hash of prefix ``d`` blocks, it returns the hashes of prefixes
    ``d + 1, d + 2, ...`` of a sequence whose next blocks are ``tokens``.
    """

    def __init__(self, block_size: int = 16) -> None:
        if block_size <= 0 or block_size % 2 or block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an even number in 2..{MAX_BLOCK_SIZE}")
        self.block_size = block_size
        self._words_per_block = block_size // 2
        # Odd multipliers keep every single-word difference visible mod 2^64.
        self._mult = _constants(_MULT_LABEL, self._words_per_block) | np.uint64(1)
        self._salt = _constants(_SALT_LABEL, 4096)  # 64k tokens at 16 per block; grows
        self._no_hashes = np.empty(0, dtype=np.uint64)

    def constants(self, num_tokens: int) -> tuple[HashArray, HashArray]:
        """(multipliers, salts) for compiled kernels hashing a prompt of ``num_tokens``."""
        if num_tokens > len(self._salt) * self.block_size:
            self._salts(0, -(-num_tokens // self.block_size))  # grows the table
        return self._mult, self._salt

    def key_hash(
        self, tokens: TokenArray, length: int, hashes: PrefixHashes | None = None
    ) -> int:
        """The key hash of the first ``length`` tokens (see the module docstring);
        ``hashes``: the prompt's prefix hashes, as far as the caller has them."""
        tokens = token_array(tokens)
        mult, salt = self.constants(len(tokens))
        return key_hash(tokens, mult, salt, self._no_hashes if hashes is None else hashes,
                        length)

    def prompt_key(
        self, tokens: TokenArray, hashes: PrefixHashes | None, base_length: int, hot_step: int,
        max_length: int, hot: set[int], splits: dict[int, int],
    ) -> PromptKey:
        """``_fastpath.prompt_key`` with this hasher's constants (``keys.PrefixKeyBuilder.key``
        states the rule)."""
        tokens = token_array(tokens)
        mult, salt = self.constants(len(tokens))
        return prompt_key(tokens, mult, salt, self._no_hashes if hashes is None else hashes,
                          base_length, hot_step, max_length, hot, splits)

    def _salts(self, start: int, count: int) -> HashArray:
        end = start + count
        if end > len(self._salt):
            size = len(self._salt)
            while size < end:
                size *= 2
            self._salt = _constants(_SALT_LABEL, size)
        return self._salt[start:end]

    def hashes(self, tokens: TokenArray, start_block: int = 0, start_prefix: int = 0) -> HashArray:
        """Hashes of each full-block prefix of ``tokens`` (continuing from ``start_prefix``)."""
        num_blocks = len(tokens) // self.block_size
        if tokens.dtype is not _INT32_LE or not tokens.flags.c_contiguous:
            tokens = as_token_array(tokens)
        if start_block + num_blocks > len(self._salt):
            self._salts(start_block, num_blocks)  # grows the table
        out = np.empty(num_blocks, dtype=np.uint64)
        prefix_hashes(tokens, self._mult, self._salt, start_block, out, start_prefix)
        return out
