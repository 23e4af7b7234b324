"""Simulator vs live fidelity: one workload, one policy, one profile, N replicas, run twice.

The live side starts an embedded Redis, N emulated reference-engine replicas (real time,
``speedup`` 1) and one gateway (uvicorn, in a child process so it does not share the GIL
with the load generator), all on free ports of 127.0.0.1, and replays the workload with
``loadgen.runner.run_live``. The simulated side runs ``loadgen.sim.run_sim`` on the very
same request list (same arrival times, prompts, output lengths), with the same instance ids
(so the hash rings agree), the same engine seeds and the same policy parameters.

The simulator is run twice: ``fresh`` (every decision sees the engines' current stats) and
``modelled`` (load views refreshed only every ``report_interval_s``, as the gateway sees the
heartbeat load reports, and each request reaching its engine ``dispatch_delay_s`` after the
decision, the gateway's forwarding time). Ratios are live / sim; ``within_tolerance`` says
whether TTFT p50/p90 and throughput agree within ``tolerance`` (10 % by default).

    python -m loadgen.fidelity --json --out docs/results/sim-vs-live.json \
        --plot docs/results/sim-vs-live.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadgen.config import RunConfig, load_workload
from loadgen.metrics import RequestOutcome
from loadgen.request import TraceRequest
from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_PROFILE, DEFAULT_SLO_TTFT_S

DEFAULT_TRACE = "/work/shared/traces/synthetic_trace.jsonl"
# Fields compared between the two sides (ratio = live / sim).
COMPARED = ("ttft_p50", "ttft_p90", "ttft_p99", "ttft_mean", "tpot_p50", "e2e_p50",
            "e2e_p90", "throughput_rps", "output_tokens_per_s", "slo_attainment",
            "cache_hit_rate")
# Fields that must agree within the tolerance.
GATED = ("ttft_p50", "ttft_p90", "throughput_rps")
_SUMMARY_DROP = ("per_instance",)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def instance_ids(count: int) -> list[str]:
    """The simulator's instance ids (``i00``, ``i01``, ...): the live fleet uses the same
    ones, so ring positions (hashes of the ids) are identical on both sides."""
    width = max(2, len(str(count - 1)))
    return [f"i{idx:0{width}d}" for idx in range(count)]


def policy_params(config: RunConfig) -> dict[str, Any]:
    """The parameters ``run_sim`` gives ``config.policy`` (fleet SLO, prefill cost, cache
    capacity, ... those the policy accepts), so the live gateway builds the same policy."""
    from loadgen.sim import fleet_policy_params
    from router.policy import registry

    accepted: set[str] = set()
    entry = getattr(registry, "_POLICIES", {}).get(config.policy)
    if entry is not None:
        accepted = set(inspect.signature(entry[0]).parameters) - set(entry[1])
    params = {k: v for k, v in fleet_policy_params(config).items() if k in accepted}
    params.update(config.policy_params)
    return params


def _wait_healthy(url: str, instances: int, timeout_s: float, proc: subprocess.Popen[bytes]
                  ) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(url + "/health", timeout=2.0)
            last = response.text
            if response.status_code == 200 and \
                    response.json().get("healthy_instances", 0) >= instances:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready after {timeout_s}s: {last}")


@contextlib.contextmanager
def live_fleet(config: RunConfig, *, heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
               refresh_interval_s: float = 0.2, log_dir: str | None = None) -> Iterator[str]:
    """Redis + ``config.instances`` emulated replicas + one gateway (child process), all on
    free 127.0.0.1 ports; yields the gateway URL and stops everything on exit."""
    from instances.launcher import EngineSpec, EngineSupervisor, free_port
    from router.embedded_redis import embedded_redis

    workdir = tempfile.mkdtemp(prefix="llmfleet-fidelity-")
    log_dir = log_dir or os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(embedded_redis(workdir))
        specs = [EngineSpec(instance_id=iid, port=free_port(), executor="emulated",
                            profile=config.profile, speedup=1.0, redis_url=redis_url,
                            heartbeat_ttl_s=heartbeat_ttl_s,
                            extra_args=["--seed", str(config.seed + idx),
                                        *_engine_args(config.engine_params)])
                 for idx, iid in enumerate(instance_ids(config.instances))]
        supervisor = EngineSupervisor(specs, log_dir=log_dir, restart=False)
        stack.callback(supervisor.stop)
        supervisor.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_file = stack.enter_context(open(os.path.join(log_dir, "gateway.log"), "ab"))
        gateway = subprocess.Popen(
            [sys.executable, "-m", "loadgen.fidelity", "--serve-gateway",
             "--redis-url", redis_url, "--port", str(port), "--policy", config.policy,
             "--policy-params", json.dumps(policy_params(config)),
             "--slo-ttft", repr(config.slo_ttft_s), "--admission", config.admission,
             "--admission-params", json.dumps(config.admission_params),
             "--heartbeat-ttl", repr(heartbeat_ttl_s),
             "--refresh-interval", repr(refresh_interval_s)],
            stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def stop_gateway() -> None:
            if gateway.poll() is None:
                gateway.send_signal(signal.SIGINT)
                try:
                    gateway.wait(10)
                except subprocess.TimeoutExpired:
                    gateway.kill()
                    gateway.wait()

        stack.callback(stop_gateway)
        _wait_healthy(url, config.instances, 60.0, gateway)
        yield url


def _engine_args(engine_params: dict[str, Any]) -> list[str]:
    """``llmfleet engine`` flags for the engine parameters it has flags for."""
    args: list[str] = []
    for key, value in engine_params.items():
        if key == "num_gpu_blocks":
            args += ["--num-gpu-blocks", str(value)]
        else:
            raise ValueError(f"engine parameter {key!r} cannot be passed to a live replica")
    return args


def _serve_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from router.gateway import Gateway, GatewayConfig, create_gateway_app
    from router.up import FAST_SERVER

    config = GatewayConfig(redis_url=args.redis_url, policy=args.policy,
                           policy_params=json.loads(args.policy_params),
                           slo_ttft_s=args.slo_ttft, admission=args.admission,
                           admission_params=json.loads(args.admission_params),
                           heartbeat_ttl_s=args.heartbeat_ttl,
                           refresh_interval_s=args.refresh_interval)
    uvicorn.run(create_gateway_app(Gateway(config)), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, **FAST_SERVER)
    return 0


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in _SUMMARY_DROP}


def ratios(live: dict[str, Any], sim: dict[str, Any]) -> dict[str, float | None]:
    """live / sim for the ``COMPARED`` fields (None where either is missing or sim is 0)."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        a, b = live.get(key), sim.get(key)
        out[key] = round(a / b, 4) if isinstance(a, (int, float)) and \
            isinstance(b, (int, float)) and b else None
    return out


