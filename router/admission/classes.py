"""Short/long classification by uncached prefill tokens, with an adaptive boundary (LAPS)."""

from __future__ import annotations

from collections import deque

import numpy as np

from router.admission.interfaces import LONG, SHORT


class AdaptiveBoundary:
    """Splits requests into ``short`` (uncached prefill tokens <= boundary) and ``long``.

    The boundary starts at ``initial_tokens`` (256, as LAPS) and, once ``min_samples``
    requests were observed, follows the ``short_quantile`` quantile of the uncached token
    counts of the last ``window`` requests, recomputed every ``update_every`` observations
    and clamped to ``[min_tokens, max_tokens]``. So the short class stays the cheaper
    ``short_quantile`` share of the traffic whatever the workload's scale: on a chat
    workload where follow-ups carry a few hundred new tokens the boundary sits there, on a
    long-document workload it rises to a few thousand.
    """

    def __init__(
        self,
        initial_tokens: int = 256,
        *,
        short_quantile: float = 0.5,
        min_tokens: int = 64,
        max_tokens: int = 8192,
        window: int = 512,
        min_samples: int = 64,
        update_every: int = 32,
        adaptive: bool = True,
    ) -> None:
        if not 0.0 < short_quantile < 1.0:
            raise ValueError("short_quantile must be in (0, 1)")
        if not 0 < min_tokens <= max_tokens:
            raise ValueError("need 0 < min_tokens <= max_tokens")
        if window <= 0 or min_samples <= 0 or update_every <= 0:
            raise ValueError("window, min_samples and update_every must be positive")
        self.tokens = int(initial_tokens)
        self.short_quantile = short_quantile
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.min_samples = min_samples
        self.update_every = update_every
        self.adaptive = adaptive
        self._recent: deque[int] = deque(maxlen=window)
        self._since_update = 0

    def classify(self, uncached_tokens: int) -> str:
        return SHORT if uncached_tokens <= self.tokens else LONG

    def observe(self, uncached_tokens: int) -> None:
        """Record one routed request's uncached prefill tokens (may move the boundary)."""
        if not self.adaptive:
            return
        self._recent.append(int(uncached_tokens))
        self._since_update += 1
        if self._since_update >= self.update_every and len(self._recent) >= self.min_samples:
            self._since_update = 0
            value = float(np.quantile(np.fromiter(self._recent, dtype=np.int64),
                                      self.short_quantile))
            self.tokens = int(min(self.max_tokens, max(self.min_tokens, value)))
