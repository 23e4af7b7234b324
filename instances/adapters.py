"""Adapters for replicas llmfleet did not start itself: vLLM, SGLang, any OpenAI server.

Such a server does not heartbeat into our registry, so an ``ExternalReplicaAgent`` does it
for it: it polls the server's ``/health`` and ``/metrics`` and registers what it reads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import httpx

from proto.registry import InstanceRecord, RegistryWriter

log = logging.getLogger("llmfleet.adapters")

# Metric names per engine kind → our load fields.
_METRIC_MAP: dict[str, dict[str, str]] = {
    "vllm": {
        "vllm:num_requests_running": "num_running",
        "vllm:num_requests_waiting": "num_waiting",
        "vllm:kv_cache_usage_perc": "kv_usage",
        "vllm:gpu_cache_usage_perc": "kv_usage",  # vLLM V0 name
    },
    "sglang": {
        "sglang:num_running_reqs": "num_running",
        "sglang:num_queue_reqs": "num_waiting",
        "sglang:token_usage": "kv_usage",
    },
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_load_metrics(text: str, api: str) -> dict[str, float]:
    """Load fields from a Prometheus exposition, summing samples across label sets."""
    mapping = _METRIC_MAP.get(api, {})
    load: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in mapping:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        field = mapping[match.group(1)]
        load[field] = load.get(field, 0.0) + value
    return load


def detect_api(text: str) -> str:
    return "sglang" if "sglang:" in text else "vllm"


class ExternalReplicaAgent:
    """Registers one external OpenAI-compatible server and heartbeats its load."""

    def __init__(self, url: str, store: RegistryWriter, instance_id: str,
                 model: str | None = None, poll_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.store = store
        self.instance_id = instance_id
        self.model = model
        self.poll_s = poll_s

    async def poll_once(self, client: httpx.AsyncClient) -> InstanceRecord | None:
        """One health + metrics read; None if the server is not healthy now."""
        try:
            health = await client.get(self.url + "/health")
            if health.status_code != 200:
                return None
            if self.model is None:
                models = (await client.get(self.url + "/v1/models")).json()
                self.model = models["data"][0]["id"]
            metrics = await client.get(self.url + "/metrics")
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            log.info("external replica %s not ready: %s", self.url, exc)
            return None
        api = detect_api(metrics.text)
        load = parse_load_metrics(metrics.text, api)
        load["report_time"] = time.time()
        return InstanceRecord(instance_id=self.instance_id, url=self.url, model=self.model or "",
                              api=api, load=load)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.poll_s * 2) as client:
            while True:
                record = await self.poll_once(client)
                if record is not None:
                    await self.store.heartbeat(record)
                await asyncio.sleep(self.poll_s)
