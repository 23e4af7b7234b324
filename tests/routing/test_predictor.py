"""PrefillTimeModel: per-instance seconds per token learned from observed TTFTs."""

from __future__ import annotations

import numpy as np
import pytest

from router.policy.predictor import PrefillTimeModel


def test_starts_from_the_default_and_converges_to_the_observed_speed() -> None:
    model = PrefillTimeModel(default_s_per_token=2e-5, decay=0.9)
    assert model.seconds_per_token("a") == 2e-5
    assert model.predict("a", 1000, 500) == pytest.approx(1500 * 2e-5)
    rng = np.random.default_rng(0)
    true_s = 1.6e-4  # DualMap's Ascend setting: 8x slower than the default
    for _ in range(60):
        tokens = float(rng.integers(500, 8000))
        model.observe("a", tokens, tokens * true_s * float(rng.uniform(0.95, 1.05)))
    assert model.seconds_per_token("a") == pytest.approx(true_s, rel=0.05)
    assert model.seconds_per_token("b") == 2e-5  # other instances keep their own estimate
    assert model.observations("a") == 60


def test_tracks_a_change_in_speed() -> None:
    model = PrefillTimeModel(default_s_per_token=1e-5, decay=0.9)
    for _ in range(30):
        model.observe("a", 4000, 4000 * 1e-5)
    for _ in range(40):
        model.observe("a", 4000, 4000 * 3e-5)  # the instance got slower (busier)
    assert model.seconds_per_token("a") == pytest.approx(3e-5, rel=0.05)


def test_tiny_or_bogus_observations_are_ignored() -> None:
    model = PrefillTimeModel(min_tokens=32)
    assert model.observe("a", 10, 5.0) is False
    assert model.observe("a", 1000, 0.0) is False
    assert model.seconds_per_token("a") == model.default_s_per_token
    model.observe("a", 1000, 1.0)
    model.forget("a")
    assert model.seconds_per_token("a") == model.default_s_per_token


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PrefillTimeModel(default_s_per_token=0)
    with pytest.raises(ValueError):
        PrefillTimeModel(decay=1.5)
