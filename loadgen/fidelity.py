"""Simulator vs live fidelity: one workload, one policy, one profile, N replicas, run twice.

The live side starts an embedded Redis, N emulated reference-engine replicas (real time,
``speedup`` 1) and one gateway (uvicorn, in a child process so it does not share the GIL
with the load generator), all on free ports of 127.0.0.1, and replays the workload with
``loadgen.runner.run_live``. The simulated side runs ``loadgen.sim.run_sim`` on the very
same request list (same arrival times, prompts, output lengths), with the same instance ids
(so the hash rings agree), the same engine seeds, the same policy parameters and the same
admission mode (``--admission``; both build it with ``router.admission.build_admission``).

``--workload long_tailed`` (or ``mooncake``, ``azure_conv``) replays instead one of the
admission experiment's workloads (``loadgen.laps_experiment.workload_requests``: the same
builder, the first ``--max-requests`` of it re-timed to ``--rate``).

The simulator is run twice: ``fresh`` (every decision sees the engines' current stats) and
``modelled`` (load views refreshed only every ``report_interval_s``, as the gateway sees the
heartbeat load reports, and each request reaching its engine ``dispatch_delay_s`` after the
decision, the gateway's forwarding time). Both run the admission mode's control loop
(rebalancing queued requests) every ``refresh_interval_s``, as the gateway does. Ratios
are live / sim; ``within_tolerance`` says
whether TTFT p50/p90 and throughput agree within ``tolerance`` (10 % by default).
``machine`` records what the live side had to run on: load average before and after, the
CPU seconds of the gateway, the replicas and the load generator over the live run, how
late the load generator sent requests and how far the replicas fell behind their emulated
device (a starved live side shows there first). ``live_gateway`` is the gateway's own count
of decisions, admission releases, moves and queue waits (from its ``/metrics``), to set
beside the simulator's ``admission_counters``.

    python -m loadgen.fidelity --json --out docs/results/sim-vs-live.json \
        --plot docs/results/sim-vs-live.png
    python -m loadgen.fidelity --workload long_tailed --instances 16 --admission laps \
        --rate R --max-requests N --out docs/results/sim-vs-live-laps.json \
        --plot docs/results/sim-vs-live-laps.png
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
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


def _wait_healthy(url: str, instances: int, timeout_s: float, proc: subprocess.Popen[bytes],
                  dead_replicas: Callable[[], list[str]] = list) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with code {proc.returncode}")
        dead = dead_replicas()
        if dead:
            raise RuntimeError(f"replicas exited during start-up: {dead}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(url + "/health", timeout=2.0)
            last = response.text
            if response.status_code == 200 and \
                    response.json().get("healthy_instances", 0) >= instances:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready after {timeout_s}s: {last}")


@dataclass
class LiveFleet:
    """A running live fleet: the gateway's URL and the process ids of its parts."""

    url: str
    gateway_pid: int
    engine_pids: list[int] = field(default_factory=list)
    engine_urls: list[str] = field(default_factory=list)


def engine_loops(urls: Sequence[str]) -> list[dict[str, float]]:
    """Each replica's real-time loop counters (``GET /load``: iterations, modelled device
    seconds, real busy seconds, seconds late)."""
    return [httpx.get(url + "/load", timeout=10.0).json()["loop"] for url in urls]


