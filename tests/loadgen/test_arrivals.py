"""Arrival processes match their rate and CV; rate scaling keeps a trace's shape."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen.arrivals import (
    arrivals_in_window,
    coefficient_of_variation,
    gamma_arrivals,
    mean_rate,
    poisson_arrivals,
    scale_to_rate,
    weibull_arrivals,
)


def test_poisson_matches_rate_and_unit_cv() -> None:
    times = poisson_arrivals(20.0, 20_000, seed=1)
    assert mean_rate(times) == pytest.approx(20.0, rel=0.03)
    assert coefficient_of_variation(times) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.diff(times) >= 0)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_matches_rate_and_cv(cv: float) -> None:
    times = gamma_arrivals(5.0, cv, 40_000, seed=2)
    assert mean_rate(times) == pytest.approx(5.0, rel=0.05)
    assert coefficient_of_variation(times) == pytest.approx(cv, rel=0.08)


def test_gamma_cv_zero_is_evenly_spaced() -> None:
    times = gamma_arrivals(4.0, 0.0, 9, seed=0)
    assert np.allclose(np.diff(times), 0.25)


def test_weibull_matches_rate() -> None:
    times = weibull_arrivals(3.0, 0.5, 40_000, seed=3)
    assert mean_rate(times) == pytest.approx(3.0, rel=0.05)
    assert coefficient_of_variation(times) > 1.5  # shape < 1 is bursty


def test_same_seed_same_arrivals() -> None:
    assert np.array_equal(gamma_arrivals(2.0, 3.0, 100, 9), gamma_arrivals(2.0, 3.0, 100, 9))
    assert not np.array_equal(poisson_arrivals(2.0, 100, 9), poisson_arrivals(2.0, 100, 10))


def test_scale_to_rate_keeps_shape() -> None:
    times = gamma_arrivals(1.0, 3.0, 5_000, seed=4) + 100.0
    scaled = scale_to_rate(times, 8.0)
    assert scaled[0] == 0.0
    assert mean_rate(scaled) == pytest.approx(8.0)
    assert coefficient_of_variation(scaled) == pytest.approx(coefficient_of_variation(times))


def test_window_arrivals_stay_inside_the_window() -> None:
    times = arrivals_in_window("Gamma", 2.0, 3.0, 1.0, 600.0, 1200.0, seed=5)
    assert times.min() >= 600.0 and times.max() < 1200.0
    assert len(times) == pytest.approx(1200, rel=0.25)
    with pytest.raises(ValueError, match="unknown arrival pattern"):
        arrivals_in_window("Pareto", 1.0, 1.0, 1.0, 0.0, 10.0, seed=0)
