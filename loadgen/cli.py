"""``llmfleet sim``, ``llmfleet sim capacity`` and ``llmfleet loadgen``.

``sim`` takes an optional first positional mode: ``run`` (default) simulates one policy at one
rate; ``capacity`` searches the effective capacity of several policies. Both print one JSON
object with ``--json`` (else a short text summary) and can write it (``--out``) and a figure
(``--plot``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadgen.config import WORKLOAD_FORMATS, RunConfig, load_workload
from proto.defaults import DEFAULT_PROFILE, DEFAULT_SLO_TTFT_S

DEFAULT_POLICIES = ("round_robin", "least_loaded", "power_of_two", "consistent_hash",
                    "cache_aware", "llumnix", "dualmap", "dualmap_no_slo")


def _key_values(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` (values parsed as JSON when they are)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--trace", help="trace file (or, with --trace-format synthetic, the "
                       "workload: multiturn, shared_prefix, zipf, long_short)")
    group.add_argument("--trace-format", default="mooncake", choices=WORKLOAD_FORMATS)
    group.add_argument("--rate", type=float, default=None,
                       help="mean request rate (req/s); traces are re-timed to it")
    group.add_argument("--cv", type=float, default=1.0, help="arrival CV (synthetic)")
    group.add_argument("--max-requests", type=int, default=None)
    group.add_argument("--max-seconds", type=float, default=None)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed trace lines (counted) instead of failing")
    group.add_argument("--workload-param", action="append", metavar="KEY=VALUE",
                       help="override a synthetic workload parameter")
    group.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO_TTFT_S, help="TTFT SLO (s)")
    group.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO (s), optional")
    group.add_argument("--warmup-fraction", type=float, default=None,
                       help="leading fraction of requests left out of the statistics "
                       "(default 0 for runs, 0.1 for capacity)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    out.add_argument("--out", help="also write the JSON to this file")
    out.add_argument("--plot", help="write a figure (png) to this file")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = subparsers.add_parser(
        "sim", help="simulate a fleet (or: sim capacity ... to search effective capacity)",
        description="Discrete-event simulation of N reference-engine cores routed by the "
        "gateway's policies. 'sim capacity' bisects the highest rate with >= 90%% of "
        "requests meeting the TTFT SLO for each policy.",
    )
    sim.add_argument("mode", nargs="?", default="run",
                     choices=("run", "capacity", "laps", "rebalance"),
                     help="run: one simulation; capacity: capacity search; laps / "
                     "rebalance: the admission experiments (docs/admission.md)")
    _add_workload_args(sim)
    fleet = sim.add_argument_group("fleet")
    fleet.add_argument("--instances", type=int, default=4)
    fleet.add_argument("--policy", default="round_robin")
    fleet.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                       help="comma-separated policies (capacity mode)")
    fleet.add_argument("--policy-param", action="append", metavar="KEY=VALUE")
    fleet.add_argument("--profile", default=DEFAULT_PROFILE)
    fleet.add_argument("--engine-param", action="append", metavar="KEY=VALUE",
                       help="EngineConfig field override")
    fleet.add_argument("--report-interval", type=float, default=0.0,
                       help="load-report period seen by the router (s); 0 = always fresh")
    fleet.add_argument("--dispatch-delay", type=float, default=0.0,
                       help="router-to-engine delay (s)")
    fleet.add_argument("--admission", default="none", choices=("none", "laps", "laps-spatial"),
                       help="router-side admission queues (docs/admission.md)")
    fleet.add_argument("--admission-param", action="append", metavar="KEY=VALUE",
                       help="admission parameter override (e.g. budget_tokens=16384)")
    fleet.add_argument("--rebalance", default="auto", choices=("auto", "on", "off"),
                       help="hotspot rebalancing of router-queued requests (auto: on with "
                       "admission queues and a policy that plans moves, i.e. dualmap)")
    cap = sim.add_argument_group("capacity search")
    cap.add_argument("--target", type=float, default=0.9, help="SLO attainment to sustain")
    cap.add_argument("--initial-rate", type=float, default=None,
                     help="first rate probed (default: a quarter of the ideal bound)")
    cap.add_argument("--rel-tol", type=float, default=0.03)
    cap.add_argument("--max-probes", type=int, default=12)
    cap.add_argument("--jobs", type=int, default=1,
                     help="sim laps: experiment jobs run in parallel processes")
    cap.add_argument("--workloads", default="long_tailed,mooncake,azure_conv",
                     help="sim laps: comma-separated workloads, in priority order")
    cap.add_argument("--resume", default=None, metavar="RESULT.json",
                     help="sim laps: keep the finished cells of this earlier result")
    cap.add_argument("--workload-requests", default=None, metavar="NAME=N,...",
                     help="sim laps: requests per probe per workload (default: "
                     "loadgen.laps_experiment.DEFAULT_REQUESTS)")
    cap.add_argument("--sweep-rates", default=None,
                     help="also simulate every policy at these comma-separated rates")
    sim.set_defaults(func=_run_sim_command)

    live = subparsers.add_parser(
        "loadgen", help="replay a workload against an OpenAI-compatible server",
        description="Open-loop streaming /v1/completions client measuring TTFT, TPOT, E2E, "
        "SLO attainment and goodput.",
    )
    live.add_argument("--url", required=True)
    live.add_argument("--model", default="", help="model name (default: first of /v1/models)")
    live.add_argument("--concurrency", type=int, default=4096, help="max requests in flight")
    live.add_argument("--request-timeout", type=float, default=600.0)
    live.add_argument("--drain-timeout", type=float, default=60.0,
                      help="after --max-seconds, wait this long for requests in flight")
    live.add_argument("--ignore-eos", action="store_true",
                      help="send ignore_eos (vLLM/SGLang extension)")
    _add_workload_args(live)
    live.set_defaults(func=_run_live_command)


def _config_from_args(args: argparse.Namespace, warmup_default: float) -> RunConfig:
    warmup = args.warmup_fraction if args.warmup_fraction is not None else warmup_default
    config = RunConfig(
        trace=args.trace,
        trace_format=args.trace_format,
        rate=args.rate,
        cv=args.cv,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        seed=args.seed,
        skip_bad_lines=args.skip_bad_lines,
        workload_params=_key_values(args.workload_param),
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        warmup_fraction=warmup,
        progress=not args.no_progress,
    )
    if hasattr(args, "instances"):
        config = replace(
            config, instances=args.instances, policy=args.policy,
            policy_params=_key_values(args.policy_param), profile=args.profile,
            engine_params=_key_values(args.engine_param),
            report_interval_s=args.report_interval, dispatch_delay_s=args.dispatch_delay,
            admission=args.admission, admission_params=_key_values(args.admission_param),
            rebalance={"auto": None, "on": True, "off": False}[args.rebalance],
        )
    if hasattr(args, "url"):
        config = replace(config, url=args.url, model=args.model,
                         max_concurrency=args.concurrency,
                         request_timeout_s=args.request_timeout,
                         drain_timeout_s=args.drain_timeout, ignore_eos=args.ignore_eos)
    return config


def _emit(result: dict[str, Any], args: argparse.Namespace, text_keys: Sequence[str]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key in text_keys:
            print(f"{key:>22}: {result.get(key)}")


_RUN_KEYS = ("requests", "completed", "errors", "slo_attainment", "ttft_p50", "ttft_p90",
             "ttft_p99", "tpot_p50", "throughput_rps", "goodput_rps", "cache_hit_rate",
             "load_imbalance", "wall_seconds")


def _run_sim_command(args: argparse.Namespace) -> int:
    from loadgen.sim import run_sim

    if args.mode == "capacity":
        return _run_capacity_command(args)
    if args.mode in ("laps", "rebalance"):
        return _run_admission_experiment(args)
    config = _config_from_args(args, warmup_default=0.0)
    summary = run_sim(config)
    if args.plot:
        from loadgen.plots import plot_run

        plot_run(summary, args.plot)
    _emit(summary, args, _RUN_KEYS)
    return 0


def _run_admission_experiment(args: argparse.Namespace) -> int:
    """``sim laps`` / ``sim rebalance``: the experiments of ``loadgen.laps_experiment``
    (their own workloads and fleets; ``--max-requests`` sizes them, ``--out``/``--plot``
    write the results)."""
    from loadgen import laps_experiment as lx

    progress = not args.no_progress
    if args.mode == "laps":
        def save_partial(partial: dict[str, Any]) -> None:
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(partial, indent=2) + "\n")

        counts: int | dict[str, int] | None = args.max_requests
        if args.workload_requests:
            counts = {k: int(v) for k, v in
                      (item.split("=", 1) for item in args.workload_requests.split(","))}
        result = lx.run_laps_experiment(
            workloads=[w for w in args.workloads.split(",") if w],
            requests_per_workload=counts, instances=args.instances,
            profile=args.profile, slo_ttft_s=args.slo_ttft, target=args.target,
            rel_tol=args.rel_tol, max_probes=args.max_probes, seed=args.seed,
            jobs=args.jobs, progress=progress, on_progress=save_partial,
            resume=json.loads(Path(args.resume).read_text()) if args.resume else None)
        if args.plot:
            lx.plot_laps(result, args.plot)
    else:
        result = lx.run_rebalance_experiment(
            requests=args.max_requests or 2000, instances=args.instances, profile=args.profile,
            slo_ttft_s=args.slo_ttft, target=args.target, rel_tol=args.rel_tol,
            max_probes=args.max_probes, seed=args.seed, progress=progress)
    _emit(result, args, ())
    return 0


def _run_live_command(args: argparse.Namespace) -> int:
    from loadgen.runner import run_live

    config = _config_from_args(args, warmup_default=0.0)
    summary = asyncio.run(run_live(config))
    if args.plot:
        from loadgen.plots import plot_run

        plot_run(summary, args.plot)
    _emit(summary, args, _RUN_KEYS)
    return 0 if summary["completed"] > 0 or summary["requests"] == 0 else 1


_CAPACITY_FIELDS = ("slo_attainment", "cache_hit_rate", "ttft_p50", "ttft_p90", "ttft_p99",
                    "tpot_p50", "e2e_p50", "e2e_p90", "load_imbalance", "load_imbalance_tokens",
                    "request_imbalance", "throughput_rps", "decisions")
# A probe is steady-state when its arrivals span many request lifetimes; below this many
# E2E p90s the probe mostly measures how a burst is absorbed, not a sustainable rate.
MIN_SPAN_OVER_E2E = 10.0


def capacity_warnings(result: dict[str, Any]) -> list[str]:
    """Sanity checks of a capacity result: no policy may exceed the ideal bound (it is an
    upper bound on sustained throughput; exceeding it means the probes were not in steady
    state), and the arrival span at the capacity rate must cover ``MIN_SPAN_OVER_E2E``
    request lifetimes (E2E p90). Also sets ``exceeds_ideal_bound`` and ``span_over_e2e_p90``
    on each policy entry."""
    warnings: list[str] = []
    bound = float(result.get("ideal_bound_rps") or 0.0)
    requests = int(result.get("requests") or 0)
    for name, entry in result.get("policies", {}).items():
        capacity = entry.get("effective_capacity_rps")
        if not capacity:
            continue
        exceeds = bound > 0 and capacity > bound
        entry["exceeds_ideal_bound"] = exceeds
        if exceeds:
            warnings.append(f"{name}: capacity {capacity} req/s exceeds the ideal bound "
                            f"{bound} req/s (probes not in steady state?)")
        e2e = entry.get("e2e_p90")
        if e2e and requests > 1:
            ratio = (requests - 1) / capacity / float(e2e)
            entry["span_over_e2e_p90"] = round(ratio, 2)
            if ratio < MIN_SPAN_OVER_E2E:
                warnings.append(f"{name}: arrivals at {capacity} req/s span only {ratio:.1f}x "
                                f"the E2E p90 ({e2e} s); use more requests")
    return warnings
_PROBE_FIELDS = ("slo_attainment", "early_stopped", "ttft_p50", "ttft_p90", "ttft_p99",
                 "cache_hit_rate", "load_imbalance", "completed", "wall_seconds")


def run_capacity(
    config: RunConfig,
    policies: Sequence[str],
    *,
    target: float = 0.9,
    initial_rate: float | None = None,
    rel_tol: float = 0.03,
    max_probes: int = 12,
    sweep_rates: Sequence[float] = (),
    log: bool = True,
    on_policy_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The ``llmfleet sim capacity`` JSON: per policy its effective capacity and the sim
    summary fields at that rate, the probes of the search, the ideal bound, and (with
    ``sweep_rates``) a policy x rate table. A policy that raises gets ``error`` instead of
    a capacity; ``on_policy_done`` sees the partial result after every policy."""
    from loadgen.capacity import capacity_for_policy, ideal_bound_rps, retime
    from loadgen.sim import run_sim

    wall_start = time.perf_counter()
    # Traces keep their own timestamps; synthetic workloads are generated once at
    # config.rate (or the default rate), then every probe re-times the same requests.
    base = load_workload(config if config.trace_format == "synthetic"
                         else replace(config, rate=None))
    from instances.engine.config import EngineConfig

    engine_config = EngineConfig(**config.engine_params)
    bound = ideal_bound_rps(base, config.instances, config.profile,
                            block_size=engine_config.block_size,
                            max_num_seqs=engine_config.max_num_seqs,
                            max_num_batched_tokens=engine_config.max_num_batched_tokens)
    start_rate = initial_rate or max(bound["ideal_bound_rps"] / 4.0, 0.01)
    result: dict[str, Any] = {
        "trace": config.trace, "trace_format": config.trace_format,
        "requests": len(base), "instances": config.instances, "profile": config.profile,
        "slo_ttft_s": config.slo_ttft_s, "target": target,
        "warmup_fraction": config.warmup_fraction, "seed": config.seed,
        "ideal_bound_rps": round(bound["ideal_bound_rps"], 4),
        "ideal_cache_hit_rate": round(bound["ideal_cache_hit_rate"], 4),
        "ideal_device_s_per_request": round(bound["ideal_device_s_per_request"], 6),
        "policies": {},
    }
    quiet = replace(config, progress=False)
    for name in policies:
        policy_config = replace(quiet, policy=name)
        probes: list[dict[str, Any]] = []

        def on_probe(rate: float, summary: dict[str, Any], name: str = name,
                     probes: list[dict[str, Any]] = probes) -> None:
            probes.append({"rate": round(rate, 4), **{k: summary.get(k) for k in _PROBE_FIELDS}})
            if log:
                print(f"[capacity] {name:>16} rate {rate:8.3f}: attainment "
                      f"{summary.get('slo_attainment')} early_stop {summary['early_stopped']} "
                      f"({summary['wall_seconds']:.1f} s)", file=sys.stderr, flush=True)

        try:
            search, at_capacity = capacity_for_policy(
                policy_config, requests=base,
                initial_rate=start_rate, target=target, rel_tol=rel_tol,
                max_probes=max_probes, on_probe=on_probe,
            )
        except Exception as exc:  # one broken policy must not lose the others' results
            if log:
                print(f"[capacity] {name}: failed: {exc!r}", file=sys.stderr, flush=True)
            result["policies"][name] = {"effective_capacity_rps": None,
                                        "error": repr(exc), "probes": probes}
            if on_policy_done is not None:
                on_policy_done(result)
            continue
        entry: dict[str, Any] = {
            "effective_capacity_rps": round(search.capacity_rps, 4),
            "failed_at_rps": None if search.upper_rps == float("inf")
            else round(search.upper_rps, 4),
            "fraction_of_ideal": round(search.capacity_rps / bound["ideal_bound_rps"], 4)
            if bound["ideal_bound_rps"] > 0 else None,
        }
        if at_capacity is not None:
            entry.update({k: at_capacity.get(k) for k in _CAPACITY_FIELDS})
        entry["probes"] = probes
        result["policies"][name] = entry
        if on_policy_done is not None:
            on_policy_done(result)
    if sweep_rates:
        table = []
        for name in policies:
            for rate in sweep_rates:
                summary = run_sim(replace(quiet, policy=name, rate=rate),
                                  requests=retime(base, rate))
                table.append({"policy": name, "rate": rate,
                              **{k: summary.get(k) for k in _PROBE_FIELDS}})
        result["sweep"] = table
    result["warnings"] = capacity_warnings(result)
    if log:
        for warning in result["warnings"]:
            print(f"[capacity] WARNING {warning}", file=sys.stderr, flush=True)
    result["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    return result


def _run_capacity_command(args: argparse.Namespace) -> int:
    config = _config_from_args(args, warmup_default=0.1)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    sweep = [float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else []

    def save_partial(partial: dict[str, Any]) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(partial, indent=2) + "\n")

    result = run_capacity(config, policies, target=args.target, initial_rate=args.initial_rate,
                          rel_tol=args.rel_tol, max_probes=args.max_probes, sweep_rates=sweep,
                          log=not args.no_progress, on_policy_done=save_partial)
    if args.plot:
        from loadgen.plots import plot_capacity

        plot_capacity(result, args.plot)
    if args.json or args.out:
        _emit(result, args, ())
    if not args.json:
        print(f"ideal bound: {result['ideal_bound_rps']} req/s")
        for name, entry in result["policies"].items():
            print(f"{name:>16}: {entry['effective_capacity_rps']} req/s "
                  f"(hit {entry.get('cache_hit_rate')}, ttft p90 {entry.get('ttft_p90')}, "
                  f"imbalance {entry.get('load_imbalance')})")
    return 0
