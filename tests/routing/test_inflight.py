"""InflightTracker: requests and pending prefill per instance, fed by the three hooks."""

from __future__ import annotations

from router.policy.inflight import InflightTracker


def _dispatch(tracker: InflightTracker, rid: str, instance: str, uncached: int,
              prompt: int = 1000, max_tokens: int = 50) -> None:
    tracker.on_dispatched(rid, instance, prompt_tokens=prompt, uncached_tokens=uncached,
                          max_tokens=max_tokens, now=0.0)


def test_dispatch_first_token_finish_accounting() -> None:
    tracker = InflightTracker()
    _dispatch(tracker, "a", "x", uncached=600)
    _dispatch(tracker, "b", "x", uncached=300)
    _dispatch(tracker, "c", "y", uncached=100)
    assert (tracker.requests("x"), tracker.pending_prefill_tokens("x")) == (2, 900)
    assert tracker.pending_decode_tokens("x") == 100
    tracker.on_first_token("a")
    assert (tracker.requests("x"), tracker.pending_prefill_tokens("x")) == (2, 300)
    tracker.on_finished("a")
    assert (tracker.requests("x"), tracker.pending_prefill_tokens("x")) == (1, 300)
    # Finished before its first token (failure): its prefill leaves with it.
    tracker.on_finished("b")
    assert (tracker.requests("x"), tracker.pending_prefill_tokens("x")) == (0, 0)
    assert tracker.pending_decode_tokens("x") == 0
    assert tracker.instance_ids() == ["y"]


def test_hooks_for_unknown_or_repeated_ids_change_nothing() -> None:
    tracker = InflightTracker()
    _dispatch(tracker, "a", "x", uncached=500)
    tracker.on_first_token("a")
    tracker.on_first_token("a")  # twice: prefill must not go negative
    assert tracker.on_first_token("zzz") is None
    assert tracker.on_finished("zzz") is None
    assert tracker.pending_prefill_tokens("x") == 0
    tracker.on_finished("a")
    tracker.on_finished("a")
    assert tracker.requests("x") == 0 and len(tracker) == 0


def test_redispatch_moves_the_request() -> None:
    tracker = InflightTracker()
    _dispatch(tracker, "a", "x", uncached=500)
    _dispatch(tracker, "a", "y", uncached=400)
    assert tracker.requests("x") == 0 and tracker.pending_prefill_tokens("x") == 0
    assert tracker.requests("y") == 1 and tracker.pending_prefill_tokens("y") == 400


def test_uncached_estimate_is_clamped_and_queue_ahead_recorded() -> None:
    tracker = InflightTracker()
    _dispatch(tracker, "a", "x", uncached=5000, prompt=1000)  # estimate beyond the prompt
    assert tracker.pending_prefill_tokens("x") == 1000
    _dispatch(tracker, "b", "x", uncached=200)
    entry = tracker.get("b")
    assert entry is not None and entry.queued_ahead_tokens == 1000


def test_drop_instance_forgets_its_requests() -> None:
    tracker = InflightTracker()
    _dispatch(tracker, "a", "x", uncached=10)
    _dispatch(tracker, "b", "x", uncached=10)
    _dispatch(tracker, "c", "y", uncached=10)
    dropped = tracker.drop_instance("x")
    assert sorted(e.request_id for e in dropped) == ["a", "b"]
    assert tracker.requests("x") == 0 and tracker.requests("y") == 1
