"""Adapters for replicas llmfleet did not start itself: vLLM, SGLang, any OpenAI server.

Such a server does not heartbeat into our registry, so an ``ExternalReplicaAgent`` does it
for it: it health-checks the server, reads its load the way its kind allows
(``proto.backends``: Prometheus metrics, SGLang's ``/get_load``, or nothing for a plain
OpenAI server, whose load the gateway counts itself), and writes what it read to the
registry. A server that is down (its health check refused or failed) leaves the registry
(and so the rings) after ``unhealthy_after`` checks in a row and joins again when it
answers. A server that is only slow (a check timed out: a loaded vLLM's API process can
take seconds to answer) is not dead: it keeps its registration, with its last load report
(whose ``report_time`` then shows its age), for up to ``busy_grace_s`` since it last
answered. Its registration's TTL is refreshed on a timer of its own, so a slow load read
cannot let it expire either.

Metrics are parsed with ``prometheus_client``'s parser. A metric the kind should have but the
page lacks (engines rename metrics between versions) is logged once per server and field,
and the field is left out of the load report: a renamed metric degrades routing, never
stops it.

For vLLM the agent also finds the replica's KV-event publisher (``/kv_event_sources``), so
the gateway's precise cache view follows it, and checks once, with ``/tokenize``, that the
gateway's tokenizer gives the engine's token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proto import backends
from proto.backends import Backend
from proto.registry import InstanceRecord, RegistryWriter
from proto.tokenize import Tokenizer

log = logging.getLogger("llmfleet.adapters")

# What the tokenizer check sends to /tokenize: words, digits, punctuation and non-ASCII, so a
# different vocabulary or normaliser shows.
TOKENIZER_PROBE = "Hello world: the cache prefix of replica 42 — naïve café, 東京 🙂."


@dataclass
class MetricsPage:
    """One parsed /metrics page: each family's samples summed over label sets, and the
    labels of each family's first sample (``*_info`` gauges carry their data there)."""

    values: dict[str, float] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MetricsPage:
        """Raises ValueError for a page the Prometheus text parser rejects."""
        page = cls()
        for family in text_string_to_metric_families(text):
            total = 0.0
            for sample in family.samples:
                # A counter's family also holds its ``_created`` timestamp samples.
                if sample.name.endswith("_created") and not family.name.endswith("_created"):
                    continue
                total += float(sample.value)
                page.labels.setdefault(family.name, dict(sample.labels))
            # A family can appear twice (samples out of order): add, never overwrite.
            page.values[family.name] = page.values.get(family.name, 0.0) + total
        return page

    def get(self, name: str) -> float | None:
        """A family's value by family name, or by exposed sample name (``x_total`` of a
        counter, which some exporters publish as a gauge of that name)."""
        if name in self.values:
            return self.values[name]
        return self.values.get(name + "_total")


class LoadReader:
    """Turns a backend kind's metrics into load-report fields, warning once per missing one."""

    def __init__(self, backend: Backend, source: str) -> None:
        self.backend = backend
        self.source = source
        self.warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message, *args)

    def read(self, text: str) -> dict[str, float]:
        """Load fields from a /metrics page; fields whose metric is missing are left out."""
        try:
            page = MetricsPage.parse(text)
        except ValueError as exc:
            self._warn_once("parse", "unparseable /metrics from %s (%s): no load from metrics",
                            self.source, exc)
            return {}
        load: dict[str, float] = {}
        for load_field, names in self.backend.metrics.items():
            value = next((v for v in map(page.get, names) if v is not None), None)
            if value is None:
                self._warn_once(load_field, "%s at %s exposes none of %s: its %s is not "
                                "reported (metric renamed or removed in this version?)",
                                self.backend.kind, self.source, ", ".join(names), load_field)
                continue
            load[load_field] = value
        info = page.labels.get(self.backend.cache_info_metric or "")
        if info is not None:
            with contextlib.suppress(KeyError, ValueError):
                load["block_size"] = float(int(info["block_size"]))
            with contextlib.suppress(KeyError, ValueError):
                load["total_blocks"] = float(int(info["num_gpu_blocks"]))
        if "total_blocks" in load and backends.KV_USAGE in load:
            load["free_blocks"] = float(int(load["total_blocks"]
                                            * (1.0 - load[backends.KV_USAGE])))
        return load


def parse_load_metrics(text: str, api: str) -> dict[str, float]:
    """Load fields of a /metrics page of backend kind ``api`` (missing fields left out)."""
    return LoadReader(backends.backend(api), "metrics").read(text)