def engine_lag(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]]
               ) -> dict[str, Any]:
    """How far the replicas fell behind their emulated device between two ``engine_loops``
    readings: busy real time per modelled time minus one (0.05 = tokens 5 % late), over
    the fleet and for the worst replica, and the mean lateness per iteration."""
    deltas = [{k: b[k] - a[k] for k in ("iterations", "device_s", "wall_s", "late_s")}
              for a, b in zip(before, after, strict=True)]
    device = sum(d["device_s"] for d in deltas)
    iterations = sum(d["iterations"] for d in deltas)
    per_engine = [d["wall_s"] / d["device_s"] - 1.0 for d in deltas if d["device_s"] > 0]
    return {"iterations": int(iterations),
            "slowdown": round(sum(d["wall_s"] for d in deltas) / device - 1.0, 4)
            if device else None,
            "slowdown_max": round(max(per_engine), 4) if per_engine else None,
            "late_ms_per_iteration": round(1e3 * sum(d["late_s"] for d in deltas)
                                           / iterations, 3) if iterations else None}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children (0 once it is gone)."""
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for member in (proc, *proc.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = member.cpu_times()
                total += times.user + times.system
    return total


def fleet_cpu_seconds(fleet: LiveFleet) -> dict[str, Any]:
    """CPU seconds used so far by the gateway, each replica, and the load generator (this
    process and its finished worker processes)."""
    # Children count once reaped: the load generator's worker processes (the replicas and
    # the gateway are reaped only when the fleet stops, after the last reading).
    own = os.times()
    return {"gateway": cpu_seconds(fleet.gateway_pid),
            "engines": [cpu_seconds(pid) for pid in fleet.engine_pids],
            "loadgen": own.user + own.system + own.children_user + own.children_system}


def cpu_report(before: dict[str, Any], after: dict[str, Any], wall_s: float
               ) -> dict[str, Any]:
    """CPU used between two ``fleet_cpu_seconds`` readings, in seconds and in cores (CPU
    seconds / wall seconds) per part."""
    engines = [b - a for a, b in zip(before["engines"], after["engines"], strict=True)]
    used = {"gateway": after["gateway"] - before["gateway"], "engines": sum(engines),
            "engine_max": max(engines, default=0.0),
            "loadgen": after["loadgen"] - before["loadgen"]}
    total = used["gateway"] + used["engines"] + used["loadgen"]
    out: dict[str, Any] = {"wall_s": round(wall_s, 3)}
    out.update({f"{k}_cpu_s": round(v, 3) for k, v in used.items()})
    out["total_cpu_s"] = round(total, 3)
    if wall_s > 0:
        out.update({f"{k}_cores": round(v / wall_s, 3) for k, v in used.items()})
        out["total_cores"] = round(total / wall_s, 3)
    return out


def gateway_counters(url: str) -> dict[str, Any]:
    """The gateway's own view of the run from its ``/metrics``: routing decisions, admission
    releases and moves by reason, requests released from each admission queue and their
    mean wait, and its mean TTFT (from the request reaching it to its first token)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10.0).text
    out: dict[str, Any] = {"decisions": {}, "released": {}, "moves": {}, "queue_wait": {}}
    by_label = {"llmfleet_routing_decisions_total": ("decisions", "reason"),
                "llmfleet_admission_releases_total": ("released", "reason"),
                "llmfleet_admission_moves_total": ("moves", "reason")}
    waits: dict[str, dict[str, float]] = {}
    ttft = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in by_label:
                key, label = by_label[sample.name]
                if sample.value:
                    out[key][sample.labels[label]] = int(sample.value)
            elif sample.name.startswith("llmfleet_admission_queue_wait_seconds_"):
                stat = sample.name.rsplit("_", 1)[1]
                if stat in ("sum", "count"):
                    waits.setdefault(sample.labels["queue"], {})[stat] = sample.value
            elif sample.name.startswith("llmfleet_time_to_first_token_seconds_"):
                stat = sample.name.rsplit("_", 1)[1]
                if stat in ttft:
                    ttft[stat] = sample.value
    for queue, stats in waits.items():
        if stats.get("count"):
            out["queue_wait"][queue] = {
                "released": int(stats["count"]),
                "wait_s_mean": round(stats.get("sum", 0.0) / stats["count"], 6)}
    out["gateway_ttft_mean"] = round(ttft["sum"] / ttft["count"], 6) if ttft["count"] else None
    return out


def send_lag(workload: Sequence[TraceRequest], outcomes: Sequence[RequestOutcome]
             ) -> dict[str, Any]:
    """How late the load generator sent each request (actual send time on the run's clock
    minus the scheduled arrival), in ms: p50, p99, max."""
    scheduled = {r.request_id: r.arrival_s for r in workload}
    lags = [o.arrival_s - scheduled[o.request_id] for o in outcomes
            if o.request_id in scheduled]
    if not lags:
        return {"requests": 0}
    return {"requests": len(lags),
            "send_lag_ms_p50": round(float(np.percentile(lags, 50)) * 1e3, 2),
            "send_lag_ms_p99": round(float(np.percentile(lags, 99)) * 1e3, 2),
            "send_lag_ms_max": round(max(lags) * 1e3, 2)}


class FleetStartError(RuntimeError):
    """The live fleet did not come up (e.g. a port taken between choosing and binding it)."""