def within(ratio: dict[str, float | None], tolerance: float) -> dict[str, bool]:
    return {k: ratio.get(k) is not None and abs(float(ratio[k] or 0.0) - 1.0) <= tolerance
            for k in GATED}


def _simulate(config: RunConfig, workload: Sequence[TraceRequest]
              ) -> tuple[dict[str, Any], list[RequestOutcome]]:
    from loadgen.sim import Simulator, summarize_sim

    start = time.perf_counter()
    result = Simulator(config, workload).run()
    result.wall_seconds = time.perf_counter() - start
    return summarize_sim(config, result), result.outcomes


def per_request(live: Sequence[RequestOutcome], sim: Sequence[RequestOutcome]
                ) -> dict[str, Any]:
    """Request-by-request comparison: how often both sides chose the same instance, and the
    distribution of live TTFT minus sim TTFT (all requests, and those routed alike)."""
    sim_by_id = {o.request_id: o for o in sim}
    pairs = [(o, sim_by_id[o.request_id]) for o in live
             if o.request_id in sim_by_id and o.ttft_s is not None
             and sim_by_id[o.request_id].ttft_s is not None]
    same = [(a, b) for a, b in pairs if a.instance_id == b.instance_id]

    def stats(items: Sequence[tuple[RequestOutcome, RequestOutcome]]) -> dict[str, Any]:
        diffs = [float(a.ttft_s or 0.0) - float(b.ttft_s or 0.0) for a, b in items]
        if not diffs:
            return {"requests": 0}
        return {"requests": len(diffs),
                "ttft_diff_ms_p10": round(float(np.percentile(diffs, 10)) * 1e3, 2),
                "ttft_diff_ms_p50": round(float(np.percentile(diffs, 50)) * 1e3, 2),
                "ttft_diff_ms_p90": round(float(np.percentile(diffs, 90)) * 1e3, 2),
                "ttft_diff_ms_mean": round(float(np.mean(diffs)) * 1e3, 2)}

    return {
        "same_instance_fraction": round(len(same) / len(pairs), 4) if pairs else None,
        "all": stats(pairs),
        "same_instance": stats(same),
    }


