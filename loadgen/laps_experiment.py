"""``llmfleet sim laps`` and ``llmfleet sim rebalance``: the admission experiments.

``sim laps`` measures, in one command, the effective capacity (>= ``target`` of TTFTs within
the SLO) of each policy x admission mode on each workload, with the ideal bound of each
workload, the short-request TTFT p99 at 80 % of each policy's no-admission capacity, and the
attainment past capacity (the cliff). ``sim rebalance`` compares DualMap with rebalancing of
queued requests on and off on a skewed (Zipf) prefix workload.

Workloads:

* ``long_tailed`` — multi-turn chat built with ``loadgen.workloads.multi_turn``: 95 % of the
  traffic chat sessions (1-12 turns, user messages lognormal mean 2,000 tokens), 5 %
  document sessions (1-4 turns, mean 40,000-token messages); prompt tokens p50 ≈ 8.7k,
  p90 ≈ 28k, p99 ≈ 96k (the shape of the long-tailed conversation trace in issue 10).
* ``mooncake`` — ``shared/traces/synthetic_trace.jsonl``.
* ``azure_conv`` — ``shared/traces/AzureLLMInferenceTrace_conv.csv``.

Every capacity search re-times one fixed request list per workload (``capacity_for_policy``).
Runs are sized for steady state: each probe's arrivals span several E2E p90s at capacity
rates (``DEFAULT_REQUESTS``; ``span_over_e2e_p90`` in the result says how many), the first
``warmup_fraction`` of them is left out of the statistics, and searches never go past the
ideal bound. Searches step by ``growth`` (10 %) from a start (``SEARCH_START`` for the
no-admission search, that capacity for the admission modes), then bisect to ``rel_tol``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadgen.capacity import capacity_for_policy, ideal_bound_rps, retime
from loadgen.config import RunConfig, load_workload
from loadgen.request import TraceRequest
from loadgen.sim import SHORT_UNCACHED_TOKENS, run_sim
from loadgen.workloads import build_synthetic
from router.admission import Release

ADMISSIONS = ("none", "laps", "laps-spatial")
# Requests per probe, per workload, sized so that at capacity rates the arrivals span several
# E2E p90s (E2E p90 is ~40 s on long_tailed, ~10 s on azure_conv at capacity): long_tailed
# 6,000 (~200-300 s of arrivals), the whole Mooncake trace (3,993) and 12,000 Azure requests
# (~45 s at its ~296 req/s bound). A probe costs ~5-7 ms of CPU per request.
DEFAULT_REQUESTS = {"long_tailed": 6000, "mooncake": 3993, "azure_conv": 12000}
LAPS_POLICIES = ("dualmap", "least_loaded", "cache_aware")
# Where each no-admission search starts, as a fraction of the workload's ideal bound (near
# the capacities of the transient runs, docs/results/laps-transient.json, a little below:
# longer runs sustain less). Only the cost of a search depends on it: it steps by ``growth``
# from there until it brackets the capacity.
SEARCH_START: dict[str, dict[str, float]] = {
    "long_tailed": {"dualmap": 0.85, "least_loaded": 0.55, "cache_aware": 0.5},
    "mooncake": {"dualmap": 0.5, "least_loaded": 0.3, "cache_aware": 0.4},
    "azure_conv": {"dualmap": 0.9, "least_loaded": 0.9, "cache_aware": 0.9},
}
DEFAULT_SEARCH_START = 0.6
# A run counts as steady state when its arrivals span at least this many E2E p90s.
STEADY_SPAN_OVER_E2E_P90 = 8.0
# Leading share of each run left out of the statistics: about one E2E p90 at these sizes.
WARMUP_FRACTION = 0.2
_REPO = Path(__file__).resolve().parent.parent
# The shared traces live next to the checkout (``../shared/traces``) or inside it.
TRACES = next((p for p in (_REPO / "shared" / "traces", _REPO.parent / "shared" / "traces")
               if p.is_dir()), _REPO / "shared" / "traces")

# The long-tailed workload: chat sessions plus a small share of document sessions.
CHAT_PARAMS: dict[str, Any] = {
    "user_len_mean": 2000, "user_len_sigma": 1.3, "turns_min": 1, "turns_max": 12,
    "max_prompt_len": 120_000, "output_len_mean": 300, "system_prompt_len": 1024,
}
DOC_PARAMS: dict[str, Any] = {
    "user_len_mean": 40_000, "user_len_sigma": 0.5, "turns_min": 1, "turns_max": 4,
    "max_prompt_len": 120_000, "output_len_mean": 300, "system_prompt_len": 1024,
    "think_time_mean_s": 30.0,
}
DOC_SHARE = 0.05
# Generated at this rate (req/s) so sessions (~90 s) are short next to the span, then
# re-timed to each probed rate.
BUILD_RATE = 4.0


def long_tailed_workload(count: int, seed: int = 0) -> list[TraceRequest]:
    """``count`` requests of the long-tailed multi-turn workload (see the module docstring),
    sorted by arrival, cut to the span both parts cover."""
    docs = max(1, round(count * DOC_SHARE))
    chat = build_synthetic("multiturn", count - docs, BUILD_RATE * (1 - DOC_SHARE), seed,
                           params=CHAT_PARAMS)
    # Twice the documents' share, cut to the chat span: the few document sessions' span
    # varies a lot, and they must cover the whole run.
    doc = build_synthetic("multiturn", 2 * docs, BUILD_RATE * DOC_SHARE, seed + 1,
                          params=DOC_PARAMS)
    end = chat[-1].arrival_s
    doc = [r.with_arrival(r.arrival_s, f"doc-{r.request_id}") for r in doc
           if r.arrival_s <= end]
    return sorted(chat + doc, key=lambda r: (r.arrival_s, r.request_id))


def workload_requests(name: str, count: int, seed: int = 0,
                      traces: Path = TRACES) -> tuple[list[TraceRequest], dict[str, Any]]:
    """The requests of workload ``name`` and how they were made (for the JSON)."""
    if name == "long_tailed":
        requests = long_tailed_workload(count, seed)
        return requests, {"workload": name, "chat": CHAT_PARAMS, "docs": DOC_PARAMS,
                          "doc_share": DOC_SHARE, "build_rate": BUILD_RATE}
    files = {"mooncake": ("synthetic_trace.jsonl", "mooncake"),
             "azure_conv": ("AzureLLMInferenceTrace_conv.csv", "azure")}
    if name not in files:
        raise ValueError(f"unknown workload {name!r}")
    file, fmt = files[name]
    path = traces / file
    config = RunConfig(trace=str(path), trace_format=fmt, max_requests=count, seed=seed)
    return load_workload(config), {"workload": name, "trace": str(path), "format": fmt}


def prompt_shape(requests: Sequence[TraceRequest]) -> dict[str, float]:
    import numpy as np

    lengths = np.array([r.prompt_len for r in requests], dtype=float)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"prompt_p50": float(p50), "prompt_p90": float(p90), "prompt_p99": float(p99),
            "prompt_mean": float(lengths.mean()),
            "output_mean": float(np.mean([r.output_len for r in requests]))}


_KEEP = ("slo_attainment", "ttft_p50", "ttft_p90", "ttft_p99", "ttft_p99_short",
         "ttft_p99_long", "short_requests", "cache_hit_rate", "load_imbalance",
         "throughput_rps", "decisions", "admission_counters")


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in _KEEP}


def workload_bound(requests: Sequence[TraceRequest], base: RunConfig) -> dict[str, Any]:
    """The workload's shape and ideal bound (on ``base``'s fleet and engine)."""
    from instances.engine.config import EngineConfig

    engine = EngineConfig(**base.engine_params)
    bound = ideal_bound_rps(requests, base.instances, base.profile, block_size=engine.block_size,
                            max_num_seqs=engine.max_num_seqs,
                            max_num_batched_tokens=engine.max_num_batched_tokens)
    return {"requests": len(requests), **prompt_shape(requests),
            "ideal_bound_rps": round(bound["ideal_bound_rps"], 4),
            "ideal_cache_hit_rate": round(bound["ideal_cache_hit_rate"], 4)}


def measure_policy(
    name: str,
    count: int,
    policy: str,
    base: RunConfig,
    admissions: Sequence[str],
    *,
    ideal: float,
    target: float,
    rel_tol: float,
    max_probes: int,
    cliff_factors: Sequence[float],
    start_fraction: float = DEFAULT_SEARCH_START,
    growth: float = 1.1,
    traces: Path = TRACES,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    entry: dict[str, Any] | None = None,
    phases: Sequence[str] = ("search", "at80", "cliff"),
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One policy on workload ``name``: its capacity with each admission mode (phase
    ``search``), then at 80 % of its no-admission capacity the short-request TTFTs
    (``at80``), and its attainment at ``cliff_factors`` x that capacity (``cliff``), with
    each admission mode. A self-contained job (it rebuilds the workload), so jobs can run in
    separate processes; ``phases`` and ``entry`` (an earlier call's result, completed in
    place) let a caller run the phases at different times; ``on_update`` (in-process runs)
    gets the entry after each search or run, for partial results. ``admissions`` are
    labels: a label named in ``variants`` runs with those ``RunConfig`` overrides (e.g.
    ``{"laps_goodput": {"admission": "laps", "admission_params": {"order": "goodput"}}}``),
    any other is an admission mode; ``none`` is the reference."""
    requests, _ = workload_requests(name, count, base.seed, traces)
    entry = {} if entry is None else entry

    def configured(label: str) -> RunConfig:
        overrides = (variants or {}).get(label, {"admission": label})
        return replace(base, policy=policy, **overrides)

    def log(message: str) -> None:
        print(f"[laps {time.strftime('%H:%M:%S')}] {name} {policy}: {message}",
              file=sys.stderr, flush=True)

    def update() -> None:
        if on_update is not None:
            on_update(entry)

    # Parts already in ``entry`` (a resumed run) are kept; a search that found nothing is
    # run again.
    for admission in admissions if "search" in phases else ():
        if (entry.get(admission) or {}).get("effective_capacity_rps"):
            continue
        config = configured(admission)
        probes: list[dict[str, Any]] = []

        def on_probe(rate: float, summary: dict[str, Any],
                     probes: list[dict[str, Any]] = probes, admission: str = admission) -> None:
            probes.append({"rate": round(rate, 4),
                           "slo_attainment": summary.get("slo_attainment"),
                           "early_stopped": summary.get("early_stopped"),
                           "wall_seconds": summary.get("wall_seconds")})
            log(f"{admission} probe {rate:.2f} req/s: attainment "
                f"{summary.get('slo_attainment')} early_stopped {summary.get('early_stopped')} "
                f"({summary.get('wall_seconds', 0):.0f} s)")

        # The no-admission search starts at ``start_fraction`` of the bound; the admission
        # modes at the no-admission capacity (they land near it); all step by ``growth``
        # until bracketed, then bisect to rel_tol.
        reference = (entry.get("none") or {}).get("effective_capacity_rps") or 0.0
        initial = reference if reference > 0 else start_fraction * ideal
        # Never past the ideal bound: a capacity above it can only be a transient of a run
        # too short for its rate.
        search, at_capacity = capacity_for_policy(
            config, requests=requests, initial_rate=min(initial, ideal), target=target,
            rel_tol=rel_tol, max_probes=max_probes, on_probe=on_probe, growth=growth,
            max_rate=ideal)
        e2e = None if at_capacity is None else at_capacity.get("e2e_p90")
        span = (len(requests) - 1) / search.capacity_rps if search.capacity_rps > 0 else None
        entry[admission] = {
            "effective_capacity_rps": round(search.capacity_rps, 4),
            "failed_at_rps": None if search.upper_rps == float("inf")
            else round(search.upper_rps, 4),
            "fraction_of_ideal": round(search.capacity_rps / ideal, 4) if ideal else None,
            # Steady state needs arrivals spanning many request lifetimes; short runs
            # over-state capacity (a capacity above the ideal bound shows it).
            "span_s": None if span is None else round(span, 1),
            "span_over_e2e_p90": round(span / e2e, 2) if e2e and span else None,
            "measured_span_over_e2e_p90": round((1 - base.warmup_fraction) * span / e2e, 2)
            if e2e and span else None,
            "exceeds_ideal_bound": search.capacity_rps > ideal,
            **({} if at_capacity is None else _row(at_capacity)),
            "probes": probes,
        }
        log(f"{admission} capacity {search.capacity_rps:.2f} req/s (failed at "
            f"{search.upper_rps:.2f}), span/E2E p90 {entry[admission]['span_over_e2e_p90']}")
        update()
    reference = (entry.get("none") or {}).get("effective_capacity_rps") or 0.0
    entry["reference_rps"] = reference
    entry.setdefault("at_80pct", {})
    entry.setdefault("cliff", {})
    for admission in admissions if reference > 0 and "at80" in phases else ():
        if admission in entry["at_80pct"]:
            continue
        config = configured(admission)
        rate = 0.8 * reference
        summary = run_sim(replace(config, rate=rate), requests=retime(requests, rate))
        entry["at_80pct"][admission] = {"rate": round(rate, 4), **_row(summary)}
        log(f"{admission} at 80 % ({rate:.2f} req/s): short TTFT p99 "
            f"{summary.get('ttft_p99_short')} ({summary.get('wall_seconds', 0):.0f} s)")
        update()
    for admission in admissions if reference > 0 and cliff_factors and "cliff" in phases \
            else ():
        if admission in entry["cliff"]:
            continue
        config = configured(admission)
        cliff = []
        for factor in cliff_factors:
            rate = factor * reference
            summary = run_sim(replace(config, rate=rate), requests=retime(requests, rate))
            cliff.append({"factor": factor, "rate": round(rate, 4),
                          "slo_attainment": summary.get("slo_attainment"),
                          "ttft_p50": summary.get("ttft_p50"),
                          "ttft_p90": summary.get("ttft_p90"),
                          "ttft_p99_short": summary.get("ttft_p99_short"),
                          "cache_hit_rate": summary.get("cache_hit_rate"),
                          "admission_counters": summary.get("admission_counters")})
            log(f"{admission} at {factor}x ({rate:.2f} req/s): attainment "
                f"{summary.get('slo_attainment')} ({summary.get('wall_seconds', 0):.0f} s)")
        entry["cliff"][admission] = cliff
        update()
    return entry


