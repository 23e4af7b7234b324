"""Effective capacity: the highest request rate at which >= 90 % of requests meet the TTFT SLO.

``find_capacity`` searches over rate for any attainment function (bracketing by doubling or
halving, then bisection); ``capacity_for_policy`` plugs in the simulator, and
``ideal_bound_rps`` gives the throughput limit every policy is judged against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from instances.engine.factory import load_profile
from instances.engine.profile import prefill_attention_pairs
from loadgen.arrivals import scale_to_rate
from loadgen.config import RunConfig, load_workload
from loadgen.request import PrefixOracle, TraceRequest
from loadgen.sim import (
    EngineFactory,
    PolicyFactory,
    default_engine_factory,
    default_policy_factory,
    run_sim,
)

DEFAULT_TARGET = 0.9


@dataclass
class CapacitySearch:
    """Result of a capacity search: ``capacity_rps`` is the highest rate probed whose
    attainment met the target (0.0 when even ``min_rate`` failed); ``upper_rps`` the lowest
    rate probed that failed (inf if none did before ``max_rate``)."""

    capacity_rps: float
    upper_rps: float
    probes: list[tuple[float, float]] = field(default_factory=list)


def find_capacity(
    attainment_at: Callable[[float], float],
    *,
    initial_rate: float,
    target: float = DEFAULT_TARGET,
    rel_tol: float = 0.03,
    min_rate: float = 1e-3,
    max_rate: float = 1e6,
    max_probes: int = 30,
    growth: float = 2.0,
) -> CapacitySearch:
    """Find the largest rate with ``attainment_at(rate) >= target``.

    Assumes attainment does not increase with rate. Starting from ``initial_rate`` it
    multiplies (or divides) by ``growth`` (2: doubling; smaller when the initial rate is a
    good guess, e.g. another policy's capacity) until the target is bracketed, then bisects
    until the bracket
    ``[capacity, upper]`` is narrower than ``rel_tol * capacity`` or ``max_probes`` ran out.
    A probe that contradicts monotonicity (a higher rate passing after a lower one failed)
    cannot happen inside the bracket logic: the bracket only narrows.
    """
    if initial_rate <= 0:
        raise ValueError("initial_rate must be positive")
    if growth <= 1.0:
        raise ValueError("growth must be > 1")
    probes: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        value = attainment_at(rate)
        probes.append((rate, value))
        return value >= target

    lo, hi = 0.0, math.inf
    rate = min(max(initial_rate, min_rate), max_rate)
    if passes(rate):
        lo = rate
        while len(probes) < max_probes and lo < max_rate:
            rate = min(lo * growth, max_rate)
            if passes(rate):
                lo = rate
            else:
                hi = rate
                break
    else:
        hi = rate
        while len(probes) < max_probes and hi > min_rate:
            rate = max(hi / growth, min_rate)
            if passes(rate):
                lo = rate
                break
            hi = rate
    if lo == 0.0 or math.isinf(hi):
        return CapacitySearch(lo, hi, probes)
    while len(probes) < max_probes and hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2.0
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return CapacitySearch(lo, hi, probes)


def ideal_bound_rps(
    requests: Sequence[TraceRequest],
    instances: int,
    profile_name: str,
    *,
    block_size: int = 16,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
) -> dict[str, float]:
    """Throughput of an oracle cluster: one infinite prefix cache shared by all instances and
    perfect balance, on the iteration-time model of ``profile_name``.

    Each request costs device time ``W`` (see ``instances.engine.profile``): its prompt
    tokens not already cached by an earlier request (``shared_prefix_tokens`` in arrival
    order, at ``block_size`` granularity) at ``prefill_s_per_token`` plus their attention
    over the whole prefix, then ``output_len - 1`` decode iterations at ``decode_s_per_seq``
    plus the decode attention over the growing context; the iteration floor is shared by a
    full batch (``max_num_seqs`` decoding sequences, ``max_num_batched_tokens`` prefill
    tokens). KV capacity never limits the batch. ``instances`` perfectly balanced instances
    then serve ``instances / mean(W)`` requests per second; no schedule can do better, so it
    is an upper bound for every policy (queueing makes real TTFTs longer).
    """
    profile = load_profile(profile_name)
    total_prompt = sum(r.prompt_len for r in requests)
    per_request_hits = _per_request_hits(requests, block_size)
    hits = sum(per_request_hits)
    total_w = 0.0
    for request, cached in zip(requests, per_request_hits, strict=True):
        cached = min(cached, request.prompt_len - 1)  # the last token is always computed
        uncached = request.prompt_len - cached
        decode_iters = max(0, request.output_len - 1)
        mean_context = request.prompt_len + (request.output_len / 2.0)
        total_w += (
            profile.prefill_s_per_token * uncached
            + profile.prefill_attn_s_per_ktoken * prefill_attention_pairs(cached, uncached) / 1e3
            + profile.iteration_floor_s * uncached / max_num_batched_tokens
            + decode_iters * (
                profile.decode_s_per_seq
                + profile.decode_attn_s_per_ktoken * mean_context / 1e3
                + profile.iteration_floor_s / max_num_seqs
            )
        )
    mean_w = total_w / len(requests) if requests else math.inf
    return {
        "ideal_bound_rps": instances / mean_w if mean_w > 0 else math.inf,
        "ideal_cache_hit_rate": hits / total_prompt if total_prompt else 0.0,
        "ideal_device_s_per_request": mean_w,
    }


def _per_request_hits(requests: Sequence[TraceRequest], block_size: int) -> list[int]:
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    hits = [0] * len(requests)
    oracle = PrefixOracle(block_size)
    for index in order:
        hits[index] = oracle.observe(requests[index])
    return hits


def capacity_for_policy(
    config: RunConfig,
    *,
    requests: Sequence[TraceRequest] | None = None,
    initial_rate: float,
    target: float = DEFAULT_TARGET,
    rel_tol: float = 0.03,
    max_probes: int = 12,
    engine_factory: EngineFactory = default_engine_factory,
    policy_factory: PolicyFactory = default_policy_factory,
    on_probe: Callable[[float, dict[str, Any]], None] | None = None,
    growth: float = 2.0,
    max_rate: float = 1e6,
) -> tuple[CapacitySearch, dict[str, Any] | None]:
    """Capacity of ``config.policy`` by simulation; also returns the full sim summary at the
    capacity rate (None if no rate passed). The workload (``requests``, else the config's,
    generated or read once at ``config.rate``) is re-timed to each probed rate, so the probed
    rate is the true mean rate and the workload's shape (bursts, session structure) is kept;
    a synthetic workload should be built at a rate where it is in steady state (its span much
    longer than one session). ``config.warmup_fraction`` of it is excluded."""
    base = list(requests) if requests is not None else load_workload(config)
    summaries: dict[float, dict[str, Any]] = {}

    def attainment_at(rate: float) -> float:
        retimed = retime(base, rate)
        summary = run_sim(
            replace(config, rate=rate), requests=retimed, engine_factory=engine_factory,
            policy_factory=policy_factory, early_stop_attainment=target,
        )
        summaries[rate] = summary
        if on_probe is not None:
            on_probe(rate, summary)
        value = summary["slo_attainment"]
        return 0.0 if value is None or summary["early_stopped"] else float(value)

    search = find_capacity(attainment_at, initial_rate=initial_rate, target=target,
                           rel_tol=rel_tol, max_probes=max_probes, growth=growth,
                           max_rate=max_rate)
    return search, summaries.get(search.capacity_rps)


def retime(requests: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """``requests`` with their arrivals scaled to mean ``rate`` (shape kept)."""
    times = scale_to_rate([r.arrival_s for r in requests], rate)
    return [r.with_arrival(float(t)) for r, t in zip(requests, times, strict=True)]
