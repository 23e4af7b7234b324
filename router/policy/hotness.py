"""Hot-prefix detection for adaptive ring keys: pure state fed by the requests routed.

DualMap keys a prompt by its first blocks. When a large share of traffic shares those
blocks (one long system prompt in front of every conversation), every request gets the
same key and lands on the same two instances. The remedy is to lengthen the key for that
prefix only, so conversations that differ after it spread over the rings, while a prefix
whose traffic is really *one* conversation (an agent loop re-sending its growing history)
keeps its key: lengthening it would only move that conversation away from its cache.

``HotPrefixDetector`` keeps, over the last ``window`` recorded requests (decay by count,
no clock), how many requests passed through each key prefix and which distinct next-level
prefixes followed it. A prefix is *hot* when it was seen at least
``max(min_count, share * requests_in_window)`` times and has at least ``min_children``
distinct continuations, i.e. lengthening the key would actually split its traffic. A prefix
that turned hot stays hot until its count falls below half that threshold (hysteresis), so
keys near the threshold do not flip back and forth and drag conversations along.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence


class HotPrefixDetector:
    """Sliding-window prefix counts and fan-out (see the module docstring)."""

    def __init__(self, window: int = 2048, min_count: int = 16, min_children: int = 2) -> None:
        if window <= 0 or min_count <= 0 or min_children <= 0:
            raise ValueError("window, min_count and min_children must be positive")
        self.window = window
        self.min_count = min_count
        self.min_children = min_children
        self._recent: deque[tuple[int, ...]] = deque()
        self._count: dict[int, int] = {}
        self._children: dict[int, dict[int, int]] = {}
        self._hot: set[int] = set()

    def __len__(self) -> int:
        """Requests in the window."""
        return len(self._recent)

    def count(self, prefix_hash: int) -> int:
        return self._count.get(prefix_hash, 0)

    def fan_out(self, prefix_hash: int) -> int:
        """Distinct continuations of ``prefix_hash`` seen in the window."""
        return len(self._children.get(prefix_hash, ()))

    def is_hot(self, prefix_hash: int, share: float) -> bool:
        """True if ``prefix_hash`` carries >= ``share`` of the window and fans out."""
        threshold = max(self.min_count, share * len(self._recent))
        if prefix_hash in self._hot:
            threshold *= 0.5
        if self._count.get(prefix_hash, 0) < threshold:
            return False
        return len(self._children.get(prefix_hash, ())) >= self.min_children

    def record(self, chain: Sequence[int], share: float) -> None:
        """Count one request's key chain: its key prefixes, shortest first.

        ``chain[i + 1]`` is the continuation of ``chain[i]`` (the key one level longer); the
        last element may be a probe one level past the key actually used, so the detector
        learns the fan-out of prefixes before they turn hot. ``share`` is the hot share the
        caller uses with ``is_hot``; the chain's prefixes turn hot or cool down here.
        """
        if not chain:
            return
        entry = tuple(chain)
        self._recent.append(entry)
        self._add(entry, 1)
        if len(self._recent) > self.window:
            self._add(self._recent.popleft(), -1)
        hot = self._hot
        for prefix_hash in entry:
            if self.is_hot(prefix_hash, share):
                hot.add(prefix_hash)
            else:
                hot.discard(prefix_hash)

    def _add(self, chain: tuple[int, ...], delta: int) -> None:
        counts = self._count
        for prefix_hash in chain:
            value = counts.get(prefix_hash, 0) + delta
            if value:
                counts[prefix_hash] = value
            else:
                del counts[prefix_hash]
                self._hot.discard(prefix_hash)
        children = self._children
        for parent, child in itertools.pairwise(chain):
            fan = children.get(parent)
            if fan is None:
                fan = children[parent] = {}
            value = fan.get(child, 0) + delta
            if value:
                fan[child] = value
            else:
                del fan[child]
                if not fan:
                    del children[parent]