@contextlib.contextmanager
def live_fleet(config: RunConfig, *, heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
               refresh_interval_s: float = 0.2, log_dir: str | None = None,
               start_attempts: int = 3) -> Iterator[LiveFleet]:
    """Redis + ``config.instances`` emulated replicas + one gateway (child process), all on
    free 127.0.0.1 ports; yields the fleet (gateway URL, process ids) and stops everything
    on exit. A fleet that does not come up is stopped and started again on fresh ports,
    up to ``start_attempts`` times (free ports are picked before binding, and on a shared
    machine another process can take one in between)."""
    for attempt in range(1, start_attempts + 1):
        stack = contextlib.ExitStack()
        try:
            fleet = _start_fleet(stack, config, heartbeat_ttl_s, refresh_interval_s, log_dir)
        except (FleetStartError, TimeoutError) as exc:
            stack.close()
            if attempt == start_attempts:
                raise
            print(f"live fleet did not start ({exc}); retrying on fresh ports", file=sys.stderr)
            continue
        with stack:
            yield fleet
        return


def _start_fleet(stack: contextlib.ExitStack, config: RunConfig, heartbeat_ttl_s: float,
                 refresh_interval_s: float, log_dir: str | None) -> LiveFleet:
    from instances.launcher import EngineSpec, EngineSupervisor, free_port, stop_process
    from router.embedded_redis import embedded_redis

    workdir = tempfile.mkdtemp(prefix="llmfleet-fidelity-")
    log_dir = log_dir or os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    redis_url = stack.enter_context(embedded_redis(workdir))
    specs = [EngineSpec(instance_id=iid, port=free_port(), executor="emulated",
                        profile=config.profile, speedup=1.0, redis_url=redis_url,
                        heartbeat_ttl_s=heartbeat_ttl_s,
                        extra_args=["--seed", str(config.seed + idx),
                                    *_engine_args(config.engine_params)])
             for idx, iid in enumerate(instance_ids(config.instances))]
    supervisor = EngineSupervisor(specs, log_dir=log_dir, restart=False)
    stack.callback(supervisor.stop)
    try:
        supervisor.start()
    except (RuntimeError, TimeoutError) as exc:
        raise FleetStartError(str(exc)) from exc
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = stack.enter_context(open(os.path.join(log_dir, "gateway.log"), "ab"))  # noqa: SIM115
    gateway = subprocess.Popen(
        [sys.executable, "-m", "loadgen.fidelity", "--serve-gateway",
         "--redis-url", redis_url, "--port", str(port), "--policy", config.policy,
         "--policy-params", json.dumps(policy_params(config)),
         "--slo-ttft", repr(config.slo_ttft_s), "--admission", config.admission,
         "--admission-params", json.dumps(config.admission_params),
         "--heartbeat-ttl", repr(heartbeat_ttl_s),
         "--refresh-interval", repr(refresh_interval_s)],
        stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        # Its own session, as each replica: on a kernel with autogroup scheduling it
        # then gets its own share of the CPU instead of splitting the load generator's.
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    stack.callback(stop_process, gateway, signal.SIGINT, 10.0)
    # A replica that lost its port to another process exits (its /health may even be
    # answered by that process): fail fast instead of waiting for the gateway.
    dead = [e.spec.instance_id for e in supervisor.engines if not e.alive()]
    if dead:
        raise FleetStartError(f"replicas exited during start-up: {dead}")
    try:
        _wait_healthy(url, config.instances, 60.0, gateway,
                      lambda: [e.spec.instance_id for e in supervisor.engines
                               if not e.alive()])
    except RuntimeError as exc:
        raise FleetStartError(str(exc)) from exc
    return LiveFleet(url, gateway.pid, supervisor.pids(), [spec.url for spec in specs])


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


def named_workload(name: str, count: int, rate: float, seed: int = 0
                   ) -> tuple[list[TraceRequest], dict[str, Any]]:
    """Workload ``name`` of the admission experiments (``loadgen.laps_experiment``:
    ``long_tailed``, ``mooncake``, ``azure_conv``), at most ``count`` requests re-timed to
    mean ``rate``, and how it was made (for the JSON)."""
    from loadgen.capacity import retime
    from loadgen.laps_experiment import workload_requests

    requests, source = workload_requests(name, count, seed)
    return retime(requests, rate), source


def _live_shard(config: RunConfig, requests: list[TraceRequest], start_at: float
                ) -> list[RequestOutcome]:
    """One load-generator process: wait for the common start, replay ``requests``."""
    import uvloop  # the load generator's loop: less CPU per streamed token than asyncio's

    from loadgen.runner import run_live

    time.sleep(max(0.0, start_at - time.time()))
    outcomes: list[RequestOutcome] = []
    uvloop.run(run_live(config, requests=requests, outcomes_out=outcomes))
    return outcomes


def replay_live(config: RunConfig, workload: Sequence[TraceRequest], processes: int = 1
                ) -> tuple[dict[str, Any], list[RequestOutcome]]:
    """Replay ``workload`` against ``config.url``; the summary and the per-request outcomes.

    With ``processes`` > 1 the requests are dealt round-robin to that many load-generator
    processes started together (each its own event loop: a first token does not wait
    behind thousands of other streams' tokens in one loop), and the summary is computed
    over all of them."""
    import uvloop

    from loadgen.runner import run_live

    config = replace(config, max_requests=len(workload))
    if processes <= 1:
        outcomes: list[RequestOutcome] = []
        summary = uvloop.run(run_live(config, requests=workload, outcomes_out=outcomes))
        return summary, outcomes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from loadgen.config import warmup_count
    from loadgen.metrics import summarize

    shards = [list(workload[k::processes]) for k in range(processes)]
    wall_start = time.perf_counter()
    # Forked (nothing runs in this process yet), started together one second from now.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")
                             ) as pool:
        start_at = time.time() + 1.0
        futures = [pool.submit(_live_shard, replace(config, max_requests=len(shard)), shard,
                               start_at) for shard in shards]
        outcomes = [o for future in futures for o in future.result()]
    summary = summarize(outcomes, slo_ttft_s=config.slo_ttft_s, slo_tpot_s=config.slo_tpot_s,
                        warmup_requests=warmup_count(config, len(outcomes)),
                        wall_seconds=time.perf_counter() - wall_start)
    summary.update({"mode": "live", "url": config.url, "rate": config.rate,
                    "load_generator_processes": processes})
    return summary, outcomes


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


