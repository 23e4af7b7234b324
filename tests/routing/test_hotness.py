"""HotPrefixDetector: share of the recent window, split points, hysteresis."""

from __future__ import annotations

import numpy as np

from router.policy.hashing import common_prefix_length
from router.policy.hotness import HotPrefixDetector
from tests.routing.util import tokens


def test_common_prefix_length() -> None:
    a = np.arange(10, dtype=np.int32)
    b = a.copy()
    b[7] = 0
    assert common_prefix_length(a, b) == 7
    assert common_prefix_length(a, a[:4]) == 4
    assert common_prefix_length(a, b[::-1].copy()) == 0


def test_hot_needs_share_and_prompts_that_differ() -> None:
    rng = np.random.default_rng(0)
    shared = tokens(rng, 300)
    detector = HotPrefixDetector(window=100, min_count=4)
    history = tokens(rng, 200)
    for _ in range(30):
        # Prefix 1: distinct conversations behind 300 shared tokens.
        detector.record((1,), np.concatenate([shared, tokens(rng, 100)]), share=0.2)
        # Prefix 2: one conversation, each prompt extending the previous one.
        history = np.concatenate([history, tokens(rng, 20)])
        detector.record((2,), history, share=0.2)
        detector.record((int(rng.integers(10, 10**9)),), tokens(rng, 50), share=0.2)
    assert detector.count(1) == 30 and detector.split(1) == 300
    assert detector.is_hot(1, share=0.2)
    assert detector.count(2) == 30 and detector.split(2) is None
    assert not detector.is_hot(2, share=0.2)  # as frequent, but lengthening cannot split it
    assert not detector.is_hot(1, share=0.8)  # below the share asked for (even halved)


def test_window_decays_by_count_and_forgets_splits() -> None:
    rng = np.random.default_rng(1)
    detector = HotPrefixDetector(window=50, min_count=4)
    for _ in range(20):
        detector.record((1,), tokens(rng, 40), share=0.1)
    assert detector.is_hot(1, share=0.1)
    for k in range(50):
        detector.record((7000 + k,), tokens(rng, 40), share=0.1)
    assert len(detector) == 50
    assert detector.count(1) == 0 and detector.split(1) is None
    assert not detector.is_hot(1, share=0.1)


def test_hysteresis_keeps_a_hot_prefix_hot_down_to_half_the_threshold() -> None:
    rng = np.random.default_rng(2)
    detector = HotPrefixDetector(window=100, min_count=10)
    for _ in range(30):
        detector.record((1,), tokens(rng, 30), share=0.25)
    for k in range(70):
        detector.record((5000 + k,), tokens(rng, 30), share=0.25)
    for k in range(10):  # prefix 1 falls to 20 of 100: under 25, above 12.5
        detector.record((6000 + k,), tokens(rng, 30), share=0.25)
    assert detector.count(1) == 20
    assert detector.is_hot(1, share=0.25)
    fresh = HotPrefixDetector(window=100, min_count=10)
    for k in range(100):  # one request in five: 20 % all along, never hot
        fresh.record((1,) if k % 5 == 0 else (5000 + k,), tokens(rng, 30), share=0.25)
    assert fresh.count(1) == 20
    assert not fresh.is_hot(1, share=0.25)  # never was hot: needs the full threshold
