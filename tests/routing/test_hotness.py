"""HotPrefixDetector: share of the recent window plus fan-out, with hysteresis."""

from __future__ import annotations

from router.policy.hotness import HotPrefixDetector


def test_hot_needs_both_share_and_fan_out() -> None:
    detector = HotPrefixDetector(window=100, min_count=4, min_children=2)
    for k in range(30):
        detector.record((1, 100 + k), share=0.2)  # prefix 1: many distinct continuations
        detector.record((2, 200), share=0.2)  # prefix 2: one conversation, always the same
        detector.record((3 + k, 999), share=0.2)  # background traffic
    assert detector.count(1) == 30 and detector.fan_out(1) == 30
    assert detector.is_hot(1, share=0.2)  # 30 of 90 requests, fans out
    assert not detector.is_hot(2, share=0.2)  # as frequent, but extending cannot split it
    assert not detector.is_hot(1, share=0.8)  # below the share asked for (even halved)
    assert not detector.is_hot(3, share=0.0)  # below min_count


def test_window_decays_by_count() -> None:
    detector = HotPrefixDetector(window=50, min_count=4)
    for k in range(20):
        detector.record((1, k), share=0.1)
    assert detector.is_hot(1, share=0.1)
    for k in range(50):
        detector.record((7000 + k,), share=0.1)  # 50 newer requests push prefix 1 out
    assert len(detector) == 50
    assert detector.count(1) == 0 and detector.fan_out(1) == 0
    assert not detector.is_hot(1, share=0.1)


def test_hysteresis_keeps_a_hot_prefix_hot_down_to_half_the_threshold() -> None:
    detector = HotPrefixDetector(window=100, min_count=10)
    for k in range(30):
        detector.record((1, k), share=0.25)
    for k in range(70):
        detector.record((5000 + k,), share=0.25)
    # 30 of 100 >= 25: hot. Now let it fall to 20 of 100 (above 12.5, below 25).
    for k in range(10):
        detector.record((6000 + k,), share=0.25)
    assert detector.count(1) == 20
    assert detector.is_hot(1, share=0.25)
    fresh = HotPrefixDetector(window=100, min_count=10)
    for k in range(100):  # one request in five: 20 % all along, never hot
        fresh.record((1, k) if k % 5 == 0 else (5000 + k,), share=0.25)
    assert fresh.count(1) == 20
    assert not fresh.is_hot(1, share=0.25)  # never was hot: needs the full threshold
