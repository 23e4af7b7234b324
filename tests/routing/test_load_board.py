"""LoadBoard: engine reports combined with the router's in-flight view, as arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from router.policy.interfaces import ClusterSnapshot, InstanceView
from router.policy.load_board import LoadBoard
from tests.routing.util import snapshot, snapshot_of


def _dispatch(board: LoadBoard, rid: str, instance: str, uncached: int) -> None:
    board.dispatched(rid, instance, prompt_tokens=uncached, uncached_tokens=uncached,
                     max_tokens=10, now=0.0)


def test_own_dispatches_show_immediately_and_reports_add_the_others() -> None:
    board = LoadBoard()
    board.sync(snapshot_of([InstanceView("a", num_running=3, num_waiting=2,
                                         waiting_prefill_tokens=500), InstanceView("b")]))
    assert board.requests.tolist() == [5, 0]
    _dispatch(board, "r1", "b", 300)
    _dispatch(board, "r2", "a", 100)
    assert board.requests.tolist() == [6, 1]
    assert board.prefill_tokens.tolist() == [600, 300]
    board.first_token("r1")
    assert board.prefill_tokens.tolist() == [600, 0]
    board.finished("r1")
    assert board.requests.tolist() == [6, 0]


def test_a_new_report_that_includes_own_requests_does_not_count_them_twice() -> None:
    board = LoadBoard()
    board.sync(snapshot(2))
    _dispatch(board, "r1", "i00", 300)
    _dispatch(board, "r2", "i00", 300)
    # The engine now reports those two requests (and 100 tokens of someone else's).
    board.sync(snapshot_of([InstanceView("i00", num_waiting=2, waiting_prefill_tokens=700),
                            InstanceView("i01")]))
    assert board.requests[0] == 2 and board.prefill_tokens[0] == 700
    board.first_token("r1")
    board.finished("r1")
    assert board.requests[0] == 1 and board.prefill_tokens[0] == 400


def test_snapshot_rewrapping_the_same_views_is_adopted_without_rebuild() -> None:
    board = LoadBoard()
    snap = snapshot(3)
    assert board.sync(snap) is True
    generation = board.generation
    rewrapped = ClusterSnapshot(snap.epoch, tuple(snap.instances))
    assert board.sync(rewrapped) is False and board.generation == generation
    changed = snapshot(3, num_running=1)
    assert board.sync(changed) is True and board.generation == generation + 1


def test_selections_skip_unroutable_instances() -> None:
    board = LoadBoard()
    board.sync(snapshot_of([
        InstanceView("a", healthy=False),
        InstanceView("b", num_running=5),
        InstanceView("c", draining=True),
        InstanceView("d", num_running=3),
    ]))
    assert board.eligible_ids == ["b", "d"]
    assert board.ids[board.argmin_eligible(board.requests)] == "d"
    assert board.ids[board.argmax_eligible(board.requests)] == "b"
    assert board.is_eligible("b") and not board.is_eligible("a") and not board.is_eligible("x")


def test_no_eligible_instance_raises() -> None:
    board = LoadBoard()
    board.sync(snapshot(2, healthy=False))
    with pytest.raises(ValueError):
        board.argmin_eligible(board.requests)


def test_freeness_is_free_blocks_after_waiting_prefill_per_request() -> None:
    board = LoadBoard()
    board.sync(snapshot_of([
        InstanceView("a", num_running=4, free_blocks=1000, waiting_prefill_tokens=1600,
                     block_size=16),
        InstanceView("b", free_blocks=10),
    ]))
    free = board.freeness()
    assert free[0] == pytest.approx((1000 - 100) / 4)
    assert math.isinf(free[1])


def test_pending_tokens_adds_decode_budget() -> None:
    board = LoadBoard()
    board.sync(snapshot(1))
    board.dispatched("r", "i00", prompt_tokens=100, uncached_tokens=60, max_tokens=40, now=0)
    assert np.array_equal(board.pending_tokens(), [100.0])
