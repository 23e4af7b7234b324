"""Follow-up co-location: do a conversation's turns stay on the replica of the turn before?

``python -m loadgen.affinity_experiment --json [--out docs/results/affinity.json]`` runs, side
by side in one process, DualMap (``dualmap``; ``dualmap_before``, the same policy with the
keys of before this work and no continuity candidate, ``LEGACY_KEYS``, gives the same
decisions as the code before it; ``dualmap_keys_only`` and ``dualmap_continuity_only`` each
of the two changes alone), ``cache_aware`` and ``least_loaded`` on

* ``short``: a short multi-turn workload (a 24-token chat header, ~50-token user messages,
  ~80-token answers, 3-12 turns: prompts grow from ~50 to a few thousand tokens), and
* ``long``: a long-tailed one (2,048-token system prompts, lognormal user messages and
  answers with a heavy tail, up to 20 turns: prompts of several thousand tokens),

finds each policy's effective capacity (``loadgen.capacity``) and the ideal bound, then
simulates every policy at the same rate, ``load`` (0.8) x the capacity of the *best* policy
on that workload, and reports for each run ``followup_colocation`` (the share of follow-up
turns served by the replica of their previous turn), ``followup_colocation_tokens`` (the same
weighted by the tokens a turn shares with its previous one: the previous prompt) and, for
the turns that left, why: the decision reason of the turn (``slo_fallback``, ``load``, ...),
or for an ``affinity`` decision whether the previous replica was not among the homes
(``key_moved``: the key, hence the homes, changed) or was, and lost the pick
(``affinity_pick``).

Capacities are flagged as ``llmfleet sim capacity`` flags them (``exceeds_ideal_bound``,
``span_over_e2e_p90``): with a few thousand requests at these rates the arrivals span only
a couple of request lifetimes, so they compare policies over the same window rather than
give steady-state capacities. Everything is deterministic given the seed (``wall_seconds``
aside).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadgen.capacity import capacity_for_policy, ideal_bound_rps, retime
from loadgen.config import RunConfig
from loadgen.metrics import followup_colocation
from loadgen.request import TraceRequest
from loadgen.sim import Simulator, default_policy_factory, summarize_sim
from loadgen.workloads import MultiTurnConfig, multi_turn
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingPolicy, RoutingRequest

WORKLOADS: dict[str, MultiTurnConfig] = {
    "short": MultiTurnConfig(
        num_system_prompts=4, system_prompt_len=24, system_zipf_exponent=1.0,
        turns_min=3, turns_max=12, user_len_mean=50.0, user_len_sigma=0.6,
        output_len_mean=80.0, output_len_sigma=0.6, think_time_mean_s=0.5,
        max_prompt_len=3000),
    "long": MultiTurnConfig(
        num_system_prompts=16, system_prompt_len=2048, system_zipf_exponent=1.0,
        turns_min=2, turns_max=20, user_len_mean=400.0, user_len_sigma=1.2,
        output_len_mean=250.0, output_len_sigma=1.0, think_time_mean_s=2.0,
        max_prompt_len=24_000),
}
# Per workload: (requests, the rate it is generated at and the capacity search starts
# from). Generated near its capacity, so re-timing to the probed rates keeps think times
# about as generated, and with many more requests than one session spans (steady state).
SIZES: dict[str, tuple[int, float]] = {"short": (3000, 250.0), "long": (1500, 30.0)}

# Variants: (label, policy, policy params).
# DualMap's keys before this work: the first two 512-token blocks, lengthened in 128-token
# steps past hot splits.
LEGACY_KEYS: dict[str, Any] = {"key_blocks": 2, "key_block_size": 512, "max_key_blocks": 16,
                               "hot_step": 128}
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dualmap", "dualmap", {}),
    ("dualmap_before", "dualmap", {**LEGACY_KEYS, "continuity": False}),
    ("dualmap_keys_only", "dualmap", {"continuity": False}),
    ("dualmap_continuity_only", "dualmap", {**LEGACY_KEYS}),
    ("cache_aware", "cache_aware", {}),
    ("least_loaded", "least_loaded", {}),
)

# The variants whose capacity is searched (the ablations run at the common rate only).
CAPACITY_VARIANTS = ("dualmap", "dualmap_before", "cache_aware", "least_loaded")


@dataclass
class TurnRecord:
    """What the policy decided for one request."""

    instance_id: str
    reason: str
    candidates: tuple[str, ...]
    key_hash: int | None


def recording_factory(
    records: dict[str, TurnRecord],
) -> Callable[[RunConfig], RoutingPolicy]:
    """The simulator's default policy factory, with every ``route`` decision recorded in
    ``records`` (by request id; a later decision for the same request replaces it)."""

    def factory(config: RunConfig) -> RoutingPolicy:
        policy = default_policy_factory(config)
        route = policy.route

        def recorded(request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
            decision = route(request, snapshot, now)
            prepared = getattr(policy, "_prepared", {}).get(request.request_id)
            key = getattr(prepared, "key", None)
            records[request.request_id] = TurnRecord(
                decision.instance_id, decision.reason, decision.candidates,
                None if key is None else key.hash)
            return decision

        policy.route = recorded  # type: ignore[method-assign]
        return policy

    return factory


def simulate(config: RunConfig, requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """One simulation with decisions recorded: the sim summary (per-instance rows left out)
    plus ``followup_colocation``'s fields."""
    records: dict[str, TurnRecord] = {}
    wall = time.perf_counter()
    simulator = Simulator(config, requests, policy_factory=recording_factory(records))
    result = simulator.run()
    result.wall_seconds = time.perf_counter() - wall
    summary = summarize_sim(config, result)
    served = {o.request_id: o.instance_id for o in result.outcomes if o.ttft_s is not None}
    keep = ("rate", "requests", "slo_attainment", "cache_hit_rate", "ttft_p50", "ttft_p99",
            "e2e_p90", "duration_s", "load_imbalance", "decisions", "wall_seconds")
    out = {k: summary.get(k) for k in keep}
    out.update(followup_colocation(requests, served, records))
    return out


