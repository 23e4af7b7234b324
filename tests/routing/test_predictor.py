"""PrefillTimeModel: per-instance ttft = fixed + s × tokens, learned from observed TTFTs."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.predictor import PrefillTimeModel


def test_starts_from_the_default_and_learns_slope_and_fixed_part() -> None:
    model = PrefillTimeModel(default_s_per_token=2e-5, decay=0.95)
    assert model.params("a") == (0.0, 2e-5)
    assert model.predict("a", 1000, 500) == pytest.approx(1500 * 2e-5)
    rng = np.random.default_rng(0)
    true_s, true_fixed = 1.6e-4, 0.012  # 8x slower than assumed, 12 ms of fixed overhead
    for _ in range(100):
        tokens = float(rng.integers(10, 8000))
        model.observe("a", tokens, (true_fixed + tokens * true_s) * float(rng.uniform(0.97, 1.03)))
    fixed, slope = model.params("a")
    assert slope == pytest.approx(true_s, rel=0.05)
    assert fixed == pytest.approx(true_fixed, abs=0.004)
    assert model.predict("a", 0, 20) == pytest.approx(true_fixed + 20 * true_s, rel=0.35)
    assert model.params("b") == (0.0, 2e-5)  # other instances keep their own estimate
    assert model.observations("a") == 100


def test_tracks_a_change_in_speed() -> None:
    model = PrefillTimeModel(default_s_per_token=1e-5, decay=0.9)
    rng = np.random.default_rng(1)
    for _ in range(30):
        tokens = float(rng.integers(500, 6000))
        model.observe("a", tokens, tokens * 1e-5)
    for _ in range(60):
        tokens = float(rng.integers(500, 6000))
        model.observe("a", tokens, tokens * 3e-5)  # the instance got slower (busier)
    assert model.seconds_per_token("a") == pytest.approx(3e-5, rel=0.05)


def test_identical_observations_cannot_separate_the_parameters_but_stay_sane() -> None:
    model = PrefillTimeModel(default_s_per_token=1e-5, decay=0.9)
    for _ in range(200):
        model.observe("a", 2000, 0.05)  # one x only: slope and fixed part are ambiguous
    fixed, slope = model.params("a")
    assert 0.0 <= fixed <= PrefillTimeModel.MAX_FIXED_S and slope > 0
    assert model.predict("a", 0, 2000) == pytest.approx(0.05, rel=0.05)


def test_bogus_observations_are_ignored_and_forget_resets() -> None:
    model = PrefillTimeModel(min_tokens=32)
    assert model.observe("a", 10, 5.0) is False
    assert model.observe("a", 1000, 0.0) is False
    assert model.params("a") == (0.0, model.default_s_per_token)
    model.observe("a", 1000, 1.0)
    model.forget("a")
    assert model.params("a") == (0.0, model.default_s_per_token)


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PrefillTimeModel(default_s_per_token=0)
    with pytest.raises(ValueError):
        PrefillTimeModel(decay=1.5)
