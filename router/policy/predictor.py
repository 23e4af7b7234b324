"""Predicted TTFT, with each instance's prefill speed learned online from observed TTFTs.

DualMap predicts a request's time to first token on an instance as

    ttft = (uncached tokens queued ahead + own uncached tokens) × prefill seconds per token

The seconds per token differ per instance (GPU type, model, co-running decode batch) and
drift with load, so ``PrefillTimeModel`` learns them: each first token gives one
observation ``(x, y)`` with ``x`` = uncached tokens queued ahead at dispatch + the request's
own uncached tokens, ``y`` = its observed TTFT. The estimate is exponentially weighted least
squares through the origin, ``s = Σ λ^k x y / Σ λ^k x²``, started from one pseudo-observation
at ``default_s_per_token`` that fades like any old observation. Weighting by ``x²`` lets long
prefills, where the per-token cost dominates fixed overheads, steer the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Fit:
    sum_xx: float
    sum_xy: float
    observations: int = 0

    @property
    def slope(self) -> float:
        return self.sum_xy / self.sum_xx


class PrefillTimeModel:
    """Per-instance prefill seconds per uncached token (see the module docstring).

    ``decay`` is λ per observation (0.95 ≈ the last 20 first tokens matter);
    ``prior_tokens`` sets how strongly the default holds against the first observations;
    observations with fewer than ``min_tokens`` tokens are ignored (fixed overheads, not
    prefill, make up their TTFT).
    """

    def __init__(
        self,
        default_s_per_token: float = 2.1e-5,
        decay: float = 0.95,
        prior_tokens: int = 2048,
        min_tokens: int = 32,
    ) -> None:
        if default_s_per_token <= 0 or not 0.0 < decay <= 1.0 or prior_tokens <= 0:
            raise ValueError("default_s_per_token, decay and prior_tokens must be positive")
        self.default_s_per_token = default_s_per_token
        self.decay = decay
        self.prior_tokens = prior_tokens
        self.min_tokens = min_tokens
        self._fits: dict[str, _Fit] = {}

    def _prior(self) -> _Fit:
        x = float(self.prior_tokens)
        return _Fit(sum_xx=x * x, sum_xy=x * x * self.default_s_per_token)

    def seconds_per_token(self, instance_id: str) -> float:
        fit = self._fits.get(instance_id)
        return self.default_s_per_token if fit is None else fit.slope

    def observations(self, instance_id: str) -> int:
        fit = self._fits.get(instance_id)
        return 0 if fit is None else fit.observations

    def predict(self, instance_id: str, queued_tokens: float, own_tokens: float) -> float:
        """Predicted TTFT in seconds of ``own_tokens`` behind ``queued_tokens`` there."""
        return (queued_tokens + own_tokens) * self.seconds_per_token(instance_id)

    def observe(self, instance_id: str, tokens: float, ttft_s: float) -> bool:
        """Learn from one first token; False if the observation was ignored."""
        if tokens < self.min_tokens or ttft_s <= 0:
            return False
        fit = self._fits.get(instance_id)
        if fit is None:
            fit = self._fits[instance_id] = self._prior()
        fit.sum_xx = self.decay * fit.sum_xx + tokens * tokens
        fit.sum_xy = self.decay * fit.sum_xy + tokens * ttft_s
        fit.observations += 1
        return True

    def forget(self, instance_id: str) -> None:
        self._fits.pop(instance_id, None)
