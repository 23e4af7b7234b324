"""Ring keys of prompts: the first key blocks, lengthened adaptively for hot prefixes.

The base key of an ``n``-token prompt covers its first ``key_blocks`` blocks of
``block_size`` tokens (DualMap: two 512-token blocks). A shorter prompt uses all its full
blocks, and a prompt without one full block uses all its tokens. Block granularity keeps the
key of a growing conversation stable from turn to turn.

With ``adaptive`` on, the key grows by ``hot_step`` tokens at a time while its current
prefix is hot (``HotPrefixDetector``): it carries a large share of recent requests *and* fans
out into distinct continuations one step longer. Key lengths are always ``base + k *
hot_step``, a grid every prompt with the same base shares, so the same conversation finds the
same longer key on every turn; the key never reaches past the prompt or ``max_key_blocks``.
A step finer than a block (128 tokens by default) lets conversations that share a long
system prompt and differ only in a short first message still spread.

Every level is xxh64 over the key's tokens (``router.policy.hashing.key_hash``, computed by
streaming one step at a time), the same on every gateway replica. Reading a key never
changes state; ``record`` (from ``on_dispatched``) feeds the detector with the request's
chain of key prefixes plus one probe level past the key, so fan-out is known before a
prefix turns hot.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from router.policy.hashing import KEY_SEED, TokenArray, key_hash
from router.policy.hotness import HotPrefixDetector


@dataclass(frozen=True)
class PromptKey:
    """A prompt's ring key."""

    hash: int
    length: int  # tokens the key covers
    # Key prefixes from the base key up to this key, then (if the prompt is long enough) a
    # probe one step longer: what ``record`` counts.
    chain: tuple[int, ...]


class PrefixKeyBuilder:
    """Computes ``PromptKey``s and learns which prefixes are hot (see the module docstring).

    ``hot_share`` is the share of recent requests that makes a prefix hot; None means half
    of one instance's fair share, ``0.5 / num_instances``: past that, the two instances a key
    maps to would get visibly more than the others.
    """

    def __init__(
        self,
        key_blocks: int = 2,
        block_size: int = 512,
        max_key_blocks: int = 16,
        adaptive: bool = True,
        hot_step: int = 128,
        hot_share: float | None = None,
        hot_window: int = 2048,
        hot_min_count: int = 16,
        hot_min_children: int = 2,
    ) -> None:
        if key_blocks <= 0 or block_size <= 0 or hot_step <= 0:
            raise ValueError("key_blocks, block_size and hot_step must be positive")
        if max_key_blocks < key_blocks:
            raise ValueError("max_key_blocks must be >= key_blocks")
        self.key_blocks = key_blocks
        self.block_size = block_size
        self.max_key_tokens = max_key_blocks * block_size
        self.adaptive = adaptive
        self.hot_step = hot_step
        self.hot_share = hot_share
        self.detector = HotPrefixDetector(hot_window, hot_min_count, hot_min_children)

    def base_length(self, num_tokens: int) -> int:
        full = (num_tokens // self.block_size) * self.block_size
        return min(self.key_blocks * self.block_size, full) or num_tokens

    def next_length(self, length: int, num_tokens: int) -> int | None:
        """The key length one step past ``length``, None past the prompt or the cap."""
        longer = length + self.hot_step
        return longer if longer <= min(num_tokens, self.max_key_tokens) else None

    def share(self, num_instances: int) -> float:
        if self.hot_share is not None:
            return self.hot_share
        return 0.5 / max(1, num_instances)

    def key(self, tokens: TokenArray, num_instances: int) -> PromptKey:
        """The key of ``tokens`` given the hot prefixes learned so far (reads only)."""
        num_tokens = len(tokens)
        length = self.base_length(num_tokens)
        if not self.adaptive:
            current = key_hash(tokens, length)
            return PromptKey(current, length, (current,))
        stream = xxhash.xxh64(tokens[:length].data, KEY_SEED)
        current = stream.intdigest()
        chain = [current]
        detector = self.detector
        share = self.share(num_instances)
        hot = detector.is_hot(current, share)
        while True:
            longer = self.next_length(length, num_tokens)
            if longer is None:
                break
            stream.update(tokens[length:longer].data)
            step_hash = stream.intdigest()
            chain.append(step_hash)
            if not hot:
                break  # ``step_hash`` is the probe past the key
            length, current = longer, step_hash
            hot = detector.is_hot(current, share)
        return PromptKey(current, length, tuple(chain))

    def record(self, key: PromptKey, num_instances: int) -> None:
        """Count a dispatched request's key chain (no-op when not adaptive)."""
        if self.adaptive:
            self.detector.record(key.chain, self.share(num_instances))
