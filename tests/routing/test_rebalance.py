"""plan_rebalance: moves of router-queued requests off hotspots (pure planning)."""

from __future__ import annotations

from router.policy.rebalance import QueuedRequest, plan_rebalance
from tests.routing.util import request

S = 1e-3  # seconds per token in these hand-made fleets


def _queued(rid: str, instance: str, at: float, size: int = 100) -> QueuedRequest:
    return QueuedRequest(request(rid, list(range(size))), instance, at)


def _plan(queued: list[QueuedRequest], engine_backlog: dict[str, int], now: float = 10.0,
          slo: float = 1.0) -> list[tuple[str, str, str]]:
    # The caller's prediction counts the router-queued requests too (the policy's board
    # has them), plus the planned change ``tokens``.
    queued_tokens: dict[str, int] = {}
    for q in queued:
        queued_tokens[q.instance_id] = queued_tokens.get(q.instance_id, 0) + len(
            q.request.token_ids)

    def predict(instance: str, tokens: float) -> float:
        return (engine_backlog.get(instance, 0) + queued_tokens.get(instance, 0) + tokens) * S

    moves = plan_rebalance(queued, ["a", "b", "c"], predict, lambda q, i: len(q.request.token_ids),
                           slo_ttft_s=slo, now=now, max_wait_s=3.0)
    return [(m.request_id, m.from_instance, m.decision.instance_id) for m in moves]


def test_nothing_moves_when_no_instance_is_a_hotspot() -> None:
    queued = [_queued(f"q{k}", "a", 9.0 + k * 0.1) for k in range(3)]
    assert _plan(queued, {"a": 500}) == []


def test_predicted_ttft_over_the_slo_moves_the_newest_to_the_fastest_targets() -> None:
    queued = [_queued(f"q{k}", "a", 9.0 + k * 0.1) for k in range(5)]
    # a: 600 engine tokens + 500 queued = 1.1 s > 1 s. b is busier than c.
    plan = _plan(queued, {"a": 600, "b": 300})
    assert plan == [("q4", "a", "c")]
    # A deeper hotspot needs more moves; targets fill up in turn.
    plan = _plan(queued, {"a": 900, "b": 50})
    assert plan == [("q4", "a", "c"), ("q3", "a", "b"), ("q2", "a", "c"), ("q1", "a", "b")]


def test_requests_waiting_past_max_wait_move_first_even_without_ttft_pressure() -> None:
    queued = [_queued("old", "a", 5.0), _queued("new", "a", 9.5)]
    plan = _plan(queued, {"a": 0, "b": 0, "c": 0}, now=10.0)
    assert plan == [("old", "a", "b")]


def test_no_move_to_a_target_that_is_not_faster() -> None:
    queued = [_queued(f"q{k}", "a", 9.0) for k in range(3)]
    assert _plan(queued, {"a": 1000, "b": 5000, "c": 5000}) == []