def _simulate(config: RunConfig, workload: Sequence[TraceRequest], control_interval_s: float
              ) -> tuple[dict[str, Any], list[RequestOutcome]]:
    from loadgen.sim import Simulator, summarize_sim

    start = time.perf_counter()
    result = Simulator(config, workload, control_interval_s=control_interval_s).run()
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
        out: dict[str, Any] = {
            "requests": len(diffs),
            "ttft_diff_ms_p10": round(float(np.percentile(diffs, 10)) * 1e3, 2),
            "ttft_diff_ms_p50": round(float(np.percentile(diffs, 50)) * 1e3, 2),
            "ttft_diff_ms_p90": round(float(np.percentile(diffs, 90)) * 1e3, 2),
            "ttft_diff_ms_mean": round(float(np.mean(diffs)) * 1e3, 2)}
        lengths = [a.prompt_len for a, _ in items]
        if len(set(lengths)) > 1:
            # Least-squares line through the diffs: the fixed part of the live overhead
            # and the part that grows with the prompt (token lists encoded and parsed).
            slope, intercept = np.polyfit(np.array(lengths) / 1e3, np.array(diffs) * 1e3, 1)
            out["ttft_diff_fit"] = {"intercept_ms": round(float(intercept), 2),
                                    "ms_per_1k_prompt_tokens": round(float(slope), 3)}
        return out

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
    workload_source: dict[str, Any] | None = None,
    loadgen_processes: int = 1,
    live: bool = True,
) -> dict[str, Any]:
    """Run ``config`` live and in the simulator on the same requests; return the comparison.

    ``report_interval_s`` (default: the replicas' heartbeat period, TTL/3, plus the
    gateway's refresh interval) and ``dispatch_delay_s`` configure the ``modelled`` sim.
    ``workload_source`` (how ``requests`` were made) is recorded in the config;
    ``loadgen_processes`` load-generator processes share the live replay."""

    workload = list(requests) if requests is not None else load_workload(config)
    if report_interval_s is None:
        report_interval_s = heartbeat_ttl_s / 3.0 + refresh_interval_s
    wall_start = time.perf_counter()
    load_before = os.getloadavg()
    fresh, fresh_outcomes = _simulate(
        replace(config, report_interval_s=0.0, dispatch_delay_s=0.0), workload,
        refresh_interval_s)
    modelled, modelled_outcomes = _simulate(
        replace(config, report_interval_s=report_interval_s, dispatch_delay_s=dispatch_delay_s),
        workload, refresh_interval_s)
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
            "loadgen_processes": loadgen_processes,
            # The gateway runs its admission job (rebalancing queued requests) once per
            # refresh; the simulated control loop gets the same period.
            "sim_control_interval_s": refresh_interval_s,
            "workload_params": config.workload_params,
            "workload": workload_source,
            "admission": config.admission,
            "admission_params": config.admission_params,
        },
        "tolerance": tolerance,
        "sim_fresh": _compact(fresh),
        "sim_modelled": _compact(modelled),
    }
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "loadavg_before": [round(x, 2) for x in load_before]}
    result["machine"] = machine
    if live:
        with live_fleet(config, heartbeat_ttl_s=heartbeat_ttl_s,
                        refresh_interval_s=refresh_interval_s) as fleet:
            machine["loadavg_live_start"] = [round(x, 2) for x in os.getloadavg()]
            loops_before = engine_loops(fleet.engine_urls)
            cpu_before, live_start = fleet_cpu_seconds(fleet), time.perf_counter()
            # Every request of the list, as the simulator (a built workload can come out a
            # few requests over max_requests, where the live runner would cut it).
            live_summary, live_outcomes = replay_live(
                replace(config, url=fleet.url, progress=False), workload, loadgen_processes)
            machine["live_cpu"] = cpu_report(cpu_before, fleet_cpu_seconds(fleet),
                                             time.perf_counter() - live_start)
            machine["loadavg_live_end"] = [round(x, 2) for x in os.getloadavg()]
            machine["engine_lag"] = engine_lag(loops_before, engine_loops(fleet.engine_urls))
            gateway_view = gateway_counters(fleet.url)
        machine["loadgen_send_lag"] = send_lag(workload, live_outcomes)
        result["live"] = _compact(live_summary)
        result["live_gateway"] = gateway_view
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
                              ("sim_modelled", "sim, stale reports + dispatch delay", ":")):
        quantiles = (result.get(key) or {}).get("ttft_quantiles") or []
        if quantiles:
            ax_cdf.plot(quantiles, fractions, style, marker=".", label=label)
    ax_cdf.set_xscale("symlog", linthresh=0.1)
    ax_cdf.set_xlabel("TTFT (s)")
    ax_cdf.set_ylabel("fraction of requests")
    cfg = result["config"]
    workload = (cfg.get("workload") or {}).get("workload") or Path(cfg["trace"] or "").name
    admission = cfg.get("admission", "none")
    ax_cdf.set_title(f"{workload}: {cfg['policy']}"
                     f"{'' if admission == 'none' else ' + ' + admission}, "
                     f"{cfg['instances']} x {cfg['profile']}, "
                     f"{cfg['requests']} req @ {cfg['rate']} req/s", fontsize=9)
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
    from loadgen.laps_experiment import DEFAULT_REQUESTS  # the workloads it can build

    p = argparse.ArgumentParser(prog="python -m loadgen.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--trace-format", default="mooncake")
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=360)
    p.add_argument("--workload", default=None, choices=sorted(DEFAULT_REQUESTS),
                   help="an admission-experiment workload (loadgen.laps_experiment) instead "
                        "of --trace: its first --max-requests re-timed to --rate")
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
    p.add_argument("--loadgen-procs", type=int, default=1,
                   help="load-generator processes sharing the live replay (round-robin)")
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
    requests: list[TraceRequest] | None = None
    source: dict[str, Any] | None = None
    if args.workload:
        requests, source = named_workload(args.workload, args.max_requests, args.rate,
                                          args.seed)
    config = RunConfig(trace=None if args.workload else args.trace,
                       trace_format=args.trace_format, rate=args.rate,
                       max_requests=args.max_requests, seed=args.seed,
                       workload_params=params, slo_ttft_s=args.slo_ttft,
                       warmup_fraction=args.warmup_fraction, instances=args.instances,
                       policy=args.policy, profile=args.profile, admission=args.admission)
    result = run_fidelity(config, heartbeat_ttl_s=args.heartbeat_ttl,
                          refresh_interval_s=args.refresh_interval,
                          report_interval_s=args.report_interval,
                          dispatch_delay_s=args.dispatch_delay, tolerance=args.tolerance,
                          requests=requests, workload_source=source,
                          loadgen_processes=args.loadgen_procs, live=not args.sim_only)
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
