"""The operator drain in Redis (router.state): what every gateway replica reads."""

from __future__ import annotations

from proto.registry import InstanceRecord
from router.state import ClusterStateStore, snapshot_from_records


async def test_a_drain_outlives_heartbeats_and_restarts_until_undone(
        redis_url: str, namespace: str) -> None:
    store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=30)
    other = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=30)  # another gateway
    try:
        record = InstanceRecord("e1", "http://127.0.0.1:1", "m", load={"num_running": 2.0})
        await store.heartbeat(record)
        await store.heartbeat(InstanceRecord("e2", "http://127.0.0.1:2", "m"))
        await store.set_draining("e1", True)

        def draining(live: list[InstanceRecord]) -> set[str]:
            return {v.instance_id for v in snapshot_from_records(0, [], live).instances
                    if v.draining}

        assert draining(await other.live_instances()) == {"e1"}
        # The replica's own report is kept; only the drain flag is added.
        assert {r.instance_id: dict(r.load or {}) for r in await other.live_instances()}[
            "e1"]["num_running"] == 2.0
        # A fresh heartbeat (or the replica restarting and re-registering) does not undo it.
        await store.deregister("e1")
        await store.heartbeat(record)
        assert draining(await other.live_instances()) == {"e1"}
        await other.set_draining("e1", False)
        assert draining(await store.live_instances()) == set()
        assert await store.leader() is None
        assert await store.try_lead("gw-1", 5.0)
        assert await other.leader() == "gw-1"
    finally:
        await store.close()
        await other.close()
