"""least_loaded: fewest pending tokens (uncached prefill + decode budget in flight)."""

from __future__ import annotations

from router.policy.interfaces import InstanceView
from router.policy.least_loaded import LeastLoadedPolicy
from tests.routing.util import dispatch, request, snapshot_of


def test_picks_the_fewest_pending_tokens_counting_own_dispatches() -> None:
    policy = LeastLoadedPolicy()
    snap = snapshot_of([
        InstanceView("a", waiting_prefill_tokens=900),
        InstanceView("b", waiting_prefill_tokens=100),
        InstanceView("c", waiting_prefill_tokens=400),
    ])
    first = dispatch(policy, request("r1", list(range(600)), max_tokens=50), snap)
    assert (first.instance_id, first.reason) == ("b", "least_loaded")
    # b now has 100 + 600 prefill + 50 decode = 750 > c's 400.
    assert dispatch(policy, request("r2", list(range(10)), max_tokens=10), snap).instance_id == "c"
    policy.on_first_token("r1", "b", 0.2, None, 1.0)  # b's prefill done: 100 + 50 left
    assert policy.route(request("r3", [1]), snap, 1.0).instance_id == "b"
    policy.on_finished("r1", "b", 2.0)
    assert policy.board.pending_tokens()[1] == 100


def test_ties_go_to_the_lowest_id_and_unhealthy_are_skipped() -> None:
    policy = LeastLoadedPolicy()
    snap = snapshot_of([InstanceView("a", healthy=False), InstanceView("b"), InstanceView("c")])
    assert policy.route(request("r", [1]), snap, 0).instance_id == "b"
