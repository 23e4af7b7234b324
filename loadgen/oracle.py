"""The pooled oracle: what a perfect router could sustain under a TTFT SLO on this engine.

``ideal_bound_rps`` (``loadgen.capacity``) is a *throughput* bound: one infinite prefix
cache shared by all instances, perfect balance, decode iterations always in full batches,
and no queueing. A capacity under a TTFT SLO (>= 90 % of TTFTs within it) can only come
below it, and the issue's goal is a fraction of it. How far below any router must stay is
measured here, by simulating the oracle's fleet on the same engine model and arrivals:

* **one shared cache that never evicts**: every instance's scheduler allocates from one
  block manager sized for the whole workload (``SharedCacheEngines``), so a prefix computed
  anywhere is a hit everywhere, as in the bound (``ideal_cache_hit_rate``);
* **perfect information**: ``least_loaded`` (fewest pending tokens) on load reports that
  are fresh at every decision (``report_interval_s`` 0, no dispatch delay): with every
  prefix everywhere, cache affinity costs nothing and the balance is the whole decision.

What stays is what no router removes: engine queueing at a finite load, iterations that
mix prefill chunks with a partial decode batch, and prompts whose prefill alone passes the
SLO. ``pooled_oracle_capacity`` searches its capacity the way ``sim laps`` searches a
policy's, so the two are comparable side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from instances.engine.block_manager import BlockManager
from instances.engine.config import EngineConfig
from instances.engine.core import EngineCore
from loadgen.capacity import capacity_for_policy, retime
from loadgen.config import RunConfig
from loadgen.request import TraceRequest
from loadgen.sim import default_engine_factory, run_sim

ORACLE_POLICY = "least_loaded"


def shared_cache_blocks(requests: Sequence[TraceRequest], block_size: int) -> int:
    """Blocks enough for every token of ``requests`` at once (prompt + output, each request
    rounded up a block): a shared cache of this size never has to evict."""
    return sum(-(-(r.prompt_len + r.output_len) // block_size) + 1 for r in requests)


class SharedCacheEngines:
    """An engine factory for ``loadgen.sim``: reference engines whose schedulers all use one
    block manager of ``num_blocks`` blocks. Each engine keeps its own executor, queues and
    iterations; only the KV blocks and the prefix cache are pooled, so a block one instance
    computed is a cached prefix for all of them. The simulator builds its fleet in index
    order, so the first engine (index 0) of each run starts an empty cache: one factory
    serves every run of a capacity search."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.manager: BlockManager | None = None

    def __call__(self, instance_id: str, index: int, config: RunConfig) -> EngineCore:
        core = default_engine_factory(instance_id, index, config)
        assert isinstance(core, EngineCore)
        if self.manager is None or index == 0:
            engine = EngineConfig(**config.engine_params)
            self.manager = BlockManager(self.num_blocks, engine.block_size,
                                        enable_prefix_caching=True)
        core.block_manager = self.manager
        core.scheduler.block_manager = self.manager
        return core


def oracle_config(base: RunConfig) -> RunConfig:
    """``base`` as the oracle runs it: least-loaded on fresh reports, nothing in between."""
    return replace(base, **oracle_overrides())


