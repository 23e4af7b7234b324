"""The instance registry's contract: what a replica announces and where it lives in Redis.

Replicas (or the agents that watch servers the fleet did not start) write their record and
load with a heartbeat; gateways read them. Both sides use this module, so the key layout and
the record's fields are defined once. Keys (``ns`` is a namespace prefix, default
``llmfleet``):

- ``{ns}:instances``          set of instance ids ever registered and not yet reaped
- ``{ns}:instance:{id}``      hash: url, model, api, weight, block_size, kv_events, migration
                              + the last load report (JSON); expires ``ttl_s`` after the last
                              heartbeat, so a dead replica vanishes within its TTL
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis

from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE

T = TypeVar("T")


async def reply(command: Awaitable[T] | T) -> T:
    """An asyncio Redis command's reply, typed. redis-py before 8 types a command as
    ``Awaitable[T] | T`` (one signature for its sync and asyncio clients); on the asyncio
    client it is always the awaitable. (We stay below 8: see pyproject.)"""
    return await cast(Awaitable[T], command)


def instances_key(namespace: str) -> str:
    return f"{namespace}:instances"


def instance_key(namespace: str, instance_id: str) -> str:
    return f"{namespace}:instance:{instance_id}"


def draining_key(namespace: str) -> str:
    """Set of instance ids drained by an operator or a supervisor: no new requests."""
    return f"{namespace}:draining"


@dataclass(frozen=True)
class InstanceRecord:
    """A registered instance: static facts plus its last load report."""

    instance_id: str
    url: str
    model: str
    api: str = "vllm"  # backend kind: "vllm" | "sglang" | "openai" (proto.backends)
    weight: float = 1.0
    block_size: int = 16
    load: Mapping[str, float] | None = None
    kv_events: str = ""  # ZMQ endpoint of its vLLM-format KV events, if it publishes them
    migration: str = ""  # host:port of its gRPC migration service, if it has one

    def to_fields(self) -> dict[str, str]:
        """The record as the registry hash stores it."""
        return {
            "url": self.url,
            "model": self.model,
            "api": self.api,
            "weight": repr(self.weight),
            "block_size": str(self.block_size),
            "load": json.dumps(dict(self.load or {})),
            "kv_events": self.kv_events,
            "migration": self.migration,
        }

    @classmethod
    def from_fields(cls, instance_id: str, row: Mapping[str, str]) -> InstanceRecord:
        """The record from a registry hash (fields a replica did not write get defaults)."""
        return cls(
            instance_id=instance_id,
            url=row["url"],
            model=row.get("model", ""),
            api=row.get("api", "vllm"),
            weight=float(row.get("weight", "1.0")),
            block_size=int(row.get("block_size", "16")),
            load=json.loads(row.get("load") or "{}"),
            kv_events=row.get("kv_events", ""),
            migration=row.get("migration", ""),
        )


class RegistryWriter:
    """A replica's side of the registry: heartbeat its record, deregister on the way out."""

    def __init__(self, redis: aioredis.Redis, namespace: str = DEFAULT_NAMESPACE,
                 heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S) -> None:
        self._redis = redis
        self.namespace = namespace
        self.heartbeat_ttl_s = heartbeat_ttl_s

    @classmethod
    def from_url(cls, redis_url: str, namespace: str = DEFAULT_NAMESPACE,
                 heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S) -> RegistryWriter:
        return cls(aioredis.Redis.from_url(redis_url, decode_responses=True), namespace,
                   heartbeat_ttl_s)

    async def heartbeat(self, record: InstanceRecord) -> None:
        """Register or refresh an instance with its current load; expires after the TTL."""
        key = instance_key(self.namespace, record.instance_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(instances_key(self.namespace), record.instance_id)
            pipe.hset(key, mapping=cast(Any, record.to_fields()))
            pipe.pexpire(key, int(self.heartbeat_ttl_s * 1000))
            await pipe.execute()

    async def deregister(self, instance_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(instances_key(self.namespace), instance_id)
            pipe.delete(instance_key(self.namespace, instance_id))
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def load_report(stats: Any, report_time: float, draining: bool = False) -> dict[str, float]:
    """The load fields an instance heartbeats, from an ``EngineStats``-like object (with its
    cumulative prefix-cache counts, prompt tokens looked up and found, when it has them)."""
    report = {
        "num_running": float(stats.num_running),
        "num_waiting": float(stats.num_waiting),
        "waiting_prefill_tokens": float(stats.waiting_prefill_tokens),
        "kv_usage": float(stats.kv_usage),
        "free_blocks": float(stats.free_blocks),
        "total_blocks": float(stats.total_blocks),
        "report_time": report_time,
        "draining": 1.0 if draining else 0.0,
    }
    for name in ("prefix_cache_queries", "prefix_cache_hits"):
        value = getattr(stats, name, None)
        if value is not None:
            report[name] = float(value)
    return report
