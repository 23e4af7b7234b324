"""Arrival processes: Poisson, Gamma with a given CV, Weibull, and rate-scaling of traces.

Every generator takes a seed and returns absolute arrival times (seconds, non-decreasing,
starting after ``start_s``) as a numpy array; the same arguments always give the same times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _check_rate(rate: float) -> None:
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")


def poisson_arrivals(rate: float, count: int, seed: int, start_s: float = 0.0) -> np.ndarray:
    """``count`` arrival times of a Poisson process of ``rate`` requests per second."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=count)
    return start_s + np.cumsum(gaps)


def gamma_arrivals(
    rate: float, cv: float, count: int, seed: int, start_s: float = 0.0
) -> np.ndarray:
    """Arrivals whose gaps are Gamma distributed with mean ``1/rate`` and coefficient of
    variation ``cv`` (shape ``1/cv²``): cv=1 is Poisson, cv>1 bursty, cv<1 regular; cv=0
    gives evenly spaced arrivals."""
    _check_rate(rate)
    if cv < 0:
        raise ValueError(f"cv must be non-negative, got {cv}")
    if cv == 0:
        return start_s + np.arange(1, count + 1, dtype=float) / rate
    shape = 1.0 / (cv * cv)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=count)
    return start_s + np.cumsum(gaps)


def weibull_arrivals(
    rate: float, shape: float, count: int, seed: int, start_s: float = 0.0
) -> np.ndarray:
    """Arrivals whose gaps are Weibull(``shape``) scaled to mean ``1/rate``."""
    _check_rate(rate)
    if shape <= 0:
        raise ValueError(f"Weibull shape must be positive, got {shape}")
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate * math.gamma(1.0 + 1.0 / shape))
    gaps = scale * rng.weibull(shape, size=count)
    return start_s + np.cumsum(gaps)


def arrivals_in_window(
    pattern: str,
    rate: float,
    cv: float,
    shape: float,
    start_s: float,
    end_s: float,
    seed: int,
) -> np.ndarray:
    """Arrival times in ``[start_s, end_s)`` for a window of a given pattern and mean rate.

    ``pattern`` is ``Exponential``/``Poisson`` (cv ignored), ``Gamma`` (uses ``cv``) or
    ``Weibull`` (uses ``shape``). Gaps are drawn in batches until the window is covered.
    """
    if rate <= 0 or end_s <= start_s:
        return np.empty(0)
    expected = rate * (end_s - start_s)
    batch = max(16, int(expected * 1.5) + 16)
    name = pattern.strip().lower()
    times: list[np.ndarray] = []
    cursor = start_s
    round_index = 0
    while cursor < end_s:
        sub_seed = seed * 1_000_003 + round_index
        if name in ("exponential", "poisson", ""):
            chunk = poisson_arrivals(rate, batch, sub_seed, cursor)
        elif name == "gamma":
            chunk = gamma_arrivals(rate, cv, batch, sub_seed, cursor)
        elif name == "weibull":
            chunk = weibull_arrivals(rate, shape, batch, sub_seed, cursor)
        else:
            raise ValueError(f"unknown arrival pattern {pattern!r}")
        times.append(chunk[chunk < end_s])
        cursor = float(chunk[-1])
        round_index += 1
    return np.concatenate(times) if times else np.empty(0)


def mean_rate(arrival_s: Sequence[float] | np.ndarray) -> float:
    """Requests per second of a trace: ``(n - 1) / (last - first)`` (inf if all at once)."""
    times = np.asarray(arrival_s, dtype=float)
    if times.size < 2:
        return math.inf
    span = float(times.max() - times.min())
    return math.inf if span <= 0 else (times.size - 1) / span


def scale_to_rate(arrival_s: Sequence[float] | np.ndarray, rate: float) -> np.ndarray:
    """Compress or stretch a trace's own timestamps so its mean rate becomes ``rate``.

    Gaps keep their relative sizes (burstiness is preserved); the first arrival moves to 0.
    """
    _check_rate(rate)
    times = np.asarray(arrival_s, dtype=float)
    if times.size == 0:
        return times.copy()
    shifted = times - times.min()
    current = mean_rate(times)
    if not math.isfinite(current):
        return shifted  # everything arrives at once; nothing to stretch
    return shifted * (current / rate)


def coefficient_of_variation(arrival_s: Sequence[float] | np.ndarray) -> float:
    """Standard deviation over mean of the gaps between sorted arrivals."""
    gaps = np.diff(np.sort(np.asarray(arrival_s, dtype=float)))
    if gaps.size == 0 or gaps.mean() == 0:
        return 0.0
    return float(gaps.std() / gaps.mean())
