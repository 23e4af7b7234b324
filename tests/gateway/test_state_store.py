"""The Redis cluster state store against a real redis-server."""

from __future__ import annotations

import asyncio

from router.state import ClusterStateStore, InstanceRecord, snapshot_from_records


def _record(instance_id: str, running: int = 0) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, url=f"http://127.0.0.1/{instance_id}",
                          model="m", load={"num_running": running, "kv_usage": 0.25})


async def test_heartbeat_registers_and_expires(redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=0.3)
    try:
        await store.heartbeat(_record("a", running=3))
        await store.heartbeat(_record("b"))
        live = await store.live_instances()
        assert [r.instance_id for r in live] == ["a", "b"]
        assert live[0].load is not None and live[0].load["num_running"] == 3
        await asyncio.sleep(0.15)
        await store.heartbeat(_record("b"))  # only b keeps beating
        await asyncio.sleep(0.25)
        assert [r.instance_id for r in await store.live_instances()] == ["b"]
    finally:
        await store.close()


async def test_ring_epoch_bumps_only_on_membership_change(redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace)
    try:
        assert await store.ring() == (0, [])
        assert await store.publish_ring([("b", 1.0), ("a", 1.0)]) == 1
        assert await store.publish_ring([("a", 1.0), ("b", 1.0)]) == 1  # same set, same epoch
        assert await store.publish_ring([("a", 1.0)]) == 2
        assert await store.ring() == (2, [("a", 1.0)])
    finally:
        await store.close()


async def test_concurrent_publishers_bump_once(redis_url: str, namespace: str) -> None:
    stores = [ClusterStateStore(redis_url, namespace) for _ in range(5)]
    try:
        epochs = await asyncio.gather(*(s.publish_ring([("x", 1.0)]) for s in stores))
        assert set(epochs) == {1}
    finally:
        for s in stores:
            await s.close()


async def test_leader_lease_is_exclusive_and_expires(redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace)
    try:
        assert await store.try_lead("g1", lease_s=0.3)
        assert not await store.try_lead("g2", lease_s=0.3)
        assert await store.try_lead("g1", lease_s=0.3)  # renew own lease
        await asyncio.sleep(0.4)
        assert await store.try_lead("g2", lease_s=0.3)
    finally:
        await store.close()


async def test_request_table(redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace)
    try:
        await store.record_request("r1", "a")
        assert await store.request_instance("r1") == "a"
        await store.forget_request("r1")
        assert await store.request_instance("r1") is None
    finally:
        await store.close()


def test_snapshot_keeps_dead_ring_members_as_unhealthy() -> None:
    snap = snapshot_from_records(3, [("a", 1.0), ("b", 1.0)], [_record("b"), _record("c")])
    assert snap.epoch == 3
    views = snap.by_id()
    assert [v.instance_id for v in snap.instances] == ["a", "b", "c"]
    assert not views["a"].healthy and views["b"].healthy and views["c"].healthy
    assert views["b"].kv_usage == 0.25
