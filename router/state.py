"""Cluster state in Redis: instance registry, load reports, ring epoch, request table, leader.

Gateway replicas keep no state of their own that others need: everything they must agree on
lives here, so any replica can serve any request and replicas can come and go.

Keys (``ns`` is a namespace prefix, default ``llmfleet``):

- ``{ns}:instances``          set of instance ids ever registered and not yet reaped
- ``{ns}:instance:{id}``      hash: url, model, api, weight, block_size + the last load report;
                              expires ``ttl_s`` after the last heartbeat (so a dead replica
                              vanishes within its TTL)
- ``{ns}:ring``               hash: epoch, members (JSON list of [id, weight], sorted)
- ``{ns}:leader``             the control-loop leader's id, with a lease (SET NX PX)
- ``{ns}:req:{request_id}``   the instance serving a request (for migration and debugging)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from router.policy.interfaces import ClusterSnapshot, InstanceView

DEFAULT_NAMESPACE = "llmfleet"
DEFAULT_HEARTBEAT_TTL_S = 3.0
REQUEST_TABLE_TTL_S = 600


@dataclass(frozen=True)
class InstanceRecord:
    """A registered instance: static facts plus its last load report."""

    instance_id: str
    url: str
    model: str
    api: str = "vllm"
    weight: float = 1.0
    block_size: int = 16
    load: Mapping[str, float] | None = None
    kv_events: str = ""  # ZMQ endpoint of its vLLM-format KV events, if it publishes them

    def to_view(self, healthy: bool = True, draining: bool = False) -> InstanceView:
        load = self.load or {}
        return InstanceView(
            instance_id=self.instance_id,
            url=self.url,
            healthy=healthy,
            draining=draining or bool(load.get("draining", 0)),
            weight=self.weight,
            num_running=int(load.get("num_running", 0)),
            num_waiting=int(load.get("num_waiting", 0)),
            waiting_prefill_tokens=int(load.get("waiting_prefill_tokens", 0)),
            kv_usage=float(load.get("kv_usage", 0.0)),
            free_blocks=int(load.get("free_blocks", 0)),
            total_blocks=int(load.get("total_blocks", 0)),
            block_size=self.block_size,
            report_time=float(load.get("report_time", 0.0)),
        )


def redis_url_from_env(default: str | None = None) -> str | None:
    return os.environ.get("REDIS_URL", default)


class ClusterStateStore:
    """Async access to the cluster state. One per process; safe to share between tasks."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = DEFAULT_NAMESPACE,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
    ) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    # -- registry -----------------------------------------------------------------------
    async def heartbeat(self, record: InstanceRecord) -> None:
        """Register or refresh an instance with its current load; expires after the TTL."""
        fields: dict[str, str] = {
            "url": record.url,
            "model": record.model,
            "api": record.api,
            "weight": repr(record.weight),
            "block_size": str(record.block_size),
            "load": json.dumps(dict(record.load or {})),
            "kv_events": record.kv_events,
        }
        key = self._key("instance", record.instance_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._key("instances"), record.instance_id)
            pipe.hset(key, mapping=cast(Any, fields))
            pipe.pexpire(key, int(self.heartbeat_ttl_s * 1000))
            await pipe.execute()

    async def deregister(self, instance_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._key("instances"), instance_id)
            pipe.delete(self._key("instance", instance_id))
            await pipe.execute()

    async def live_instances(self) -> list[InstanceRecord]:
        """Instances whose heartbeat has not expired, sorted by id. Reaps expired ids."""
        ids = sorted(str(i) for i in await self._redis.smembers(self._key("instances")))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(self._key("instance", instance_id))
            rows: list[dict[str, str]] = await pipe.execute()
        live: list[InstanceRecord] = []
        dead: list[str] = []
        for instance_id, row in zip(ids, rows, strict=True):
            if not row:
                dead.append(instance_id)
                continue
            live.append(
                InstanceRecord(
                    instance_id=instance_id,
                    url=row["url"],
                    model=row.get("model", ""),
                    api=row.get("api", "vllm"),
                    weight=float(row.get("weight", "1.0")),
                    block_size=int(row.get("block_size", "16")),
                    load=json.loads(row.get("load") or "{}"),
                    kv_events=row.get("kv_events", ""),
                )
            )
        if dead:
            await self._redis.srem(self._key("instances"), *dead)
        return live

    # -- ring epoch ---------------------------------------------------------------------
    async def ring(self) -> tuple[int, list[tuple[str, float]]]:
        row = await self._redis.hgetall(self._key("ring"))
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
                    row = await pipe.hgetall(key)
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
        renewed = await self._redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
            1, key, candidate_id, ms,
        )
        return bool(renewed)

    # -- request table ------------------------------------------------------------------
    async def record_request(self, request_id: str, instance_id: str) -> None:
        await self._redis.set(self._key("req", request_id), instance_id, ex=REQUEST_TABLE_TTL_S)

    async def request_instance(self, request_id: str) -> str | None:
        value = await self._redis.get(self._key("req", request_id))
        return None if value is None else str(value)

    async def forget_request(self, request_id: str) -> None:
        await self._redis.delete(self._key("req", request_id))


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
            views.append(record.to_view())
    views.extend(r.to_view() for r in by_id.values())
    views.sort(key=lambda v: v.instance_id)
    return ClusterSnapshot(epoch=epoch, instances=tuple(views))


def load_report(stats: Any, report_time: float, draining: bool = False) -> dict[str, float]:
    """The load fields an instance heartbeats, from an ``EngineStats``-like object."""
    return {
        "num_running": float(stats.num_running),
        "num_waiting": float(stats.num_waiting),
        "waiting_prefill_tokens": float(stats.waiting_prefill_tokens),
        "kv_usage": float(stats.kv_usage),
        "free_blocks": float(stats.free_blocks),
        "total_blocks": float(stats.total_blocks),
        "report_time": report_time,
        "draining": 1.0 if draining else 0.0,
    }