def pooled_oracle_capacity(
    base: RunConfig,
    requests: Sequence[TraceRequest],
    *,
    initial_rate: float,
    max_rate: float,
    target: float = 0.9,
    rel_tol: float = 0.1,
    max_probes: int = 6,
    growth: float = 1.1,
    on_probe: Callable[[float, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The pooled oracle's capacity (>= ``target`` of TTFTs within ``base.slo_ttft_s``),
    searched as ``sim laps`` searches a policy's (``capacity_for_policy``: steps of
    ``growth`` from ``initial_rate``, then bisection to ``rel_tol``, never past
    ``max_rate``, the ideal bound)."""
    config = oracle_config(base)
    block_size = EngineConfig(**config.engine_params).block_size
    blocks = shared_cache_blocks(requests, block_size)
    search, at_capacity = capacity_for_policy(
        config, requests=requests, initial_rate=initial_rate, target=target, rel_tol=rel_tol,
        max_probes=max_probes, growth=growth, max_rate=max_rate, on_probe=on_probe,
        engine_factory=SharedCacheEngines(blocks))
    keep = ("slo_attainment", "ttft_p50", "ttft_p90", "ttft_p99", "cache_hit_rate",
            "load_imbalance", "throughput_rps")
    return {
        "policy": ORACLE_POLICY, "shared_cache_blocks": blocks,
        "effective_capacity_rps": round(search.capacity_rps, 4),
        "failed_at_rps": None if search.upper_rps == float("inf")
        else round(search.upper_rps, 4),
        **({} if at_capacity is None else {k: at_capacity.get(k) for k in keep}),
    }


# A per-instance KV cache this large (16M tokens, 36x an H100's ~440k for Llama-3-8B)
# neither evicts nor preempts on the long-tailed workload: "unlimited" memory, per instance.
UNLIMITED_KV_BLOCKS = 1_000_000
# The decomposition's runs (``laps-oracle.json``); the migration variants run when named.
DEFAULT_LABELS = ("dualmap", "dualmap_laps", "dualmap_unlimited_kv", "dualmap_shared_cache",
                  "oracle_fleet_kv", "oracle")


def oracle_variants(blocks: int) -> dict[str, dict[str, Any]]:
    """The runs of ``run_oracle_experiment``, from what every router has to the oracle:
    label -> (what it is, ``RunConfig`` overrides, engine factory kind)."""
    return {
        "dualmap": {"about": "DualMap, no admission: per-instance caches of the profile's "
                    "KV capacity (what the matrix measures)", "config": {"policy": "dualmap"}},
        "dualmap_laps": {"about": "DualMap with --admission laps (goodput order)",
                         "config": {"policy": "dualmap", "admission": "laps"}},
        "dualmap_unlimited_kv": {
            "about": "DualMap, no admission, each instance with unlimited KV memory (its own "
            "cache still: a prefix is a hit only where it was computed)",
            "config": {"policy": "dualmap",
                       "engine_params": {"num_gpu_blocks": UNLIMITED_KV_BLOCKS}}},
        "dualmap_shared_cache": {
            "about": "DualMap's routing, no admission, over one shared cache that never "
            "evicts (every prefix a hit everywhere)",
            "config": {"policy": "dualmap"}, "shared_blocks": blocks},
        "oracle_fleet_kv": {
            "about": "pooled oracle with one shared cache of the fleet's total KV capacity "
            "(16 x the profile's): perfect placement, finite memory",
            "config": oracle_overrides(), "shared_blocks": "fleet"},
        "oracle": {"about": "pooled oracle: one shared cache that never evicts, least-loaded "
                   "on fresh reports", "config": oracle_overrides(), "shared_blocks": blocks},
        "dualmap_migration": {
            "about": "DualMap, no admission, with live migration of decoding requests "
                     "(Llumnix freeness rebalancing, KV copied at 10 GB/s)",
            "config": {"policy": "dualmap", "migration": True}},
        "dualmap_laps_migration": {
            "about": "DualMap with --admission laps and live migration of decoding requests "
                     "(Llumnix freeness rebalancing, KV copied at 10 GB/s)",
            "config": {"policy": "dualmap", "admission": "laps", "migration": True}},
        "dualmap_laps_migration_t20": {
            "about": "dualmap_laps_migration with a freeness threshold of 20 free blocks per "
                     "running request (Llumnix's 3 leaves destinations no room to decode)",
            "config": {"policy": "dualmap", "admission": "laps", "migration": True,
                       "migration_params": {"threshold": 20}}},
    }


def oracle_overrides() -> dict[str, Any]:
    """The oracle's ``RunConfig`` fields (``oracle_config``)."""
    return {"policy": ORACLE_POLICY, "policy_params": {}, "report_interval_s": 0.0,
            "dispatch_delay_s": 0.0, "admission": "none", "rebalance": None}


def _run_row(base: RunConfig, requests: Sequence[TraceRequest], rate: float,
             variant: dict[str, Any]) -> dict[str, Any]:
    from instances.engine.factory import load_profile

    config = replace(base, **variant["config"]).with_rate(rate)
    shared = variant.get("shared_blocks")
    factory = default_engine_factory
    if shared == "fleet":
        engine = EngineConfig(**config.engine_params)
        per_instance = load_profile(config.profile).kv_capacity_tokens // engine.block_size
        shared = per_instance * config.instances
    if isinstance(shared, int):
        factory = SharedCacheEngines(shared)
    summary = run_sim(config, requests=retime(requests, rate), engine_factory=factory)
    per_instance = summary["per_instance"]
    return {
        "slo_attainment": summary["slo_attainment"],
        "ttft_p50": summary["ttft_p50"], "ttft_p90": summary["ttft_p90"],
        "ttft_p99_short": summary.get("ttft_p99_short"),
        "cache_hit_rate": summary["cache_hit_rate"],
        "followup_colocation": summary.get("followup_colocation"),
        "prefill_tokens": sum(i["prefill_tokens"] for i in per_instance),
        "preemptions": sum(i["preemptions"] for i in per_instance),
        "load_imbalance": summary["load_imbalance"],
        "wall_seconds": summary["wall_seconds"],
        **({"migration": summary["migration"]} if "migration" in summary else {}),
    }


def run_oracle_experiment(
    out: str | None = None,
    *,
    workload: str = "long_tailed",
    count: int | None = None,
    instances: int = 16,
    profile: str = "h100-llama3-8b",
    slo_ttft_s: float = 3.0,
    fractions: Sequence[float] = (0.9,),
    labels: Sequence[str] | None = None,
    search: bool = True,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Where DualMap's capacity goes between it and the ideal bound, measured: each
    ``oracle_variants`` run at ``fractions`` x the bound (same requests, same engines), and
    the pooled oracle's own capacity (``pooled_oracle_capacity``, from 0.9x the bound).
    With ``out`` the JSON is rewritten after every run (an interrupted run keeps its
    finished rows). ``overrides`` (``RunConfig`` fields) apply to every variant's run,
    over the variant's own (e.g. ``{"migration_params": {"threshold": 50}}``)."""
    import json
    import time
    from pathlib import Path

    from loadgen.laps_experiment import (
        DEFAULT_REQUESTS,
        WARMUP_FRACTION,
        workload_bound,
        workload_requests,
    )

    wall = time.perf_counter()
    requests, source = workload_requests(workload, count or DEFAULT_REQUESTS[workload], seed)
    base = RunConfig(instances=instances, profile=profile, slo_ttft_s=slo_ttft_s, seed=seed,
                     warmup_fraction=WARMUP_FRACTION, progress=False)
    bound = workload_bound(requests, base)
    ideal = bound["ideal_bound_rps"]
    block_size = EngineConfig(**base.engine_params).block_size
    variants = oracle_variants(shared_cache_blocks(requests, block_size))
    chosen = list(labels or DEFAULT_LABELS)
    overrides = dict(overrides or {})
    for label in chosen:
        variants[label]["config"] = {**variants[label]["config"], **overrides}
    result: dict[str, Any] = {
        "command": " ".join(["python -m loadgen.oracle", str(out or "-"), *(labels or ()),
                             *(["--workload", workload] if workload != "long_tailed" else []),
                             *(["--fractions", ",".join(map(str, fractions))]
                               if tuple(fractions) != (0.9,) else []),
                             *(["--seed", str(seed)] if seed else []),
                             *(f"--set '{k}={json.dumps(v)}'" for k, v in overrides.items())]),
        "workload": workload, "source": source,
        "instances": instances, "profile": profile, "slo_ttft_s": slo_ttft_s, "seed": seed,
        "warmup_fraction": WARMUP_FRACTION, "overrides": overrides, **bound,
        "variants": {k: variants[k]["about"] for k in chosen}, "runs": [],
    }

    def save() -> None:
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        if out:
            Path(out).write_text(json.dumps(result, indent=1) + "\n")

    for fraction in fractions:
        rate = round(fraction * ideal, 4)
        for label in chosen:
            row = _run_row(base, requests, rate, variants[label])
            result["runs"].append({"variant": label, "fraction_of_ideal": fraction,
                                   "rate": rate, **row})
            print(json.dumps(result["runs"][-1]), flush=True)
            save()
    if search:
        result["oracle_capacity"] = pooled_oracle_capacity(
            base, requests, initial_rate=0.9 * ideal, max_rate=ideal, growth=1.05)
        capacity = result["oracle_capacity"]["effective_capacity_rps"]
        result["oracle_capacity"]["fraction_of_ideal"] = round(capacity / ideal, 4)
        save()
    return result


if __name__ == "__main__":  # python -m loadgen.oracle RESULT.json [VARIANT ...] [--workload W]
    import argparse

    parser = argparse.ArgumentParser(description="The pooled-oracle decomposition of a "
                                     "workload's capacity (docs/admission.md)")
    parser.add_argument("out", help="result JSON")
    parser.add_argument("variants", nargs="*",
                        help="variants to run (default: the decomposition's six, then the "
                        "oracle's capacity search; named ones run without the search)")
    parser.add_argument("--workload", default="long_tailed",
                        help="long_tailed (default), mooncake or azure_conv")
    parser.add_argument("--fractions", default="0.9",
                        help="comma-separated rates as fractions of the ideal bound")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a RunConfig field for every run, over the variant's own "
                        "(repeatable), e.g. migration_params='{\"threshold\": 50}'")
    args = parser.parse_args()
    import json

    sets = {}
    for item in args.set:
        field_name, _, value = item.partition("=")
        sets[field_name] = json.loads(value)
    run_oracle_experiment(args.out, workload=args.workload, labels=args.variants or None,
                          search=not args.variants, seed=args.seed, overrides=sets,
                          fractions=tuple(float(f) for f in args.fractions.split(",")))
