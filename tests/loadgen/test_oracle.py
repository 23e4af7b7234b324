"""The pooled oracle (``loadgen.oracle``): one shared cache across the simulated fleet."""

from __future__ import annotations

from loadgen.capacity import _per_request_hits
from loadgen.config import RunConfig
from loadgen.laps_experiment import workload_requests
from loadgen.oracle import (
    SharedCacheEngines,
    oracle_config,
    run_oracle_experiment,
    shared_cache_blocks,
)
from loadgen.request import TraceRequest
from loadgen.sim import run_sim

PROMPT = tuple(i % 200 + 1 for i in range(512))


def _twins() -> list[TraceRequest]:
    """The same 512-token prompt twice, far apart in time (the first is long done)."""
    return [TraceRequest(f"r{i}", arrival_s=10.0 * i, prompt_len=len(PROMPT), output_len=4,
                         prompt_token_ids=PROMPT) for i in range(2)]


def _hits(summary: dict[str, object]) -> list[int]:
    per_instance = summary["per_instance"]
    assert isinstance(per_instance, list)
    return [int(i["prefix_cache_hits"]) for i in per_instance]


def test_a_prefix_computed_on_one_instance_is_a_hit_on_another_only_when_shared() -> None:
    requests = _twins()
    config = RunConfig(instances=2, policy="round_robin", profile="h100-llama3-8b")
    # Round robin puts the twins on different instances.
    apart = run_sim(config, requests=requests)
    assert _hits(apart) == [0, 0]
    shared = run_sim(config, requests=requests,
                     engine_factory=SharedCacheEngines(shared_cache_blocks(requests, 16)))
    # The second twin finds all full blocks but the last token's (always computed).
    assert _hits(shared) == [0, (len(PROMPT) - 1) // 16 * 16]


def test_every_run_starts_with_an_empty_shared_cache() -> None:
    factory = SharedCacheEngines(1024)
    config = RunConfig(instances=2)
    first = [factory(f"i{i}", i, config) for i in range(2)]
    assert first[0].block_manager is first[1].block_manager
    assert first[0].scheduler.block_manager is first[0].block_manager
    second = factory("i0", 0, config)
    assert second.block_manager is not first[0].block_manager
    assert second.block_manager.num_blocks == 1024


def test_shared_cache_blocks_hold_every_token_of_the_workload() -> None:
    requests = _twins()
    # (512 + 4) tokens -> 33 blocks of 16, plus one spare, per request.
    assert shared_cache_blocks(requests, 16) == 2 * (33 + 1)


def test_the_oracle_runs_least_loaded_on_fresh_reports_with_nothing_between() -> None:
    base = RunConfig(policy="dualmap", report_interval_s=0.5, dispatch_delay_s=0.02,
                     admission="laps", policy_params={"slo_factor": 1.0})
    config = oracle_config(base)
    assert (config.policy, config.report_interval_s, config.dispatch_delay_s,
            config.admission, config.policy_params) == ("least_loaded", 0.0, 0.0, "none", {})


def test_the_decomposition_runs_every_variant_and_the_oracle_keeps_every_hit() -> None:
    result = run_oracle_experiment(None, count=120, instances=2, fractions=(0.3,),
                                   search=False)
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == set(result["variants"])
    # The never-evicting shared cache hits every prefix an earlier request computed: it
    # prefills what the ideal bound counts as uncached, up to the engine's block
    # granularity (a cached prompt's last block is computed again for its logits).
    requests, _ = workload_requests("long_tailed", 120, 0)
    hits = _per_request_hits(requests, 16)
    uncached = sum(r.prompt_len - min(h, r.prompt_len - 1)
                   for r, h in zip(requests, hits, strict=True))
    assert uncached <= runs["oracle"]["prefill_tokens"] <= 1.03 * uncached
    assert runs["dualmap_shared_cache"]["prefill_tokens"] <= runs["dualmap"]["prefill_tokens"]
    assert runs["dualmap_unlimited_kv"]["preemptions"] == 0


def test_overrides_reach_every_run_and_the_recorded_command() -> None:
    plain = run_oracle_experiment(None, count=60, instances=2, fractions=(0.3,),
                                  labels=["dualmap"], search=False)
    forced = run_oracle_experiment(None, count=60, instances=2, fractions=(0.3,),
                                   labels=["dualmap"], search=False,
                                   overrides={"policy": "round_robin"})
    assert forced["overrides"] == {"policy": "round_robin"}
    assert "--set 'policy=\"round_robin\"'" in forced["command"]
    # Round robin ignores the cache, so the same requests find fewer prefixes cached.
    assert forced["runs"][0]["prefill_tokens"] > plain["runs"][0]["prefill_tokens"]
