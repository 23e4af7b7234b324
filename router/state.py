"""Cluster state in Redis: instance registry, load reports, ring epoch, request table, leader.

Gateway replicas keep no state of their own that others need: everything they must agree on
lives here, so any replica can serve any request and replicas can come and go.

Keys (``ns`` is a namespace prefix, default ``llmfleet``):

- ``{ns}:instances``, ``{ns}:instance:{id}``: the registry (``proto.registry``: replicas
  heartbeat their record and load there)
- ``{ns}:ring``               hash: epoch, members (JSON list of [id, weight], sorted)
- ``{ns}:leader``             the control-loop leader's id, with a lease (SET NX PX)
- ``{ns}:draining``           set of instance ids an operator drained (admin API, dashboard)
- ``{ns}:reqtable:{bucket}`` hash request id -> the instance serving it (for migration and
                              debugging), one per 5-minute bucket, written in batches
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE
from proto.registry import InstanceRecord, RegistryWriter, instance_key, instances_key, reply
from router.policy.interfaces import ClusterSnapshot, InstanceView

REQUEST_TABLE_BUCKET_S = 300.0


def view_of(record: InstanceRecord, healthy: bool = True, draining: bool = False) -> InstanceView:
    """The routing view of a registered instance, from its record and last load report."""
    load = record.load or {}
    return InstanceView(
        instance_id=record.instance_id,
        url=record.url,
        healthy=healthy,
        draining=draining or bool(load.get("draining", 0)),
        weight=record.weight,
        num_running=int(load.get("num_running", 0)),
        num_waiting=int(load.get("num_waiting", 0)),
        waiting_prefill_tokens=int(load.get("waiting_prefill_tokens", 0)),
        kv_usage=float(load.get("kv_usage", 0.0)),
        free_blocks=int(load.get("free_blocks", 0)),
        total_blocks=int(load.get("total_blocks", 0)),
        block_size=record.block_size,
        report_time=float(load.get("report_time", 0.0)),
    )


def redis_url_from_env(default: str | None = None) -> str | None:
    return os.environ.get("REDIS_URL", default)


class ClusterStateStore(RegistryWriter):
    """Async access to the cluster state. One per process; safe to share between tasks.

    It can also write the registry (``heartbeat``, ``deregister``), as tests and agents do.
    """

    def __init__(
        self,
        redis_url: str,
        namespace: str = DEFAULT_NAMESPACE,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
    ) -> None:
        super().__init__(aioredis.Redis.from_url(redis_url, decode_responses=True), namespace,
                         heartbeat_ttl_s)
        self.redis_url = redis_url

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    async def ping(self) -> bool:
        return bool(await reply(self._redis.ping()))

    # -- registry (read side; the write side is proto.registry.RegistryWriter) ---------
    async def live_instances(self) -> list[InstanceRecord]:
        """Instances whose heartbeat has not expired, sorted by id. Reaps expired ids."""
        members = await reply(self._redis.smembers(instances_key(self.namespace)))
        ids = sorted(str(i) for i in members)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(instance_key(self.namespace, instance_id))
            pipe.smembers(self._key("draining"))
            *rows, drained = await pipe.execute()
        live: list[InstanceRecord] = []
        dead: list[str] = []
        for instance_id, row in zip(ids, rows, strict=True):
            if not row:
                dead.append(instance_id)
                continue
            record = InstanceRecord.from_fields(instance_id, row)
            if instance_id in drained:  # an operator's drain: the flag a replica sets itself
                record = replace(record, load={**(record.load or {}), "draining": 1.0})
            live.append(record)
        if dead:
            await reply(self._redis.srem(instances_key(self.namespace), *dead))
        return live

    # -- ring epoch ---------------------------------------------------------------------
    async def ring(self) -> tuple[int, list[tuple[str, float]]]:
        row = await reply(self._redis.hgetall(self._key("ring")))
        if not row:
            return 0, []
        members = [(str(m[0]), float(m[1])) for m in json.loads(row["members"])]
        return int(row["epoch"]), members

    async def publish_ring(self, members: list[tuple[str, float]]) -> int:
        """Store ``members`` as the ring; bump the epoch only if membership changed.

        Atomic (WATCH/MULTI) so two leaders racing cannot both bump the epoch for the same
        change.
        """
        members = sorted(members)
        key = self._key("ring")
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    row = await reply(pipe.hgetall(key))
                    epoch = int(row.get("epoch", 0)) if row else 0
                    current = json.loads(row["members"]) if row else None
                    if current is not None and [list(m) for m in members] == current:
                        await pipe.unwatch()
                        return epoch
                    pipe.multi()
                    pipe.hset(key, mapping={"epoch": epoch + 1, "members": json.dumps(members)})
                    await pipe.execute()
                    return epoch + 1
                except aioredis.WatchError:
                    continue

    # -- leader lease -------------------------------------------------------------------
    async def try_lead(self, candidate_id: str, lease_s: float) -> bool:
        """Take or renew the leader lease; True if ``candidate_id`` leads now."""
        key = self._key("leader")
        ms = int(lease_s * 1000)
        if await self._redis.set(key, candidate_id, nx=True, px=ms):
            return True
        # Renew only our own lease (compare-and-extend in one script).
        renewed = await reply(self._redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
            1, key, candidate_id, ms,
        ))
        return bool(renewed)

    async def leader(self) -> str | None:
        """The id of the gateway holding the leader lease now (None if nobody does)."""
        value = await self._redis.get(self._key("leader"))
        return None if value is None else str(value)

    # -- operator drain -----------------------------------------------------------------
    async def set_draining(self, instance_id: str, draining: bool) -> None:
        """Drain ``instance_id`` (it gets no new requests from any gateway, finishes what it
        has) or take it back; kept until undone, across the instance's restarts."""
        if draining:
            await reply(self._redis.sadd(self._key("draining"), instance_id))
        else:
            await reply(self._redis.srem(self._key("draining"), instance_id))

    # -- backends added through the admin API -------------------------------------------
    # ``{ns}:backends`` hash: instance id -> JSON of the server's spec (url, kind, ...); the
    # leader gateway runs a watcher agent for each, which registers it in the registry.
    async def add_backend(self, instance_id: str, spec: dict[str, Any]) -> None:
        await reply(self._redis.hset(self._key("backends"), instance_id, json.dumps(spec)))

    async def remove_backend(self, instance_id: str) -> bool:
        return bool(await reply(self._redis.hdel(self._key("backends"), instance_id)))

    async def backends(self) -> dict[str, dict[str, Any]]:
        rows = await reply(self._redis.hgetall(self._key("backends")))
        return {str(k): json.loads(v) for k, v in rows.items()}

    # -- fleet-wide hot-key table ---------------------------------------------------------
    # Each gateway replica publishes the hot prefixes its own traffic found; the leader
    # merges them (union; the earliest split of a prefix wins) into one versioned table,
    # and every replica keys prompts by that table, so all of them agree on a prompt's homes.
    async def publish_local_hot_keys(self, replica_id: str, table: dict[int, int]) -> None:
        key = self._key("hotkeys", "local")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, replica_id, json.dumps({"t": time.time(),
                                                   "table": [[p, s] for p, s in table.items()]}))
            pipe.expire(key, 600)
            await pipe.execute()

    async def merge_hot_keys(self, stale_s: float) -> int:
        """Merge the fresh local tables into the fleet table; its version (bumped only when
        the table changed)."""
        rows = await reply(self._redis.hgetall(self._key("hotkeys", "local")))
        now = time.time()
        merged: dict[int, int] = {}
        stale: list[str] = []
        for replica_id, raw in rows.items():
            entry = json.loads(raw)
            if now - float(entry["t"]) > stale_s:
                stale.append(str(replica_id))
                continue
            for prefix, split in entry["table"]:
                merged[int(prefix)] = min(int(split), merged.get(int(prefix), int(split)))
        if stale:
            await reply(self._redis.hdel(self._key("hotkeys", "local"), *stale))
        version, current = await self.hot_keys()
        if current == merged:
            return version
        await self._redis.set(self._key("hotkeys"), json.dumps(
            {"version": version + 1, "table": sorted(merged.items())}))
        return version + 1

    async def hot_keys(self) -> tuple[int, dict[int, int]]:
        """The fleet-wide hot-key table and its version (0 and empty before the first)."""
        raw = await self._redis.get(self._key("hotkeys"))
        if raw is None:
            return 0, {}
        entry = json.loads(raw)
        return int(entry["version"]), {int(p): int(s) for p, s in entry["table"]}

    # -- request table ------------------------------------------------------------------
    # The table is one Redis hash per time bucket, written once per control-loop tick
    # with a single HSET: a SET per request would cost the gateway more CPU than routing.
    # An entry lives for one to two buckets.
    def _table_key(self, bucket: int) -> str:
        return self._key("reqtable", str(bucket))

    def _bucket(self) -> int:
        return int(time.time() // REQUEST_TABLE_BUCKET_S)

    async def record_request(self, request_id: str, instance_id: str) -> None:
        await self.record_requests([(request_id, instance_id)])

    async def record_requests(self, entries: list[tuple[str, str]]) -> None:
        """Write many request-table entries in one round trip."""
        if not entries:
            return
        key = self._table_key(self._bucket())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=dict(entries))
            pipe.expire(key, int(2 * REQUEST_TABLE_BUCKET_S))
            await pipe.execute()

    async def request_instance(self, request_id: str) -> str | None:
        """The instance serving ``request_id`` (the latest entry), or None."""
        bucket = self._bucket()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._table_key(bucket), request_id)
            pipe.hget(self._table_key(bucket - 1), request_id)
            now, before = await pipe.execute()
        value = now if now is not None else before
        return None if value is None else str(value)

    async def forget_request(self, request_id: str) -> None:
        bucket = self._bucket()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self._table_key(bucket), request_id)
            pipe.hdel(self._table_key(bucket - 1), request_id)
            await pipe.execute()


def snapshot_from_records(
    epoch: int, ring_members: list[tuple[str, float]], live: list[InstanceRecord]
) -> ClusterSnapshot:
    """Build the routing snapshot: ring members in ring order, health from the registry.

    Ring members without a live heartbeat stay in the snapshot as unhealthy, so every
    gateway keeps the same ring until the leader publishes a new epoch; live instances not
    yet in the ring are appended (healthy) so a fresh fleet is usable before the first epoch.
    """
    by_id: dict[str, InstanceRecord] = {r.instance_id: r for r in live}
    views: list[InstanceView] = []
    for instance_id, weight in ring_members:
        record = by_id.pop(instance_id, None)
        if record is None:
            views.append(InstanceView(instance_id=instance_id, healthy=False, weight=weight))
        else:
            views.append(view_of(record))
    views.extend(view_of(r) for r in by_id.values())
    views.sort(key=lambda v: v.instance_id)
    return ClusterSnapshot(epoch=epoch, instances=tuple(views))

