"""One configuration object for a run, simulated (``run_sim``) or live (``run_live``), and the
function that turns it into the list of requests to send.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loadgen.arrivals import mean_rate, scale_to_rate
from loadgen.request import Segment, TraceRequest, segment_key
from loadgen.traces import TRACE_FORMATS, ReadStats, read_trace
from loadgen.workloads import SYNTHETIC_WORKLOADS, build_synthetic
from proto.defaults import DEFAULT_PROFILE, DEFAULT_SLO_TTFT_S

WORKLOAD_FORMATS = (*TRACE_FORMATS, "synthetic")
DEFAULT_SYNTHETIC_REQUESTS = 1000
DEFAULT_SYNTHETIC_RATE = 1.0


@dataclass
class RunConfig:
    """Everything a run needs. Fields used only by the simulator or only by the live runner
    are ignored by the other.

    Workload: ``trace`` is a file (or, for ``trace_format="synthetic"``, the name of a
    synthetic workload: ``multiturn`` (default), ``shared_prefix``, ``zipf``, ``long_short``,
    with ``workload_params`` overriding its config fields). ``rate`` rescales a trace's own
    timestamps to that mean rate (None keeps them); for synthetic workloads it is the request
    rate and ``cv`` the arrival CV (1 = Poisson). ``max_requests`` takes the first K
    requests; a trace shorter than K is replayed with fresh prefix keys per pass (so replays
    do not hit each other's cache). ``max_seconds`` bounds the run: the simulator drops
    arrivals after it, the live runner stops sending then and waits ``drain_timeout_s`` more.
    """

    trace: str | None = None
    trace_format: str = "mooncake"
    rate: float | None = None
    cv: float = 1.0
    max_requests: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    skip_bad_lines: bool = False
    workload_params: dict[str, Any] = field(default_factory=dict)
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S
    slo_tpot_s: float | None = None
    warmup_fraction: float = 0.0
    # Simulator
    instances: int = 4
    policy: str = "round_robin"
    policy_params: dict[str, Any] = field(default_factory=dict)
    profile: str = DEFAULT_PROFILE
    engine_params: dict[str, Any] = field(default_factory=dict)
    report_interval_s: float = 0.0
    dispatch_delay_s: float = 0.0
    # Router-side admission (router.admission): none | laps | laps-spatial, its parameters
    # over admission_defaults, and hotspot rebalancing of queued requests (None: on when the
    # admission queues and the policy can plan moves).
    admission: str = "none"
    admission_params: dict[str, Any] = field(default_factory=dict)
    rebalance: bool | None = None
    # A replica rejects prompt + max_tokens above this (HTTP 400, as ``llmfleet engine``'s
    # default --max-model-len); the simulator counts such requests as errors too.
    max_model_len: int | None = 131072
    # Live migration of running requests between simulated instances (Llumnix freeness
    # rebalancing, ``migration.policy.FreenessRebalancer`` with ``migration_params``
    # overriding ``RebalanceConfig``); the KV copies at ``migration_gbytes_per_s`` with the
    # profile's bytes per token.
    migration: bool = False
    migration_gbytes_per_s: float = 10.0
    migration_params: dict[str, Any] = field(default_factory=dict)
    # Live runner
    url: str = "http://127.0.0.1:8000"
    model: str = ""
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 60.0
    max_concurrency: int = 4096
    ignore_eos: bool = False
    progress: bool = False

    def with_rate(self, rate: float) -> RunConfig:
        return replace(self, rate=rate)


def load_workload(config: RunConfig, stats: ReadStats | None = None) -> list[TraceRequest]:
    """The requests of ``config``, sorted by arrival, first arrival at 0 (see ``RunConfig``)."""
    if config.trace_format not in WORKLOAD_FORMATS:
        raise ValueError(
            f"unknown trace format {config.trace_format!r}; choose from {WORKLOAD_FORMATS}"
        )
    if config.trace_format == "synthetic":
        name = config.trace or "multiturn"
        if name not in SYNTHETIC_WORKLOADS:
            raise ValueError(f"unknown synthetic workload {name!r}; "
                             f"choose from {sorted(SYNTHETIC_WORKLOADS)}")
        count = config.max_requests or DEFAULT_SYNTHETIC_REQUESTS
        rate = config.rate or DEFAULT_SYNTHETIC_RATE
        requests = build_synthetic(name, count, rate, config.seed, config.cv,
                                   config.workload_params)
    else:
        if not config.trace:
            raise ValueError(f"--trace is required for trace format {config.trace_format!r}")
        source = read_trace(config.trace, config.trace_format,
                            skip_bad_lines=config.skip_bad_lines, stats=stats, seed=config.seed)
        requests = list(itertools.islice(source, config.max_requests))
        if not requests:
            raise ValueError(f"{config.trace}: no requests")
        requests.sort(key=lambda r: r.arrival_s)
        if config.max_requests is not None and len(requests) < config.max_requests:
            requests = _replay(requests, config.max_requests)
        if config.rate is not None:
            times = scale_to_rate([r.arrival_s for r in requests], config.rate)
            requests = [r.with_arrival(float(t)) for r, t in zip(requests, times, strict=True)]
    start = requests[0].arrival_s if requests else 0.0
    requests = [r.with_arrival(r.arrival_s - start) for r in requests]
    if config.max_seconds is not None:
        requests = [r for r in requests if r.arrival_s <= config.max_seconds]
    return requests


def _replay(requests: list[TraceRequest], count: int) -> list[TraceRequest]:
    """Repeat a trace until it has ``count`` requests; pass p starts one mean gap after pass
    p-1 ended, and its segment keys are re-derived from p so passes share no prefixes."""
    first = requests[0].arrival_s
    span = requests[-1].arrival_s - first
    gap = 1.0 / mean_rate([r.arrival_s for r in requests]) if len(requests) > 1 else 1.0
    if not math.isfinite(gap):
        gap = 0.0
    out = list(requests)
    for index in range(len(requests), count):
        cycle, position = divmod(index, len(requests))
        original = requests[position]
        offset = cycle * (span + gap)
        segments = tuple(
            Segment(segment_key("replay", cycle, s.key), s.length) for s in original.segments
        )
        out.append(TraceRequest(
            request_id=f"{original.request_id}-r{cycle}",
            arrival_s=original.arrival_s + offset,
            prompt_len=original.prompt_len,
            output_len=original.output_len,
            segments=segments,
            prompt_token_ids=original.prompt_token_ids,
            session_id=None if original.session_id is None else f"{original.session_id}-r{cycle}",
            turn=original.turn,
            group=original.group,
            hash_ids=original.hash_ids,
            seed=original.seed,
        ))
    return out


def warmup_count(config: RunConfig, total: int) -> int:
    """Requests excluded from statistics at the start of a run."""
    return int(np.floor(total * max(0.0, min(config.warmup_fraction, 0.9))))
