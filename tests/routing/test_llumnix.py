"""llumnix: highest freeness = (free blocks - blocks of waiting prefill) / requests."""

from __future__ import annotations

from router.policy.interfaces import InstanceView
from router.policy.llumnix import LlumnixPolicy
from tests.routing.util import dispatch, request, snapshot_of


def test_picks_the_highest_freeness() -> None:
    policy = LlumnixPolicy()
    snap = snapshot_of([
        InstanceView("a", num_running=4, free_blocks=400, block_size=16),  # 100
        InstanceView("b", num_running=2, free_blocks=400, waiting_prefill_tokens=3200,
                     block_size=16),  # (400 - 200) / 2 = 100
        InstanceView("c", num_running=1, num_waiting=1, free_blocks=300, block_size=16),  # 150
    ])
    decision = policy.route(request("r", [1]), snap, 0)
    assert (decision.instance_id, decision.reason) == ("c", "freeness")


def test_an_idle_instance_is_infinitely_free_until_it_gets_work() -> None:
    policy = LlumnixPolicy()
    snap = snapshot_of([
        InstanceView("a", num_running=1, free_blocks=1000, block_size=16),
        InstanceView("b", free_blocks=10, block_size=16),
    ])
    assert dispatch(policy, request("r1", list(range(160))), snap).instance_id == "b"
    # b: (10 - 10 blocks of its pending prefill) / 1 = 0  <  a: 1000 / 1.
    assert policy.route(request("r2", [1]), snap, 0).instance_id == "a"
