"""The gateway hides suspect replicas from policies without churning snapshot objects."""

from __future__ import annotations

import asyncio
import contextlib

from router.gateway import Gateway, GatewayConfig
from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest


def _gateway() -> Gateway:
    gateway = Gateway(GatewayConfig(redis_url="redis://127.0.0.1:1", policy="least_loaded"))
    gateway.snapshot = ClusterSnapshot(1, (InstanceView("a"), InstanceView("b")))
    return gateway


def test_nothing_hidden_returns_the_snapshot_itself() -> None:
    gateway = _gateway()
    assert gateway._routable_snapshot(set(), now=0.0) is gateway.snapshot


def test_suspect_is_masked_and_the_masked_snapshot_is_reused() -> None:
    gateway = _gateway()
    gateway._suspect_until["a"] = 5.0
    first = gateway._routable_snapshot(set(), now=1.0)
    assert [v.healthy for v in first.instances] == [False, True]
    assert gateway._routable_snapshot(set(), now=2.0) is first
    assert first.instances[1] is gateway.snapshot.instances[1]  # untouched views are shared
    assert gateway._routable_snapshot(set(), now=6.0) is gateway.snapshot  # suspicion expired


def test_excluded_replica_never_chosen() -> None:
    gateway = _gateway()
    for i in range(20):
        decision = gateway.route(RoutingRequest(f"r{i}", [1, 2, 3], 4), {"b"}, now=0.0)
        assert decision.instance_id == "a"


async def test_stop_ends_refresh_loop_even_if_a_cancel_is_swallowed() -> None:
    gateway = _gateway()

    async def refresh_that_swallows_cancel() -> None:  # as redis-py can, mid-command
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)

    gateway.refresh = refresh_that_swallows_cancel  # type: ignore[method-assign]
    gateway.config.refresh_interval_s = 0.01
    await gateway.start()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(gateway.stop(), timeout=2.0)