def run_fidelity(
    config: RunConfig,
    *,
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
    refresh_interval_s: float = 0.2,
    report_interval_s: float | None = None,
    dispatch_delay_s: float = 0.0,
    tolerance: float = 0.10,
    requests: Sequence[TraceRequest] | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Run ``config`` live and in the simulator on the same requests; return the comparison.

    ``report_interval_s`` (default: the replicas' heartbeat period, TTL/3, plus the
    gateway's refresh interval) and ``dispatch_delay_s`` configure the ``modelled`` sim."""
    from loadgen.runner import run_live

    workload = list(requests) if requests is not None else load_workload(config)
    if report_interval_s is None:
        report_interval_s = heartbeat_ttl_s / 3.0 + refresh_interval_s
    wall_start = time.perf_counter()
    fresh, fresh_outcomes = _simulate(
        replace(config, report_interval_s=0.0, dispatch_delay_s=0.0), workload)
    modelled, modelled_outcomes = _simulate(
        replace(config, report_interval_s=report_interval_s, dispatch_delay_s=dispatch_delay_s),
        workload)
    result: dict[str, Any] = {
        "config": {
            "trace": config.trace, "trace_format": config.trace_format, "rate": config.rate,
            "requests": len(workload), "instances": config.instances, "policy": config.policy,
            "policy_params": policy_params(config), "profile": config.profile,
            "slo_ttft_s": config.slo_ttft_s, "warmup_fraction": config.warmup_fraction,
            "seed": config.seed, "speedup": 1.0, "heartbeat_ttl_s": heartbeat_ttl_s,
            "heartbeat_period_s": heartbeat_ttl_s / 3.0,
            "gateway_refresh_interval_s": refresh_interval_s,
            "sim_report_interval_s": report_interval_s,
            "sim_dispatch_delay_s": dispatch_delay_s,
            "workload_params": config.workload_params,
        },
        "tolerance": tolerance,
        "sim_fresh": _compact(fresh),
        "sim_modelled": _compact(modelled),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if live:
        with live_fleet(config, heartbeat_ttl_s=heartbeat_ttl_s,
                        refresh_interval_s=refresh_interval_s) as url:
            live_outcomes: list[RequestOutcome] = []
            live_summary = asyncio.run(run_live(replace(config, url=url, progress=False),
                                                requests=workload, outcomes_out=live_outcomes))
        result["live"] = _compact(live_summary)
        for name, sim, outcomes in (("fresh", fresh, fresh_outcomes),
                                    ("modelled", modelled, modelled_outcomes)):
            ratio = ratios(live_summary, sim)
            result[f"ratio_live_over_sim_{name}"] = ratio
            result[f"within_tolerance_{name}"] = within(ratio, tolerance)
            result[f"per_request_{name}"] = per_request(live_outcomes, outcomes)
        result["all_served"] = {
            "live": live_summary["completed"] == len(workload) and not live_summary["errors"],
            "sim": fresh["completed"] == len(workload) and modelled["completed"] == len(workload),
        }
        # Requests a replica rejects (e.g. longer than max_model_len) fail on both sides.
        served = {o.request_id for o in live_outcomes if o.finished}
        result["same_requests_served"] = served == {
            o.request_id for o in fresh_outcomes if o.finished}
        result["live_errors"] = [{"request_id": o.request_id, "prompt_len": o.prompt_len,
                                  "error": o.error} for o in live_outcomes if o.error][:10]
        result["sim_errors"] = [{"request_id": o.request_id, "prompt_len": o.prompt_len,
                                 "error": o.error} for o in fresh_outcomes if o.error][:10]
    result["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    return result


def plot_fidelity(result: dict[str, Any], path: str | Path) -> Path:
    """TTFT quantile curves (live, sim fresh, sim modelled) and the ratio bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loadgen.metrics import QUANTILE_POINTS

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_cdf, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    fractions = [p / 100 for p in QUANTILE_POINTS]
    for key, label, style in (("live", "live (gateway + replicas)", "-"),
                              ("sim_fresh", "sim, fresh stats", "--"),
                              ("sim_modelled", "sim, stale reports modelled", ":")):
        quantiles = (result.get(key) or {}).get("ttft_quantiles") or []
        if quantiles:
            ax_cdf.plot(quantiles, fractions, style, marker=".", label=label)
    ax_cdf.set_xscale("symlog", linthresh=0.1)
    ax_cdf.set_xlabel("TTFT (s)")
    ax_cdf.set_ylabel("fraction of requests")
    cfg = result["config"]
    ax_cdf.set_title(f"{cfg['policy']}, {cfg['instances']} x {cfg['profile']}, "
                     f"{cfg['requests']} req @ {cfg['rate']} req/s")
    ax_cdf.legend()
    names = [k for k in COMPARED if k not in ("cache_hit_rate",)]
    width = 0.4
    for offset, variant in ((-width / 2, "fresh"), (width / 2, "modelled")):
        ratio = result.get(f"ratio_live_over_sim_{variant}") or {}
        ax_ratio.bar([i + offset for i in range(len(names))],
                     [ratio.get(n) or 0.0 for n in names], width, label=f"live / sim {variant}")
    tol = result["tolerance"]
    ax_ratio.axhspan(1 - tol, 1 + tol, color="green", alpha=0.15, label=f"±{tol:.0%}")
    ax_ratio.axhline(1.0, color="black", linewidth=0.8)
    ax_ratio.set_xticks(range(len(names)))
    ax_ratio.set_xticklabels(names, rotation=45, ha="right")
    ax_ratio.set_ylabel("live / sim")
    ax_ratio.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--trace-format", default="mooncake")
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=360)
    p.add_argument("--workload-param", action="append", default=[], metavar="KEY=VALUE",
                   help="synthetic workload field override (JSON value)")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--policy", default="dualmap")
    p.add_argument("--admission", default="none", choices=("none", "laps", "laps-spatial"),
                   help="admission queues, in the live gateway and the simulator alike")
    p.add_argument("--profile", default=DEFAULT_PROFILE)
    p.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO_TTFT_S)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL_S,
                   help="replica heartbeat TTL; load reports every TTL/3")
    p.add_argument("--refresh-interval", type=float, default=0.2,
                   help="gateway's cluster-state refresh interval")
    p.add_argument("--report-interval", type=float, default=None,
                   help="sim load-view refresh period (default: TTL/3 + refresh interval)")
    p.add_argument("--dispatch-delay", type=float, default=0.0,
                   help="sim delay from routing decision to engine arrival")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--sim-only", action="store_true", help="skip the live run")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None, help="write a PNG figure here")
    # Internal: the gateway child process.
    p.add_argument("--serve-gateway", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--policy-params", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--admission-params", default="{}", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_gateway:
        return _serve_gateway(args)
    params: dict[str, Any] = {}
    for pair in args.workload_param:
        key, _, value = pair.partition("=")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    config = RunConfig(trace=args.trace, trace_format=args.trace_format, rate=args.rate,
                       max_requests=args.max_requests, seed=args.seed,
                       workload_params=params, slo_ttft_s=args.slo_ttft,
                       warmup_fraction=args.warmup_fraction, instances=args.instances,
                       policy=args.policy, profile=args.profile, admission=args.admission)
    result = run_fidelity(config, heartbeat_ttl_s=args.heartbeat_ttl,
                          refresh_interval_s=args.refresh_interval,
                          report_interval_s=args.report_interval,
                          dispatch_delay_s=args.dispatch_delay, tolerance=args.tolerance,
                          live=not args.sim_only)
    result["command"] = "python -m loadgen.fidelity " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_fidelity(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("fresh", "modelled"):
            print(f"live / sim {name}: {result.get(f'ratio_live_over_sim_{name}')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