# The goodput experiment's variants (``run_goodput_experiment``): LAPS's arrival order with
# its hard bound at the SLO against the SLO-aware order, with DualMap's rebalancing as
# ``--admission laps`` runs it (``auto``: on) and off.
GOODPUT_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"admission": "none"},
    "laps": {"admission": "laps", "admission_params": {"order": "fifo"}},
    # Deferred requests released for room up to the room's whole budget (16,384 tokens)...
    "laps_goodput": {"admission": "laps", "admission_params": {
        "order": "goodput", "deferred_budget_tokens": 16384}},
    "laps_goodput_no_rebalance": {"admission": "laps", "admission_params": {
        "order": "goodput", "deferred_budget_tokens": 16384}, "rebalance": False},
    "laps_no_rebalance": {"admission": "laps", "admission_params": {"order": "fifo"},
                          "rebalance": False},
    # Diagnostic (cliff only): deferral without a bound (what the bound costs under
    # sustained overload).
    "laps_goodput_unbounded_no_rebalance": {
        "admission": "laps", "admission_params": {"order": "goodput", "defer_max_s": 1e9,
                                                  "deferred_budget_tokens": 16384},
        "rebalance": False},
    # Diagnostic (cliff only): deferred requests released only on an instance with no
    # prefill in flight (what their blocking of later on-time requests in the engine costs).
    "laps_goodput_idle_no_rebalance": {
        "admission": "laps", "admission_params": {"order": "goodput",
                                                  "deferred_budget_tokens": 1},
        "rebalance": False},
    # ... and only below one engine iteration (8,192 tokens) of prefill in flight: the
    # default since this run (admission_defaults).
    "laps_goodput_defer8k_no_rebalance": {
        "admission": "laps", "admission_params": {"order": "goodput",
                                                  "deferred_budget_tokens": 8192},
        "rebalance": False},
    "laps_goodput_defer8k": {
        "admission": "laps", "admission_params": {"order": "goodput",
                                                  "deferred_budget_tokens": 8192}},
    "laps-spatial": {"admission": "laps-spatial", "admission_params": {"order": "fifo"}},
    "laps-spatial_goodput": {"admission": "laps-spatial", "admission_params": {
        "order": "goodput", "deferred_budget_tokens": 16384}},
    "laps-spatial_goodput_defer8k": {"admission": "laps-spatial", "admission_params": {
        "order": "goodput", "deferred_budget_tokens": 8192}},
}
GOODPUT_COMMAND = ("python -c \"from loadgen.laps_experiment import run_goodput_experiment; "
                   "run_goodput_experiment('docs/results/laps-goodput.json')\"")


