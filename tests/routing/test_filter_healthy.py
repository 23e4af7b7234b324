"""HealthyFilter: only healthy, non-draining instances pass."""

from __future__ import annotations

from router.policy.filters.healthy import HealthyFilter, is_routable
from router.policy.interfaces import InstanceView
from tests.routing.util import request


def test_keeps_only_routable_instances() -> None:
    views = [InstanceView("a"), InstanceView("b", healthy=False),
             InstanceView("c", draining=True), InstanceView("d", healthy=False, draining=True)]
    kept = HealthyFilter().filter(request("r", [1]), views, 0.0)
    assert [v.instance_id for v in kept] == ["a"]
    assert [is_routable(v) for v in views] == [True, False, False, False]