def parse_get_load(payload: Any) -> dict[str, float]:
    """Load fields from SGLang's ``/get_load`` (one entry per data-parallel rank, summed)."""
    entries = payload if isinstance(payload, list) else [payload]
    reqs = waiting = 0.0
    for entry in entries:
        if isinstance(entry, Mapping):
            reqs += float(entry.get("num_reqs", 0))
            waiting += float(entry.get("num_waiting_reqs", 0))
    return {backends.RUNNING: max(0.0, reqs - waiting), backends.WAITING: waiting}


def detect_api(text: str) -> str:
    """The backend kind a /metrics page belongs to (vllm, sglang, else openai)."""
    try:
        families = [f.name for f in text_string_to_metric_families(text)]
    except ValueError:
        return "openai"
    return backends.detect_kind(families)


def kv_events_endpoint(sources: Any, server_url: str) -> str:
    """The ZMQ endpoint to subscribe to, from vLLM's ``/kv_event_sources`` answer.

    A wildcard host (``tcp://*:5557``: the publisher binds every interface) is replaced by
    the server's own host. An empty string when the replica publishes nothing.
    """
    if not isinstance(sources, Mapping):
        return ""
    for source in sources.values():
        if not isinstance(source, Mapping) or not source.get("enable_kv_cache_events"):
            continue
        if source.get("publisher", "zmq") != "zmq":
            continue
        endpoint = str(source.get("endpoint") or "")
        host = urlsplit(server_url).hostname or "127.0.0.1"
        for wildcard in ("//*:", "//0.0.0.0:"):
            endpoint = endpoint.replace(wildcard, f"//{host}:")
        return endpoint
    return ""


@dataclass(frozen=True)
class BackendSpec:
    """One server the fleet did not start, as ``--backend`` or a fleet file names it."""

    url: str
    kind: str = "auto"  # a proto.backends kind, or "auto" (told from its /metrics)
    instance_id: str | None = None
    model: str | None = None
    kv_events: str | None = None  # ZMQ endpoint override (vLLM's is discovered otherwise)
    block_size: int | None = None  # KV block size override (vLLM's is read from /metrics)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must be http(s)://..., got {self.url!r}")
        if self.kind != "auto":
            backends.backend(self.kind)  # ValueError naming the known kinds


_SPEC_KEYS = {"url": "url", "kind": "kind", "id": "instance_id", "instance_id": "instance_id",
              "model": "model", "kv_events": "kv_events", "block_size": "block_size",
              "weight": "weight"}


