"""Ring keys of prompts: the first key blocks, lengthened adaptively for hot prefixes.

The base key of an ``n``-token prompt covers its first ``key_blocks`` blocks of
``block_size`` tokens (DualMap: one 16-token block, lengthened by 16-token hot steps;
consistent hashing: two 512-token blocks, 128-token steps). A shorter prompt uses all its
full blocks, and a prompt without one full block uses all its tokens: a key that is short
next to the prompts keeps a growing conversation's key stable from turn to turn, where a
long one changes while the conversation is shorter than it.

With ``adaptive`` on, a key whose prefix is hot (``HotPrefixDetector``: a large share of
recent requests, whose prompts differ somewhere after it) is lengthened to just past the
prefix's *split*, the earliest position where its prompts were seen to differ: to the
smallest multiple of ``hot_step`` tokens beyond it, capped by the prompt and
``max_key_blocks``. The longer key may itself be hot (nested shared prefixes); the rule
repeats. The split is a property of the traffic, not of the request, so every turn of a
conversation behind a shared system prompt finds the same longer key.

A key's hash depends on its tokens only, the same on every gateway replica:
``PrefixHasher.key_hash`` of the key's tokens. For a length that is a whole number of
``hash_block_size`` blocks (every two-block base key, every longer key on the ``hot_step``
grid) that is the finalised prefix-block hash, which a cache-aware caller already has for
the whole prompt; other lengths (prompts shorter than a block, keys cut by the prompt's
end) use xxh64 over the tokens. The whole derivation, hot-key loop included, is one compiled call
(``_fastpath.prompt_key``) that reads the detector's ``hot`` set and ``splits``. Reading a
key never changes state; ``record`` (called from ``on_dispatched``) feeds the detector with
the request's chain of key prefixes and prompt.
"""

from __future__ import annotations

from router.policy.fastpath import PromptKey
from router.policy.hashing import PrefixHasher, PrefixHashes, TokenArray

__all__ = ["PrefixKeyBuilder", "PromptKey"]  # PromptKey: (hash, length, chain), a kernel type
from router.policy.hotness import HotPrefixDetector

_NOTHING_HOT: set[int] = set()  # the hot set of a builder that never lengthens keys


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
        hash_block_size: int = 16,
    ) -> None:
        if key_blocks <= 0 or block_size <= 0 or hot_step <= 0:
            raise ValueError("key_blocks, block_size and hot_step must be positive")
        if max_key_blocks < key_blocks:
            raise ValueError("max_key_blocks must be >= key_blocks")
        self.key_blocks = key_blocks
        self.block_size = block_size
        self._base_tokens = key_blocks * block_size
        self.max_key_tokens = max_key_blocks * block_size
        self.adaptive = adaptive
        self.hot_step = hot_step
        self.hot_share = hot_share
        self.detector = HotPrefixDetector(
            hot_window, hot_min_count, max_tokens=self.max_key_tokens
        )
        self.hasher = PrefixHasher(hash_block_size)
        # A fleet-wide hot-key table (``adopt_shared``): once set, keys are lengthened by it
        # alone, so every gateway replica keys a prompt the same way whatever traffic it
        # saw itself; the local detector keeps learning, for the table's next version.
        self.shared_hot: set[int] | None = None
        self.shared_splits: dict[int, int] | None = None

    def base_length(self, num_tokens: int) -> int:
        full = num_tokens - num_tokens % self.block_size
        return min(self._base_tokens, full) or num_tokens

    def longer_length(self, split: int, num_tokens: int) -> int:
        """Key length just past a split at token ``split`` (a ``hot_step`` multiple),
        capped by the prompt and ``max_key_blocks``."""
        return min((split // self.hot_step + 1) * self.hot_step, num_tokens, self.max_key_tokens)

    def share(self, num_instances: int) -> float:
        if self.hot_share is not None:
            return self.hot_share
        return 0.5 / max(1, num_instances)

    def key(self, tokens: TokenArray, prefix_hashes: PrefixHashes | None = None) -> PromptKey:
        """The key of ``tokens`` given the hot prefixes learned so far (reads only; which
        prefixes are hot, for the fleet's size, was decided as requests were recorded).

        ``prefix_hashes`` (``self.hasher.hashes(tokens)``, if the caller has them) saves
        hashing the key's tokens again.
        """
        return self.hasher.prompt_key(
            tokens, prefix_hashes, self.base_length(len(tokens)), self.hot_step,
            self.max_key_tokens, self.hot_prefixes, self.key_splits)

    @property
    def hot_prefixes(self) -> set[int]:
        """The prefixes whose keys are lengthened now (none when not adaptive)."""
        if not self.adaptive:
            return _NOTHING_HOT
        return self.detector.hot if self.shared_hot is None else self.shared_hot

    @property
    def key_splits(self) -> dict[int, int]:
        """Split points of the hot prefixes keys are lengthened by."""
        return self.detector.splits if self.shared_splits is None else self.shared_splits

    def local_table(self) -> dict[int, int]:
        """What this builder's own traffic finds hot: prefix -> split."""
        splits = self.detector.splits
        return {p: splits[p] for p in self.detector.hot if p in splits}

    def adopt_shared(self, table: dict[int, int]) -> None:
        """Lengthen keys by ``table`` (prefix -> split) from now on. The set and dict are
        updated in place: the routing path holds references to them."""
        if self.shared_hot is None or self.shared_splits is None:
            self.shared_hot, self.shared_splits = set(), {}
        self.shared_splits.clear()
        self.shared_splits.update(table)
        self.shared_hot.clear()
        self.shared_hot.update(table)

    def record(self, key: PromptKey, tokens: TokenArray, num_instances: int) -> None:
        """Count a dispatched request's key chain and prompt (no-op when not adaptive)."""
        if self.adaptive:
            self.detector.record(key.chain, tokens, self.share(num_instances))