def run_goodput_experiment(
    out: str | Path,
    *,
    workload: str = "long_tailed",
    policy: str = "dualmap",
    variants: Mapping[str, Mapping[str, Any]] = GOODPUT_VARIANTS,
    count: int | None = None,
    instances: int = 16,
    profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0,
    target: float = 0.9,
    rel_tol: float = 0.1,
    max_probes: int = 4,
    cliff_factors: Sequence[float] = (1.1, 1.25),
    diagnostics: Sequence[str] = ("laps_goodput_unbounded_no_rebalance",
                                  "laps_goodput_idle_no_rebalance"),
    seed: int = 0,
    resume: bool = True,
    traces: Path = TRACES,
) -> dict[str, Any]:
    """The goodput (SLO-aware) release order against LAPS's arrival order and no
    admission, side by side on ``sim laps``'s settings and code (``measure_policy``): the
    no-admission capacity, every variant's attainment at ``cliff_factors`` x it, each
    goodput variant's capacity, the short TTFT p99 at 80 % of it, then the plain ``laps``
    variants' capacities. The JSON at ``out`` is rewritten after every search or run; with
    ``resume`` an existing file's finished cells are kept. ``diagnostics`` (labels) run
    the cliff only."""
    wall = time.perf_counter()
    count = count or DEFAULT_REQUESTS[workload]
    path = Path(out)
    requests, source = workload_requests(workload, count, seed, traces)
    base = RunConfig(instances=instances, profile=profile, slo_ttft_s=slo_ttft_s, seed=seed,
                     warmup_fraction=WARMUP_FRACTION, progress=False)
    bound = workload_bound(requests, base)
    result: dict[str, Any] = {
        "command": GOODPUT_COMMAND, "workload": workload, "source": source, "policy": policy,
        "instances": instances, "profile": profile, "slo_ttft_s": slo_ttft_s,
        "target": target, "rel_tol": rel_tol, "max_probes": max_probes,
        "warmup_fraction": WARMUP_FRACTION, "seed": seed,
        "short_uncached_tokens": SHORT_UNCACHED_TOKENS, **bound,
        "variants": {k: dict(v) for k, v in variants.items()}, "complete": False,
        "entry": {},
    }
    if resume and path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("requests") == bound["requests"]:
            result["entry"] = earlier.get("entry", {})

    def save(entry: dict[str, Any]) -> None:
        result["entry"] = entry
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")

    labels = list(variants)
    measured = tuple(v for v in labels if v not in diagnostics)
    goodput = tuple(v for v in measured if "goodput" in v)
    plain = tuple(v for v in measured if v != "none" and v not in goodput)
    steps: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("none",), ("search",)), (tuple(labels), ("cliff",)), (goodput, ("search",)),
        (measured, ("at80",)), (plain, ("search",))]
    args: dict[str, Any] = {
        "ideal": bound["ideal_bound_rps"], "target": target, "rel_tol": rel_tol,
        "max_probes": max_probes, "cliff_factors": cliff_factors, "traces": traces,
        "start_fraction": SEARCH_START.get(workload, {}).get(policy, DEFAULT_SEARCH_START),
        "variants": variants}
    entry: dict[str, Any] = result["entry"]
    for modes, phases in steps:
        entry = measure_policy(workload, count, policy, base, modes, on_update=save,
                               entry=entry, phases=phases, **args)
        save(entry)
    result["complete"] = True
    save(entry)
    return result