def load_fleet_file(path: str) -> list[BackendSpec]:
    """Backends listed in a fleet file: YAML (``.yaml``/``.yml``/``.json``) or TOML
    (``.toml``), a top-level ``backends`` list of tables with ``url`` and optionally
    ``kind``, ``id``, ``model``, ``kv_events``, ``block_size``, ``weight``.

    Raises ValueError naming the entry and key for anything it does not understand.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib

        data: Any = tomllib.loads(raw.decode("utf-8"))
    else:
        import yaml

        data = yaml.safe_load(raw)
    if not isinstance(data, Mapping) or not isinstance(data.get("backends"), list):
        raise ValueError(f"{path}: expected a top-level 'backends' list")
    specs: list[BackendSpec] = []
    for n, entry in enumerate(data["backends"]):
        if not isinstance(entry, Mapping) or "url" not in entry:
            raise ValueError(f"{path}: backend #{n} needs a 'url'")
        unknown = sorted(set(entry) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"{path}: backend #{n} has unknown keys {unknown}; known: "
                             f"{sorted(set(_SPEC_KEYS))}")
        try:
            specs.append(BackendSpec(**{_SPEC_KEYS[k]: v for k, v in entry.items()}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: backend #{n}: {exc}") from exc
    ids = [s.instance_id for s in specs if s.instance_id]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: backend ids must be unique, got {ids}")
    return specs


def agents_for(specs: list[BackendSpec], store: RegistryWriter, poll_s: float,
               tokenizer: Tokenizer | None = None) -> list[ExternalReplicaAgent]:
    """One agent per backend; unnamed ones are ``external-<n>``."""
    return [ExternalReplicaAgent(s.url, store, s.instance_id or f"external-{n}",
                                 model=s.model, poll_s=poll_s, kind=s.kind,
                                 kv_events=s.kv_events, block_size=s.block_size,
                                 weight=s.weight, tokenizer=tokenizer)
            for n, s in enumerate(specs)]


class ExternalReplicaAgent:
    """Registers one external OpenAI-compatible server and heartbeats its load.

    ``kind`` is a ``proto.backends`` kind or ``"auto"`` (told from the /metrics page: vLLM,
    SGLang, else a plain OpenAI server). ``kv_events`` overrides the KV-event endpoint the
    agent would discover; ``tokenizer`` is the gateway's, checked against ``/tokenize``.
    """

    def __init__(self, url: str, store: RegistryWriter, instance_id: str,
                 model: str | None = None, poll_s: float = 1.0, kind: str = "auto",
                 kv_events: str | None = None, block_size: int | None = None,
                 weight: float = 1.0, tokenizer: Tokenizer | None = None,
                 unhealthy_after: int = 2, busy_grace_s: float = 15.0,
                 probe_timeout_s: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.store = store
        self.instance_id = instance_id
        self.model = model
        self.poll_s = poll_s
        self.kind = kind
        self.backend: Backend | None = None if kind == "auto" else backends.backend(kind)
        self.kv_events = kv_events
        self.block_size = block_size
        self.weight = weight
        self.tokenizer = tokenizer
        self.unhealthy_after = unhealthy_after
        self.busy_grace_s = busy_grace_s
        self.probe_timeout_s = probe_timeout_s or max(2.0, poll_s * 2)
        self.tokenizer_agrees: bool | None = None
        self.registered = False
        self.failures = 0
        # Whether the last poll failed only by timing out (the server took the connection
        # but did not answer in time): busy, not down.
        self.timed_out = False
        self.last_answer = float("-inf")  # monotonic time of the last successful poll
        self.last_record: InstanceRecord | None = None
        # Registry writes in order: a keepalive that started before a deregistration must
        # not land after it and bring a dead server back.
        self._writing = asyncio.Lock()
        self._written_at = float("-inf")  # monotonic time of the last registry write
        self._refresh_s = getattr(store, "heartbeat_ttl_s", poll_s * 3) / 3
        self._checked = False
        self._reader: LoadReader | None = None

    async def _discover(self, client: httpx.AsyncClient, metrics_text: str | None) -> None:
        """Once per agent: the backend kind, and for vLLM its KV-event publisher."""
        if self.backend is None:
            kind = detect_api(metrics_text) if metrics_text is not None else "openai"
            self.backend = backends.backend(kind)
            log.info("external replica %s: detected %s", self.url, kind)
        if self.kv_events is None:
            self.kv_events = ""
            if self.backend.kv_events and self.backend.kind == "vllm":
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await client.get(self.url + "/kv_event_sources")
                    if r.status_code == 200:
                        self.kv_events = kv_events_endpoint(r.json(), self.url)

    async def check_tokenizer(self, client: httpx.AsyncClient) -> bool | None:
        """Whether the gateway's tokenizer gives the server's token ids for a probe text
        (completion and chat forms); None when it cannot be told. Logged once."""
        assert self.backend is not None
        if self.tokenizer is None or self.backend.tokenize_endpoint is None:
            return None
        messages = [{"role": "user", "content": TOKENIZER_PROBE}]
        ours = (self.tokenizer.encode(TOKENIZER_PROBE), self.tokenizer.encode_chat(messages))
        try:
            plain = await client.post(self.url + self.backend.tokenize_endpoint,
                                      json={"model": self.model, "prompt": TOKENIZER_PROBE})
            chat = await client.post(self.url + self.backend.tokenize_endpoint,
                                     json={"model": self.model, "messages": messages})
            theirs = (plain.json()["tokens"], chat.json()["tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.info("external replica %s: tokenizer check not possible: %r", self.url, exc)
            return None
        agrees = list(ours[0]) == list(theirs[0]) and ours[1].tolist() == list(theirs[1])
        if agrees:
            log.info("external replica %s: the gateway's tokenizer matches its /tokenize",
                     self.url)
        else:
            log.warning("external replica %s tokenizes differently from the gateway's "
                        "tokenizer (%s): routing keys and cached-token counts will not match "
                        "its cache; give the gateway the model's tokenizer (--tokenizer)",
                        self.url, self.tokenizer.name)
        return agrees

    async def poll_once(self, client: httpx.AsyncClient) -> InstanceRecord | None:
        """One health check and load read; None if the server is not healthy now
        (``timed_out`` tells a server that did not answer in time from one that is down)."""
        self.timed_out = False
        try:
            health = await client.get(self.url + "/health")
            if health.status_code != 200:
                return None
            if self.model is None:
                models = (await client.get(self.url + "/v1/models")).json()
                self.model = str(models["data"][0]["id"])
            metrics_text: str | None = None
            if self.backend is None or self.backend.metrics:
                metrics = await client.get(self.url + "/metrics")
                metrics_text = metrics.text if metrics.status_code == 200 else None
            await self._discover(client, metrics_text)
            assert self.backend is not None
            if not self._checked:
                self._checked = True
                self.tokenizer_agrees = await self.check_tokenizer(client)
            load: dict[str, float] = {}
            if self.backend.load_endpoint:
                r = await client.get(self.url + self.backend.load_endpoint)
                if r.status_code == 200:
                    load.update(parse_get_load(r.json()))
            if metrics_text is not None and self.backend.metrics:
                if self._reader is None:
                    self._reader = LoadReader(self.backend, self.url)
                for key, value in self._reader.read(metrics_text).items():
                    load.setdefault(key, value)
        except httpx.TimeoutException as exc:
            # Connected but no answer in time: loaded, or hung; not refused.
            self.timed_out = not isinstance(exc, httpx.ConnectTimeout)
            log.debug("external replica %s did not answer in time: %r", self.url, exc)
            return None
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            # Every poll while it is down: DEBUG (joining and leaving are logged at INFO).
            log.debug("external replica %s not ready: %r", self.url, exc)
            return None
        block_size = self.block_size or int(load.pop("block_size", 0)) or 16
        load.pop("block_size", None)
        load["report_time"] = time.time()
        return InstanceRecord(instance_id=self.instance_id, url=self.url, model=self.model or "",
                              api=self.backend.kind, weight=self.weight, block_size=block_size,
                              load=load, kv_events=self.kv_events or "")

    def busy(self, now: float) -> bool:
        """Registered, and last heard from within ``busy_grace_s``: slow, not gone."""
        return self.registered and now - self.last_answer < self.busy_grace_s

    async def step(self, client: httpx.AsyncClient) -> InstanceRecord | None:
        """One poll, then register/refresh; leave after ``unhealthy_after`` failed checks
        in a row, or once a server that stopped answering in time passed its grace."""
        record = await self.poll_once(client)
        now = time.monotonic()
        if record is not None:
            self.failures = 0
            self.last_answer = now
            self.last_record = record
            async with self._writing:
                await self.store.heartbeat(record)
                self._written_at = now
            if not self.registered:
                log.info("external replica %s joined as %s (%s)", self.url, self.instance_id,
                         record.api)
            self.registered = True
            return record
        if self.timed_out and self.busy(now):
            await self.keepalive(now)
            return None
        self.failures += 1
        if self.registered and (self.failures >= self.unhealthy_after or self.timed_out):
            log.warning("external replica %s failed %d health checks%s: leaving the fleet",
                        self.url, self.failures,
                        f" (no answer for {now - self.last_answer:.1f} s)"
                        if self.timed_out else "")
            async with self._writing:
                self.registered = False
                await self.store.deregister(self.instance_id)
        return None

    async def keepalive(self, now: float) -> None:
        """Refresh the registration of a server that is busy (see ``busy``) with its last
        load report, so the TTL does not outrun a slow poll."""
        async with self._writing:
            # Only when no heartbeat went out for a third of the TTL: a healthy poll's own
            # heartbeat already keeps the registration alive.
            if (self.busy(now) and self.last_record is not None
                    and now - self._written_at >= self._refresh_s):
                await self.store.heartbeat(self.last_record)
                self._written_at = now

    async def _keepalive_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.keepalive(time.monotonic())
            except Exception as exc:  # Redis briefly away: the poll loop says so too
                log.debug("external replica %s: keepalive failed: %r", self.url, exc)

    async def run(self) -> None:
        keepalive = asyncio.create_task(self._keepalive_loop(self._refresh_s))
        async with httpx.AsyncClient(timeout=self.probe_timeout_s) as client:
            try:
                while True:
                    try:
                        await self.step(client)
                    except Exception as exc:  # Redis briefly away: keep polling
                        log.warning("external replica %s: registry write failed: %r",
                                    self.url, exc)
                    await asyncio.sleep(self.poll_s)
            finally:
                keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keepalive
                if self.registered:
                    with contextlib.suppress(Exception):
                        await self.store.deregister(self.instance_id)
