"""Predicted TTFT, with each instance's prefill speed learned online from observed TTFTs.

DualMap predicts a request's time to first token on an instance as

    ttft = (uncached tokens queued ahead + own uncached tokens) × prefill seconds per token

The seconds per token differ per instance (GPU type, model, co-running decode batch) and
drift with load, so ``PrefillTimeModel`` learns them: each first token gives one
observation ``(x, y)`` with ``x`` = uncached tokens queued ahead at dispatch + the request's
own uncached tokens, ``y`` = its observed TTFT. The model adds a learned fixed part to the
paper's form, ``ttft = fixed + s × x``: the iteration in progress, decode steps and network
make even a 10-token prefill take milliseconds, and without it a through-origin fit under-
predicts small requests by about half (measured in the simulator). The fit is exponentially
weighted least squares (``λ`` per observation) started from pseudo-observations at
``default_s_per_token`` with no fixed part, which fade like any old observation; ``s`` and
``fixed`` are clamped to sane ranges while the data cannot separate them yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.defaults import DEFAULT_PREFILL_S_PER_TOKEN


@dataclass
class _Fit:
    """Decayed sums of a weighted least-squares line fit."""

    sw: float
    sx: float
    sy: float
    sxx: float
    sxy: float
    observations: int = 0


class PrefillTimeModel:
    """Per-instance ``ttft = fixed + s × tokens`` (see the module docstring).

    ``decay`` is λ per observation (0.95 ≈ the last 20 first tokens matter);
    ``prior_tokens`` sets where and how strongly the default holds against the first
    observations; observations with fewer than ``min_tokens`` tokens are ignored.
    """

    MAX_FIXED_S = 1.0

    def __init__(
        self,
        default_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        decay: float = 0.95,
        prior_tokens: int = 2048,
        min_tokens: int = 1,
    ) -> None:
        if default_s_per_token <= 0 or not 0.0 < decay <= 1.0 or prior_tokens <= 0:
            raise ValueError("default_s_per_token, decay and prior_tokens must be positive")
        self.default_s_per_token = default_s_per_token
        self.decay = decay
        self.prior_tokens = prior_tokens
        self.min_tokens = min_tokens
        self._fits: dict[str, _Fit] = {}
        self._params: dict[str, tuple[float, float]] = {}  # id -> (fixed_s, s_per_token)

    def _prior(self) -> _Fit:
        # Two pseudo-observations on the default line through the origin, at x0/2 and 3x0/2.
        x0, s0 = float(self.prior_tokens), self.default_s_per_token
        fit = _Fit(0.0, 0.0, 0.0, 0.0, 0.0)
        for x in (0.5 * x0, 1.5 * x0):
            fit.sw += 1.0
            fit.sx += x
            fit.sy += s0 * x
            fit.sxx += x * x
            fit.sxy += x * s0 * x
        return fit

    def params(self, instance_id: str) -> tuple[float, float]:
        """``(fixed seconds, seconds per token)`` for ``instance_id``."""
        return self._params.get(instance_id, (0.0, self.default_s_per_token))

    def seconds_per_token(self, instance_id: str) -> float:
        return self.params(instance_id)[1]

    def fixed_seconds(self, instance_id: str) -> float:
        return self.params(instance_id)[0]

    def observations(self, instance_id: str) -> int:
        fit = self._fits.get(instance_id)
        return 0 if fit is None else fit.observations

    def predict(self, instance_id: str, queued_tokens: float, own_tokens: float) -> float:
        """Predicted TTFT in seconds of ``own_tokens`` behind ``queued_tokens`` there."""
        fixed, per_token = self.params(instance_id)
        return fixed + (queued_tokens + own_tokens) * per_token

    def observe(self, instance_id: str, tokens: float, ttft_s: float) -> bool:
        """Learn from one first token; False if the observation was ignored."""
        if tokens < self.min_tokens or ttft_s <= 0:
            return False
        fit = self._fits.get(instance_id)
        if fit is None:
            fit = self._fits[instance_id] = self._prior()
        lam = self.decay
        fit.sw = lam * fit.sw + 1.0
        fit.sx = lam * fit.sx + tokens
        fit.sy = lam * fit.sy + ttft_s
        fit.sxx = lam * fit.sxx + tokens * tokens
        fit.sxy = lam * fit.sxy + tokens * ttft_s
        fit.observations += 1
        self._params[instance_id] = self._solve(fit)
        return True

    def _solve(self, fit: _Fit) -> tuple[float, float]:
        s0 = self.default_s_per_token
        det = fit.sw * fit.sxx - fit.sx * fit.sx
        per_token = (fit.sw * fit.sxy - fit.sx * fit.sy) / det if det > 0 else 0.0
        # Keep the slope within [s0 / 50, s0 * 100] and the fixed part within [0, 1 s]; when
        # clamped, refit the other parameter to the weighted means.
        per_token = min(max(per_token, s0 / 50), s0 * 100)
        fixed = (fit.sy - per_token * fit.sx) / fit.sw
        if fixed < 0.0 or fixed > self.MAX_FIXED_S:
            fixed = min(max(fixed, 0.0), self.MAX_FIXED_S)
            per_token = max((fit.sxy - fixed * fit.sx) / fit.sxx, s0 / 50)
        return fixed, per_token

    def forget(self, instance_id: str) -> None:
        self._fits.pop(instance_id, None)
        self._params.pop(instance_id, None)
