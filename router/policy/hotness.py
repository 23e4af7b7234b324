"""Hot-prefix detection for adaptive ring keys: pure state fed by the requests dispatched.

DualMap keys a prompt by its first blocks. When a large share of traffic shares those
blocks (one long system prompt in front of every conversation), every request gets the
same key and lands on the same two instances. The remedy is to lengthen the key for that
prefix only, just past the point where the requests behind it start to differ, so distinct
conversations spread; while a prefix whose traffic is really *one* conversation (an agent
loop re-sending its growing history: every prompt extends the previous one) keeps its key,
because lengthening it would only move that conversation away from its cache.

``HotPrefixDetector`` keeps, over the last ``window`` recorded requests (decay by count,
no clock):

* how many requests went through each key prefix;
* for prefixes seen at least ``track_count`` times, a reference prompt and the *split*:
  the earliest token position at which a prompt through the prefix differed from the
  reference while both had a token there (a prompt that merely extends the reference is no
  split; it becomes the new reference).

A prefix is *hot* when it was seen at least ``max(min_count, share * requests_in_window)``
times and has a split. A prefix that turned hot stays hot until its count falls below half
that threshold (hysteresis), so keys near the threshold do not flip back and forth.
Whether a prefix is hot is decided each time a request through it is recorded (and when its
count falls to zero), and kept in the set ``hot`` (with ``splits``): a key lookup on the
routing path (``keys.PrefixKeyBuilder.key``, compiled) is then one set probe, not a
recomputation of the threshold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from router.policy.hashing import TokenArray, common_prefix_length


class HotPrefixDetector:
    """Sliding-window prefix counts and split points (see the module docstring).

    ``max_tokens`` bounds how much of a reference prompt is kept and compared.
    """

    def __init__(
        self,
        window: int = 2048,
        min_count: int = 16,
        track_count: int | None = None,
        max_tokens: int = 8192,
    ) -> None:
        if window <= 0 or min_count <= 0:
            raise ValueError("window and min_count must be positive")
        self.window = window
        self.min_count = min_count
        self.track_count = track_count if track_count is not None else max(2, min_count // 2)
        self.max_tokens = max_tokens
        self._recent: deque[tuple[int, ...]] = deque()
        self._count: dict[int, int] = {}
        self._reference: dict[int, TokenArray] = {}
        self.splits: dict[int, int] = {}  # prefix -> split (read by key lookups)
        # Prefixes hot when a request through them was last recorded (read by key lookups).
        self.hot: set[int] = set()

    def __len__(self) -> int:
        """Requests in the window."""
        return len(self._recent)

    def count(self, prefix_hash: int) -> int:
        return self._count.get(prefix_hash, 0)

    def split(self, prefix_hash: int) -> int | None:
        """Earliest position where prompts through ``prefix_hash`` differ (None: never)."""
        return self.splits.get(prefix_hash)

    def is_hot(self, prefix_hash: int, share: float) -> bool:
        """True if ``prefix_hash`` carries >= ``share`` of the window and its prompts split
        (computed now from the counts; ``record`` stores the answer in ``hot``)."""
        if prefix_hash not in self.splits:
            return False
        threshold = max(self.min_count, share * len(self._recent))
        if prefix_hash in self.hot:
            threshold *= 0.5
        return self._count.get(prefix_hash, 0) >= threshold

    def record(self, chain: Sequence[int], tokens: TokenArray, share: float) -> None:
        """Count one dispatched request: ``chain`` holds its key prefixes (shortest first),
        ``tokens`` its prompt. ``share`` is the hot share the caller uses with ``is_hot``;
        the chain's prefixes turn hot or cool down here."""
        if not chain:
            return
        entry = tuple(chain)
        self._recent.append(entry)
        counts = self._count
        for prefix_hash in entry:
            counts[prefix_hash] = counts.get(prefix_hash, 0) + 1
        if len(self._recent) > self.window:
            self._forget(self._recent.popleft())
        prompt = tokens[: self.max_tokens]
        for prefix_hash in entry:
            if counts[prefix_hash] >= self.track_count:
                self._observe(prefix_hash, prompt)
            if self.is_hot(prefix_hash, share):
                self.hot.add(prefix_hash)
            else:
                self.hot.discard(prefix_hash)

    def _observe(self, prefix_hash: int, prompt: TokenArray) -> None:
        reference = self._reference.get(prefix_hash)
        if reference is None:
            self._reference[prefix_hash] = np.array(prompt)
            return
        shared = common_prefix_length(reference, prompt)
        if shared < min(len(reference), len(prompt)):
            split = self.splits.get(prefix_hash)
            if split is None or shared < split:
                self.splits[prefix_hash] = shared
        elif len(prompt) > len(reference):  # an extension: follow the conversation
            self._reference[prefix_hash] = np.array(prompt)

    def _forget(self, chain: tuple[int, ...]) -> None:
        counts = self._count
        for prefix_hash in chain:
            value = counts[prefix_hash] - 1
            if value:
                counts[prefix_hash] = value
            else:
                del counts[prefix_hash]
                self._reference.pop(prefix_hash, None)
                self.splits.pop(prefix_hash, None)
                self.hot.discard(prefix_hash)
