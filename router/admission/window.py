"""The adaptive batching window for short requests (LAPS)."""

from __future__ import annotations


class AdaptiveWindow:
    """How long a short request may be held so that several go out together.

    Per instance it keeps an exponentially weighted mean of the gap between short arrivals.
    The window is the time ``batch_size - 1`` more shorts are expected to take to arrive,
    if that fits in ``max_window_s``; otherwise 0 (waiting would only add latency: the
    batch would not fill). Busy instances with many shorts thus batch, quiet ones never
    wait. ``max_window_s = 0`` turns batching off.
    """

    def __init__(self, batch_size: int = 4, max_window_s: float = 0.02,
                 smoothing: float = 0.2) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_window_s < 0:
            raise ValueError("max_window_s must be >= 0")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.batch_size = batch_size
        self.max_window_s = max_window_s
        self.smoothing = smoothing
        self._last: dict[str, float] = {}
        self._gap: dict[str, float] = {}

    def observe(self, instance_id: str, now: float) -> None:
        """A short request was queued at ``instance_id``."""
        last = self._last.get(instance_id)
        self._last[instance_id] = now
        if last is None:
            return
        gap = max(0.0, now - last)
        mean = self._gap.get(instance_id)
        self._gap[instance_id] = gap if mean is None else (
            mean + self.smoothing * (gap - mean))

    def window_s(self, instance_id: str) -> float:
        """The current window at ``instance_id`` (0 = release shorts at once)."""
        if self.batch_size <= 1 or self.max_window_s <= 0:
            return 0.0
        gap = self._gap.get(instance_id)
        if gap is None:
            return 0.0
        wait = (self.batch_size - 1) * gap
        return wait if wait <= self.max_window_s else 0.0