def run_workload(
    name: str, workload: MultiTurnConfig, base: RunConfig, variants: Sequence[
        tuple[str, str, dict[str, Any]]], *, load: float, capacity: bool, max_probes: int,
    log: bool, capacity_variants: Sequence[str] = CAPACITY_VARIANTS,
) -> dict[str, Any]:
    """Capacities, the ideal bound, then every variant at ``load`` x the best capacity."""
    count, generated_at = SIZES[name]
    count = base.max_requests or count
    requests = multi_turn(count, base.rate or generated_at, base.seed, base.cv, workload)
    result: dict[str, Any] = {
        "workload": {"name": name, "requests": len(requests), **workload.__dict__},
        "ideal": ideal_bound_rps(requests, base.instances, base.profile),
        "policies": {},
    }
    capacities: dict[str, float] = {}
    checks: dict[str, dict[str, Any]] = {}
    initial = 0.7 * (base.rate or generated_at)
    if capacity:
        for label, policy, params in variants:
            if label not in capacity_variants:
                continue
            config = replace(base, policy=policy, policy_params=params, warmup_fraction=0.1)
            search, at = capacity_for_policy(config, requests=requests, initial_rate=initial,
                                             max_probes=max_probes, growth=1.5, rel_tol=0.05)
            capacities[label] = search.capacity_rps
            # As ``llmfleet sim capacity`` flags them: a capacity above the ideal bound, or
            # arrivals spanning few request lifetimes, is not a steady-state capacity.
            e2e = (at or {}).get("e2e_p90")
            checks[label] = {
                "exceeds_ideal_bound": search.capacity_rps > result["ideal"]["ideal_bound_rps"],
                "span_over_e2e_p90": (round((len(requests) - 1) / search.capacity_rps / e2e, 2)
                                      if e2e and search.capacity_rps else None),
                "probes": [[round(r, 3), a] for r, a in search.probes],
            }
            if log:
                print(f"[affinity] {name} {label}: capacity {search.capacity_rps:.3f} req/s",
                      file=sys.stderr, flush=True)
    rate = load * max(capacities.values()) if capacities else (base.rate or generated_at)
    result["rate"] = round(rate, 4)
    result["load"] = load
    timed = retime(requests, rate)
    for label, policy, params in variants:
        config = replace(base, policy=policy, policy_params=params, rate=rate,
                         warmup_fraction=0.1)
        entry = simulate(config, timed)
        if label in capacities:
            entry["effective_capacity_rps"] = round(capacities[label], 4)
            entry.update(checks[label])
        entry["policy"], entry["params"] = policy, params
        result["policies"][label] = entry
        if log:
            print(f"[affinity] {name} {label} @ {rate:.3f} req/s: colocation "
                  f"{entry['followup_colocation']} moved {entry['moved_reasons']}",
                  file=sys.stderr, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="short,long")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per workload (default: SIZES)")
    parser.add_argument("--rate", type=float, default=None,
                        help="generation rate, 1/0.7 x the first capacity probe (req/s; "
                        "default: SIZES)")
    parser.add_argument("--load", type=float, default=0.8,
                        help="share of the best capacity the side-by-side runs use")
    parser.add_argument("--slo-ttft", type=float, default=1.0)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-capacity", action="store_true",
                        help="skip the capacity searches; run at --rate")
    parser.add_argument("--max-probes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="workloads run in parallel")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    base = RunConfig(trace_format="synthetic", trace="multiturn", instances=args.instances,
                     max_requests=args.requests, rate=args.rate, slo_ttft_s=args.slo_ttft,
                     seed=args.seed)
    if args.profile:
        base = replace(base, profile=args.profile)
    wanted = args.variants.split(",")
    variants = [v for v in VARIANTS if v[0] in wanted]
    started = time.perf_counter()
    out: dict[str, Any] = {
        "command": "python -m loadgen.affinity_experiment " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "instances": args.instances, "slo_ttft_s": args.slo_ttft, "profile": base.profile,
        "seed": args.seed, "workloads": {},
    }
    names = args.workloads.split(",")
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(names)))) as pool:
        futures = {name: pool.submit(
            run_workload, name, WORKLOADS[name], base, variants, load=args.load,
            capacity=not args.no_capacity, max_probes=args.max_probes, log=True)
            for name in names}
        for name in names:
            out["workloads"][name] = futures[name].result()
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json or not args.out:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
