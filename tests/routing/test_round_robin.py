"""round_robin: next routable instance after the last one dispatched to, by id."""

from __future__ import annotations

from router.policy.interfaces import InstanceView
from router.policy.round_robin import RoundRobinPolicy
from tests.routing.util import dispatch, request, snapshot, snapshot_of


def test_cycles_in_id_order_and_route_alone_does_not_advance() -> None:
    policy = RoundRobinPolicy()
    snap = snapshot(3)
    assert policy.route(request("x", [1]), snap, 0).instance_id == "i00"
    assert policy.route(request("x", [1]), snap, 0).instance_id == "i00"  # pure
    order = [dispatch(policy, request(f"r{k}", [1]), snap).instance_id for k in range(7)]
    assert order == ["i00", "i01", "i02", "i00", "i01", "i02", "i00"]


def test_skips_unroutable_and_survives_membership_changes() -> None:
    policy = RoundRobinPolicy()
    snap = snapshot_of([InstanceView("a"), InstanceView("b", healthy=False),
                        InstanceView("c"), InstanceView("d", draining=True)])
    order = [dispatch(policy, request(f"r{k}", [1]), snap).instance_id for k in range(4)]
    assert order == ["a", "c", "a", "c"]
    assert all(policy.route(request("z", [1]), snap, 0).reason == "round_robin" for _ in "ab")
    grown = snapshot_of([InstanceView(i) for i in "abcde"])
    # Last was "c": the cycle continues after it rather than restarting.
    order = [dispatch(policy, request(f"s{k}", [1]), grown).instance_id for k in range(4)]
    assert order == ["d", "e", "a", "b"]
