"""The healthy filter: only instances that are up and not draining receive new requests."""

from __future__ import annotations

from router.policy.interfaces import Filter, InstanceView, RoutingRequest


def is_routable(view: InstanceView) -> bool:
    """True if ``view`` may receive new requests: healthy and not draining.

    The single definition of eligibility: every policy, the load board and the rings use it.
    """
    return view.healthy and not view.draining


class HealthyFilter(Filter):
    """Keeps healthy, non-draining instances."""

    def filter(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> list[InstanceView]:
        return [view for view in instances if is_routable(view)]