def goal_check(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goal on the long-tailed workload: DualMap with admission >= 0.9 x the
    ideal bound and >= 1.2 x the best baseline policy (not DualMap) without admission;
    DualMap's own no-admission capacity is given beside it."""
    workload = result["workloads"].get("long_tailed")
    if not workload:
        return {}
    ideal = workload["ideal_bound_rps"]
    policies = workload["policies"]
    dualmap = policies.get("dualmap", {})
    best_admitted = max(((dualmap.get(a) or {}).get("effective_capacity_rps") or 0.0)
                        for a in ADMISSIONS if a != "none")
    baselines = {p: (e.get("none") or {}).get("effective_capacity_rps") or 0.0
                 for p, e in policies.items() if not p.startswith("dualmap")}
    best_baseline = max(baselines.values(), default=0.0)
    spans = [float((e.get(a) or {}).get("span_over_e2e_p90") or 0.0)
             for e in policies.values() for a in ADMISSIONS if a in e]
    return {
        "dualmap_best_admission_rps": best_admitted,
        "dualmap_without_admission_rps": (dualmap.get("none") or {}).get(
            "effective_capacity_rps"),
        "fraction_of_ideal": round(best_admitted / ideal, 4) if ideal else None,
        "best_baseline_without_admission": max(baselines, key=lambda p: baselines[p])
        if baselines else None,
        "best_baseline_without_admission_rps": best_baseline,
        "ratio_to_best_baseline_without_admission": round(best_admitted / best_baseline, 4)
        if best_baseline else None,
        "meets_0_9_ideal": bool(ideal and best_admitted >= 0.9 * ideal),
        "meets_1_2_baseline": bool(best_baseline and best_admitted >= 1.2 * best_baseline),
        "min_span_over_e2e_p90": min(spans, default=None),
        "steady_state": bool(spans) and min(spans) >= STEADY_SPAN_OVER_E2E_P90,
        "cliff": {a: [c["slo_attainment"] for c in cliff]
                  for a, cliff in dualmap.get("cliff", {}).items()},
    }


def job_order(workloads: Sequence[str], policies: Sequence[str]) -> list[tuple[str, str]]:
    """The order jobs run in: the first workload (where the issue's goal is) with every
    policy, then DualMap on each other workload, then the other policies on each: with one
    job at a time, a run cut short still has the goal and DualMap everywhere."""
    first, rest = list(workloads[:1]), list(workloads[1:])
    order = [(w, p) for w in first for p in policies]
    for policy in sorted(policies, key=lambda p: p != "dualmap"):
        order += [(w, policy) for w in rest]
    return order


Step = tuple[str, str, tuple[str, ...], tuple[str, ...]]


def plan_steps(order: Sequence[tuple[str, str]], admissions: Sequence[str]) -> list[Step]:
    """What an in-process run does, most important first, as (workload, policy, admission
    modes, phases): on the first workload DualMap's searches with every mode and the other
    policies' no-admission searches (the goal check), the 80 % runs of those, DualMap's
    cliffs, then the other policies' admission modes; then each further job of ``order``
    the same way (DualMap, then the other policies without, then with admission). A run cut
    short keeps the cells that matter most."""
    modes = tuple(admissions)
    rest = tuple(a for a in modes if a != "none")
    plain = tuple(a for a in modes if a == "none")
    first = [job for job in order if job[0] == order[0][0]]
    later = [job for job in order if job[0] != order[0][0]]
    steps: list[Step] = []
    for group in (first, later):
        main = [(w, p) for w, p in group if p == "dualmap"]
        others = [(w, p) for w, p in group if p != "dualmap"]
        steps += [(w, p, modes, ("search",)) for w, p in main]
        steps += [(w, p, plain, ("search",)) for w, p in others if plain]
        steps += [(w, p, modes, ("at80",)) for w, p in main]
        steps += [(w, p, plain, ("at80",)) for w, p in others if plain]
        steps += [(w, p, modes, ("cliff",)) for w, p in main]
        steps += [(w, p, rest, ("search", "at80")) for w, p in others if rest]
        steps += [(w, p, plain, ("cliff",)) for w, p in others if plain]
        steps += [(w, p, rest, ("cliff",)) for w, p in others if rest]
    return steps


def run_laps_experiment(
    *,
    workloads: Sequence[str] = ("long_tailed", "mooncake", "azure_conv"),
    policies: Sequence[str] = LAPS_POLICIES,
    admissions: Sequence[str] = ADMISSIONS,
    requests_per_workload: int | Mapping[str, int] | None = None,
    instances: int = 16,
    profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0,
    target: float = 0.9,
    rel_tol: float = 0.1,
    max_probes: int = 4,
    growth: float = 1.1,
    warmup_fraction: float = WARMUP_FRACTION,
    cliff_factors: Sequence[float] = (1.1, 1.25),
    cliff_workloads: Sequence[str] = ("long_tailed",),
    cliff_policies: Sequence[str] = ("dualmap",),
    seed: int = 0,
    jobs: int = 1,
    progress: bool = True,
    traces: Path = TRACES,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``docs/results/laps.json`` result (see the module docstring). ``resume``: an
    earlier (partial) result of the same settings; its finished searches and runs are kept
    and only the rest is run (in-process runs only). One job per
    workload x policy in ``job_order``; with ``jobs`` > 1 that many at a time in separate
    processes, else in this process, with ``on_progress`` after every search and run (so an
    interrupted run leaves its finished cells). Results do not depend on ``jobs``: every job
    is deterministic. ``requests_per_workload``: one count for all, or per workload (missing
    ones take ``DEFAULT_REQUESTS``)."""
    from concurrent.futures import Future, ProcessPoolExecutor, as_completed

    wall = time.perf_counter()
    base = RunConfig(instances=instances, profile=profile, slo_ttft_s=slo_ttft_s, seed=seed,
                     warmup_fraction=warmup_fraction, progress=False)
    result: dict[str, Any] = {
        "instances": instances, "profile": profile, "slo_ttft_s": slo_ttft_s,
        "target": target, "rel_tol": rel_tol, "max_probes": max_probes, "growth": growth,
        "warmup_fraction": warmup_fraction, "seed": seed,
        "short_uncached_tokens": SHORT_UNCACHED_TOKENS, "complete": False, "workloads": {},
    }
    if isinstance(requests_per_workload, int):
        counts = {name: requests_per_workload for name in workloads}
    else:
        counts = {name: (requests_per_workload or {}).get(name, DEFAULT_REQUESTS[name])
                  for name in workloads}
    for name in workloads:
        requests, source = workload_requests(name, counts[name], seed, traces)
        result["workloads"][name] = {"source": source, **workload_bound(requests, base),
                                     "policies": {}}
        if resume is not None and jobs <= 1:
            earlier = resume.get("workloads", {}).get(name, {})
            if earlier.get("requests") == result["workloads"][name]["requests"]:
                result["workloads"][name]["policies"] = json.loads(
                    json.dumps(earlier.get("policies", {})))
    order = job_order(workloads, policies)

    def job_args(name: str, policy: str) -> dict[str, Any]:
        return {"ideal": result["workloads"][name]["ideal_bound_rps"], "target": target,
                "rel_tol": rel_tol, "max_probes": max_probes, "growth": growth,
                "start_fraction": SEARCH_START.get(name, {}).get(policy, DEFAULT_SEARCH_START),
                "cliff_factors": cliff_factors
                if name in cliff_workloads and policy in cliff_policies else (),
                "traces": traces}

    def finish_partial() -> None:
        result["goal"] = goal_check(result)
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        if on_progress is not None:
            on_progress(result)

    steps = plan_steps(order, admissions)
    with tqdm(total=len(steps) if jobs <= 1 else len(order), desc="laps", unit="step",
              file=sys.stderr, disable=not progress) as bar:
        if jobs <= 1:
            for name, policy, modes, phases in steps:
                slot = result["workloads"][name]["policies"]

                def on_update(entry: dict[str, Any], slot: dict[str, Any] = slot,
                              policy: str = policy) -> None:
                    slot[policy] = entry
                    finish_partial()

                args = job_args(name, policy)
                if phases == ("cliff",) and not args["cliff_factors"]:
                    bar.update(1)
                    continue
                slot[policy] = measure_policy(name, counts[name], policy, base, modes,
                                              on_update=on_update, entry=slot.get(policy),
                                              phases=phases, **args)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures: dict[Future[dict[str, Any]], tuple[str, str]] = {
                    pool.submit(measure_policy, name, counts[name], policy, base, admissions,
                                **job_args(name, policy)): (name, policy)
                    for name, policy in order}
                for future in as_completed(futures):
                    name, policy = futures[future]
                    result["workloads"][name]["policies"][policy] = future.result()
                    bar.update(1)
                    finish_partial()
    for workload in result["workloads"].values():  # a stable order in the file
        workload["policies"] = {p: workload["policies"][p] for p in policies
                                if p in workload["policies"]}
    result["complete"] = True
    result["goal"] = goal_check(result)
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return result


def plot_laps(result: dict[str, Any], path: str | Path) -> Path:
    """Capacity per policy x admission for each workload (bars, the ideal bound as a line),
    and the long-tailed workload's attainment past capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(5 * (len(names) + 1), 4))
    for ax, name in zip(axes, names, strict=False):
        workload = result["workloads"][name]
        policies = list(workload["policies"])
        width = 0.8 / len(ADMISSIONS)
        for k, admission in enumerate(ADMISSIONS):
            values = [workload["policies"][p].get(admission, {}).get("effective_capacity_rps")
                      or 0.0 for p in policies]
            ax.bar([i + k * width for i in range(len(policies))], values, width,
                   label=admission)
        ax.axhline(workload["ideal_bound_rps"], color="k", ls="--", label="ideal bound")
        ax.set_xticks([i + width for i in range(len(policies))], policies)
        ax.set_title(f"{name}: capacity (req/s)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    focus = result["workloads"].get("long_tailed") or result["workloads"][names[0]]
    for policy, entry in focus["policies"].items():
        for admission, cliff in entry.get("cliff", {}).items():
            ax.plot([c["factor"] for c in cliff], [c["slo_attainment"] or 0 for c in cliff],
                    marker="o", label=f"{policy}/{admission}")
    ax.axhline(result["target"], color="k", ls=":")
    ax.set_xlabel("rate / no-admission capacity")
    ax.set_ylabel("SLO attainment")
    ax.set_title("past capacity (long_tailed)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Zipf-popular 4k-token documents with 2k-token unique questions: prefill work on every
# request, so the ideal bound stays low enough for runs of a few thousand requests to span
# tens of seconds on 8 instances (where the head document is 2x an instance's fair share).
ZIPF_PARAMS: dict[str, Any] = {"zipf_exponent": 1.2, "num_prefixes": 200, "prefix_len": 4096,
                               "suffix_len_mean": 2000.0, "output_len_mean": 256.0}


def _capacity_entry(config: RunConfig, requests: list[TraceRequest], initial_rate: float,
                    *, target: float, rel_tol: float, max_probes: int,
                    max_rate: float) -> dict[str, Any]:
    # Steps of 25 % from the initial rate, never past max_rate (a capacity above the ideal
    # bound can only be a transient: the run was too short at that rate).
    search, at_capacity = capacity_for_policy(config, requests=requests,
                                              initial_rate=initial_rate, target=target,
                                              rel_tol=rel_tol, max_probes=max_probes,
                                              growth=1.25, max_rate=max_rate)
    return {"effective_capacity_rps": round(search.capacity_rps, 4),
            "failed_at_rps": None if search.upper_rps == float("inf")
            else round(search.upper_rps, 4),
            **({} if at_capacity is None else _row(at_capacity)),
            "load_imbalance_tokens": None if at_capacity is None
            else at_capacity.get("load_imbalance_tokens"),
            "request_imbalance": None if at_capacity is None
            else at_capacity.get("request_imbalance")}


def run_rebalance_experiment(
    *,
    requests: int = 2000,
    instances: int = 16,
    zipf_instances: int = 8,
    profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0,
    dualmap_setting_requests: int = 2000,
    target: float = 0.9,
    rel_tol: float = 0.06,
    max_probes: int = 7,
    seed: int = 0,
    progress: bool = True,
    traces: Path = TRACES,
) -> dict[str, Any]:
    """The ``docs/results/rebalance.json`` result.

    ``zipf``: DualMap on the Zipf-prefix workload (s = 1.2), admission ``laps`` with
    rebalancing off and on (and no admission for reference): capacity, and at one common
    rate (80 % of the rebalancing-off capacity) the load imbalance (busy time max/mean) and
    attainment. ``dualmap_setting``: the 910B4 x Qwen2.5-7B profile on the Mooncake trace at
    SLO 5 s, DualMap with admission and rebalancing against cache_aware without."""
    wall = time.perf_counter()
    zipf = build_synthetic("zipf", requests, 8.0, seed, params=ZIPF_PARAMS)
    base = RunConfig(instances=zipf_instances, profile=profile, slo_ttft_s=slo_ttft_s,
                     seed=seed, warmup_fraction=0.1, policy="dualmap")
    bound = ideal_bound_rps(zipf, zipf_instances, profile)["ideal_bound_rps"]
    variants = {
        "none": replace(base, admission="none"),
        "laps_rebalance_off": replace(base, admission="laps", rebalance=False),
        "laps_rebalance_on": replace(base, admission="laps", rebalance=True),
    }
    setting_variants = {
        "cache_aware": "none", "dualmap": "none", "dualmap+laps": "laps",
        "dualmap+laps-spatial": "laps-spatial",
    }
    total = 2 * len(variants) + len(setting_variants)
    result: dict[str, Any] = {"instances": instances, "target": target, "seed": seed,
                              "rel_tol": rel_tol, "max_probes": max_probes}
    with tqdm(total=total, desc="rebalance", unit="run", file=sys.stderr,
              disable=not progress) as bar:
        zipf_out: dict[str, Any] = {
            "workload": {"name": "zipf", **ZIPF_PARAMS, "requests": len(zipf)},
            "profile": profile, "slo_ttft_s": slo_ttft_s, "instances": zipf_instances,
            "ideal_bound_rps": round(bound, 4), "variants": {},
        }
        for name, config in variants.items():
            zipf_out["variants"][name] = _capacity_entry(
                config, zipf, 0.6 * bound, target=target, rel_tol=rel_tol,
                max_probes=max_probes, max_rate=bound)
            bar.update(1)
        common = 0.8 * (zipf_out["variants"]["laps_rebalance_off"]["effective_capacity_rps"]
                        or 0.5 * bound)
        zipf_out["common_rate_rps"] = round(common, 4)
        for name, config in variants.items():
            summary = run_sim(replace(config, rate=common), requests=retime(zipf, common))
            zipf_out["variants"][name]["at_common_rate"] = {
                k: summary.get(k) for k in ("slo_attainment", "ttft_p50", "ttft_p99",
                                            "load_imbalance", "load_imbalance_tokens",
                                            "request_imbalance", "cache_hit_rate",
                                            "admission_counters")}
            bar.update(1)
        result["zipf"] = zipf_out

        setting_profile = "dualmap-910b4-qwen2.5-7b"
        mooncake, source = workload_requests("mooncake", dualmap_setting_requests, seed, traces)
        setting_bound = ideal_bound_rps(mooncake, instances, setting_profile)["ideal_bound_rps"]
        setting = RunConfig(instances=instances, profile=setting_profile, slo_ttft_s=5.0,
                            seed=seed, warmup_fraction=0.1)
        setting_out: dict[str, Any] = {
            "profile": setting_profile, "slo_ttft_s": 5.0, "source": source,
            "requests": len(mooncake), "ideal_bound_rps": round(setting_bound, 4),
            "variants": {},
        }
        for name, admission in setting_variants.items():
            policy = name.split("+")[0]
            setting_out["variants"][name] = _capacity_entry(
                replace(setting, policy=policy, admission=admission), mooncake,
                0.6 * setting_bound, target=target, rel_tol=rel_tol, max_probes=max_probes,
                max_rate=setting_bound)
            bar.update(1)
        ca = setting_out["variants"]["cache_aware"]["effective_capacity_rps"] or 0.0
        best = max(setting_out["variants"][n]["effective_capacity_rps"] or 0.0
                   for n in setting_variants if n.startswith("dualmap+"))
        setting_out["dualmap_admitted_over_cache_aware"] = round(best / ca, 4) if ca else None
        result["dualmap_setting"] = setting_out
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return result


def idle_prefill_s(profile: str, prompt_len: int, cached: int,
                   chunk_tokens: int = 8192) -> float:
    """The TTFT of a prompt on an idle instance of ``profile``: its uncached tokens
    prefilled in chunks of ``chunk_tokens`` (one engine iteration each), nothing else in
    the batch. No policy or admission can serve it faster."""
    from instances.engine.factory import load_profile
    from instances.engine.profile import prefill_attention_pairs

    model = load_profile(profile)
    position, total = min(cached, prompt_len - 1), 0.0
    while position < prompt_len:
        tokens = min(chunk_tokens, prompt_len - position)
        total += model.iteration_time(tokens, prefill_attention_pairs(position, tokens), 0, 0)
        position += tokens
    return total


def ttft_breakdown(
    workload: str = "long_tailed",
    policy: str = "dualmap",
    admissions: Sequence[str] = ADMISSIONS,
    rate: float | None = None,
    *,
    count: int | None = None,
    instances: int = 16,
    profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0,
    warmup_fraction: float = WARMUP_FRACTION,
    seed: int = 0,
    traces: Path = TRACES,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Where the TTFT of each measured request goes, at one rate, per admission mode (and
    per named variant: ``RunConfig`` overrides, e.g. ``{"laps_no_rebalance":
    {"admission": "laps", "rebalance": False}}``): the
    wait in the router's queue (submit to release), the uncached prefill on an idle
    instance (``idle_prefill_s``: the floor), and the rest (waiting and sharing iterations
    inside the engine). For all requests and for the SLO misses: their count, the share of
    long ones (more than ``SHORT_UNCACHED_TOKENS`` uncached), the share whose floor alone
    exceeds the SLO, and the mean of each part. ``rate`` defaults to 0.6 x the ideal bound.
    """
    from loadgen.sim import Simulator, summarize_sim

    requests, _ = workload_requests(workload, count or DEFAULT_REQUESTS[workload], seed, traces)
    base = RunConfig(instances=instances, profile=profile, slo_ttft_s=slo_ttft_s, seed=seed,
                     warmup_fraction=warmup_fraction, progress=False, policy=policy)
    ideal = workload_bound(requests, base)["ideal_bound_rps"]
    rate = rate or 0.6 * ideal
    retimed = retime(requests, rate)
    out: dict[str, Any] = {"workload": workload, "policy": policy, "rate": round(rate, 4),
                           "ideal_bound_rps": ideal, "requests": len(requests), "modes": {}}

    class Recording(Simulator):
        """The simulator, noting when each request left the router's queue."""

        released_at: dict[str, float]

        def _forward(self, releases: list[Release], now: float) -> None:
            for release in releases:
                self.released_at[release.request_id] = now
            super()._forward(releases, now)

    runs: dict[str, Mapping[str, Any]] = {a: {"admission": a} for a in admissions}
    runs.update(variants or {})
    for label, overrides in runs.items():
        config = replace(base, rate=rate, **overrides)
        simulator = Recording(config, retimed)
        simulator.released_at = {}
        result = simulator.run()
        summary = summarize_sim(config, result)
        measured = sorted(result.outcomes, key=lambda o: (o.arrival_s, o.request_id))[
            int(warmup_fraction * len(result.outcomes)):]
        rows = []
        for o in measured:
            if o.ttft_s is None:
                continue
            cached = o.cached_tokens or 0
            router = simulator.released_at.get(o.request_id, o.arrival_s) - o.arrival_s
            floor = idle_prefill_s(profile, o.prompt_len, cached)
            rows.append((o.ttft_s, router, floor, o.ttft_s - router - floor,
                         o.prompt_len - cached))

        def part(selected: list[tuple[float, float, float, float, int]]) -> dict[str, Any]:
            n = len(selected)
            if not n:
                return {"requests": 0}
            return {
                "requests": n,
                "long_share": round(sum(r[4] > SHORT_UNCACHED_TOKENS for r in selected) / n, 4),
                "floor_over_slo_share": round(sum(r[2] > slo_ttft_s for r in selected) / n, 4),
                "ttft_mean_s": round(sum(r[0] for r in selected) / n, 3),
                "router_wait_mean_s": round(sum(r[1] for r in selected) / n, 3),
                "idle_prefill_mean_s": round(sum(r[2] for r in selected) / n, 3),
                "engine_wait_mean_s": round(sum(r[3] for r in selected) / n, 3),
            }

        misses = [r for r in rows if r[0] > slo_ttft_s]
        out["modes"][label] = {
            "slo_attainment": summary["slo_attainment"],
            "ttft_p50": summary["ttft_p50"], "ttft_p90": summary["ttft_p90"],
            "ttft_p99_short": summary["ttft_p99_short"],
            "cache_hit_rate": summary["cache_hit_rate"],
            "all": part(rows), "misses": part(misses),
            "admission_counters": summary["admission_counters"],
        }
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _waits(row: dict[str, Any]) -> str:
    waits = (row.get("admission_counters") or {}).get("wait_s_mean")
    if not waits:
        return "-"
    return f"{_fmt(waits.get('short'))} / {_fmt(waits.get('long'))}"


def laps_tables(result: dict[str, Any]) -> str:
    """Markdown tables of a ``sim laps`` result (``python -m loadgen.laps_experiment``)."""
    lines: list[str] = []
    if result.get("complete") is False:
        lines += ["(partial: the run was stopped before every step had run)", ""]
    for name, workload in result["workloads"].items():
        lines += [f"### {name}: ideal bound {workload['ideal_bound_rps']:.1f} req/s, "
                  f"{workload['requests']} requests, prompt p50/p90/p99 "
                  f"{workload['prompt_p50']:.0f}/{workload['prompt_p90']:.0f}/"
                  f"{workload['prompt_p99']:.0f}", "",
                  "| policy | admission | capacity rps | % of ideal | hit rate | "
                  "TTFT p50 / p90 (s) | router wait short / long (s) | "
                  "short TTFT p99 at 80 % (s) | span / E2E p90 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for policy, entry in workload["policies"].items():
            for admission in ADMISSIONS:
                row = entry.get(admission)
                if row is None:
                    continue
                at80 = entry.get("at_80pct", {}).get(admission, {})
                lines.append(
                    f"| {policy} | {admission} | {_fmt(row['effective_capacity_rps'], 1)} | "
                    f"{_fmt(100 * (row.get('fraction_of_ideal') or 0), 0)}% | "
                    f"{_fmt(row.get('cache_hit_rate'), 3)} | "
                    f"{_fmt(row.get('ttft_p50'))} / {_fmt(row.get('ttft_p90'))} | "
                    f"{_waits(row)} | "
                    f"{_fmt(at80.get('ttft_p99_short'), 3)} | "
                    f"{_fmt(row.get('span_over_e2e_p90'), 1)} |")
        cliffs = [(p, a, c) for p, e in workload["policies"].items()
                  for a, c in e.get("cliff", {}).items()]
        if cliffs:
            factors = [c["factor"] for c in cliffs[0][2]]
            lines += ["", "| policy | admission | " + " | ".join(
                f"attainment at {f}x" for f in factors) + " |",
                "|---|---|" + "---:|" * len(factors)]
            for policy, admission, cliff in cliffs:
                lines.append(f"| {policy} | {admission} | " + " | ".join(
                    _fmt(c["slo_attainment"], 3) for c in cliff) + " |")
        lines.append("")
    if result.get("goal"):
        lines.append(f"goal: {json.dumps(result['goal'])}")
    return "\n".join(lines)


def goodput_table(result: dict[str, Any]) -> str:
    """A markdown table of a ``run_goodput_experiment`` result, one row per variant."""
    entry = result["entry"]
    ideal = result["ideal_bound_rps"]
    factors = [c["factor"] for c in next(iter(entry.get("cliff", {}).values()), [])]
    lines = [
        "| variant | capacity rps (failed at) | × ideal | hit rate | short TTFT p99 at 80 % (s) | "
        + " | ".join(f"attainment at {f}x" for f in factors) + " | "
        + " | ".join(f"TTFT p90 / short p99 at {f}x (s)" for f in factors)
        + " | released room / deferred / aged at " + (f"{factors[-1]}x" if factors else "-")
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * (2 * len(factors) + 1)]
    for label in result["variants"]:
        row = entry.get(label) or {}
        cliff = entry.get("cliff", {}).get(label, [])
        capacity = row.get("effective_capacity_rps")
        released = ((cliff[-1].get("admission_counters") or {}).get("released", {})
                    if cliff else {})
        lines.append(
            f"| {label} | "
            + (f"{capacity:.1f} ({_fmt(row.get('failed_at_rps'), 1)})" if capacity else "-")
            + f" | {_fmt(capacity / ideal if capacity else None)} | "
            f"{_fmt(row.get('cache_hit_rate'), 3)} | "
            f"{_fmt(entry.get('at_80pct', {}).get(label, {}).get('ttft_p99_short'))} | "
            + " | ".join(_fmt(c["slo_attainment"], 3) for c in cliff) + " | "
            + " | ".join(f"{_fmt(c.get('ttft_p90'), 1)} / {_fmt(c.get('ttft_p99_short'), 1)}"
                         for c in cliff)
            + " | " + (" / ".join(str(released.get(k, 0)) for k in ("room", "deferred", "aged"))
                       if "room" in released else "-") + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m loadgen.laps_experiment RESULT.json [PLOT.png]
    loaded = json.loads(Path(sys.argv[1]).read_text())
    if "entry" in loaded:  # a run_goodput_experiment result
        print(goodput_table(loaded))
        sys.exit(0)
    print(laps_tables(loaded))
    if len(sys.argv) > 2:
        plot_laps(loaded, sys.argv[2])


def run_pinned_hotspot(
    *, requests: int = 2000, instances: int = 8, profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0, factors: Sequence[float] = (0.8, 1.0), seed: int = 0,
) -> dict[str, Any]:
    """Rebalancing off vs on where a hotspot exists: the Zipf workload of
    ``run_rebalance_experiment`` with DualMap's hot-prefix key lengthening off
    (``adaptive_key=False``), so every request for the head document has the same two homes;
    ``laps`` admission; at ``factors`` x the ideal bound: attainment, load imbalance, moves."""
    zipf = build_synthetic("zipf", requests, 8.0, seed, params=ZIPF_PARAMS)
    bound = ideal_bound_rps(zipf, instances, profile)["ideal_bound_rps"]
    base = RunConfig(instances=instances, profile=profile, slo_ttft_s=slo_ttft_s, seed=seed,
                     warmup_fraction=0.1, policy="dualmap", admission="laps",
                     policy_params={"adaptive_key": False})
    runs = []
    for factor in factors:
        rate = factor * bound
        for rebalance in (False, True):
            summary = run_sim(replace(base, rate=rate, rebalance=rebalance),
                              requests=retime(zipf, rate))
            runs.append({"factor": factor, "rate": round(rate, 4), "rebalance": rebalance,
                         **{k: summary.get(k) for k in (
                             "slo_attainment", "ttft_p50", "ttft_p99", "load_imbalance",
                             "load_imbalance_tokens", "request_imbalance", "cache_hit_rate",
                             "admission_counters")}})
    return {"workload": {"name": "zipf", **ZIPF_PARAMS, "requests": len(zipf)},
            "instances": instances, "profile": profile, "slo_ttft_s": slo_ttft_s,
            "policy_params": {"adaptive_key": False}, "ideal_bound_rps": round(bound, 4),
            "runs": runs}
