"""The kinds of backend a fleet can route to, and what each can do.

One ``Backend`` per kind says where its load is read (Prometheus metric names, a load
endpoint), what it publishes (vLLM-format KV events over ZMQ), what it offers (KV export for
live migration, a ``/tokenize`` endpoint) and how to tell it apart from its ``/metrics``.
The adapters that watch servers the fleet did not start (``instances.adapters``) read load
with it; the gateway reads ``InstanceRecord.api`` (a kind name below) to know what a
replica can do.

Metric names are listed newest first: engines rename metrics (vLLM's KV usage gauge was
``vllm:gpu_cache_usage_perc`` before V1), and an adapter reads the first name present and
warns once when none is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Load-report fields an adapter fills from metrics (the names ``proto.registry.load_report``
# writes for the reference engine).
RUNNING = "num_running"
WAITING = "num_waiting"
KV_USAGE = "kv_usage"
# Cumulative prefix-cache counters (tokens looked up / tokens hit), when the engine has them.
PREFIX_QUERIES = "prefix_cache_queries"
PREFIX_HITS = "prefix_cache_hits"


@dataclass(frozen=True)
class Backend:
    """One kind of backend and its capabilities."""

    kind: str
    description: str
    # load field -> metric family names, newest first (family names as the Prometheus
    # parser gives them: a counter ``x_total`` is family ``x``).
    metrics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # A metric family whose labels carry the cache configuration (block_size, num blocks).
    cache_info_metric: str | None = None
    # A JSON load endpoint (SGLang's /get_load), read when present.
    load_endpoint: str | None = None
    # Publishes vLLM-format KV events (BlockStored/BlockRemoved/AllBlocksCleared) on ZMQ.
    kv_events: bool = False
    # Exports KV blocks for live migration (the llmfleet migration agent).
    kv_export: bool = False
    # POST endpoint turning a prompt into the engine's token ids.
    tokenize_endpoint: str | None = None
    # Metric-name prefix that identifies this kind in a /metrics page.
    metric_prefix: str | None = None
    # Whether the gateway must estimate load from its own in-flight counts.
    load_from_gateway: bool = False

    def metric_names(self) -> tuple[str, ...]:
        """Every metric family this kind's adapter reads."""
        return tuple(name for names in self.metrics.values() for name in names)


_VLLM_METRICS: dict[str, tuple[str, ...]] = {
    RUNNING: ("vllm:num_requests_running",),
    WAITING: ("vllm:num_requests_waiting",),
    KV_USAGE: ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    PREFIX_QUERIES: ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    PREFIX_HITS: ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}

VLLM = Backend(
    kind="vllm",
    description="vLLM (V1 engine) OpenAI server",
    metrics=_VLLM_METRICS,
    cache_info_metric="vllm:cache_config_info",
    kv_events=True,  # with --kv-events-config (publisher "zmq")
    tokenize_endpoint="/tokenize",
    metric_prefix="vllm:",
)

SGLANG = Backend(
    kind="sglang",
    description="SGLang OpenAI server",
    metrics={
        RUNNING: ("sglang:num_running_reqs",),
        WAITING: ("sglang:num_queue_reqs",),
        KV_USAGE: ("sglang:token_usage",),
    },
    load_endpoint="/get_load",
    tokenize_endpoint=None,
    metric_prefix="sglang:",
)

OPENAI = Backend(
    kind="openai",
    description="any OpenAI-compatible server (no load metrics: the gateway counts)",
    load_from_gateway=True,
)

LLMFLEET = Backend(
    kind="llmfleet",
    description="llmfleet reference engine (vLLM metric names, KV events, KV export)",
    metrics=_VLLM_METRICS,
    kv_events=True,
    kv_export=True,
    metric_prefix="vllm:",
)

BACKENDS: dict[str, Backend] = {b.kind: b for b in (VLLM, SGLANG, OPENAI, LLMFLEET)}


def backend(kind: str) -> Backend:
    """The backend of ``kind``; ValueError naming the known kinds otherwise."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown backend kind {kind!r}; known: "
                         f"{', '.join(sorted(BACKENDS))}") from None


def detect_kind(metric_families: Iterable[str]) -> str:
    """The kind whose metric prefix a /metrics page uses: vllm, sglang, else openai."""
    names = list(metric_families)
    for kind in ("vllm", "sglang"):
        prefix = BACKENDS[kind].metric_prefix
        if prefix and any(n.startswith(prefix) for n in names):
            return kind
    return "openai"
