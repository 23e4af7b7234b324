"""``llmfleet bench ...``: benchmarks that print JSON and write ``docs/results/*.json``.

``bench`` is a command group. ``bench routing`` lives here; other packages add their own
subcommands (``bench migration``, ``bench gateway``): list the module in ``BENCH_MODULES``
and give it ``register_bench(bench_subparsers)`` adding a parser that sets ``func`` (a
module not importable yet registers nothing, as in ``router.cli``).

``bench routing`` measures the wall time of ``policy.route`` per decision for every named
policy, on a fleet of ``N`` instances and 8k-token prompts, in a warm state: the prompts
ask new questions about documents that come back (Zipf popularity, so cache views, radix
trees and hot-prefix state are populated), every decision is dispatched and gets its first
token and its finish a fixed number of decisions later (so the in-flight view is busy), and
the snapshot is replaced by a new one with fresh load reports every ``--refresh-every``
decisions. Its O(N) adoption (``policy.adopt``) is timed apart, as ``adopt_us``: the
gateway's refresh loop adopts a snapshot when it reads one, not in a request's decision.
Token ids are int32 numpy arrays, the form the gateway should hand over; ``list_input``
repeats DualMap with Python lists. ``decisions_sha256`` is a digest of every decision
(instance, reason, candidates, predicted TTFT, cached-token estimate), warm-up included:
equal digests mean decision-for-decision equal runs.

``--against TREE`` measures the routing code of another checkout of this repository (a
``git worktree`` of an older commit, its extension built in place) side by side with this
one: every round runs this file's harness once on each tree's ``router`` package, in fresh
processes, alternating which goes first, and the JSON gives each number's median per tree,
their ratio and whether the decisions were the same.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from router.policy import fastpath
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    InstanceView,
    RoutingPolicy,
    RoutingRequest,
)
from router.policy.registry import POLICY_NAMES, build_policy

BENCH_MODULES = ("migration.bench", "router.gateway_bench", "instances.realtime_bench",
                 "router.dashboard.bench", "router.forwarders_bench")
DEFAULT_OUT = Path("docs/results/routing.json")
# The routing-core targets: decision p99 at 16 and at 1,024 instances (8k-token prompts).
TARGET_P99_US = {16: 20.0, 1024: 50.0}
FIRST_TOKEN_AFTER = 32  # decisions between a dispatch and its first token
FINISH_AFTER = 128  # decisions between a dispatch and its finish
TOKENS_PER_BLOCK = 16
KV_BLOCKS = 27_500  # an H100 with Llama-3-8B: ~440k tokens of KV


def register_cli(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON out, docs/results/)")
    bench_subparsers = bench.add_subparsers(dest="bench_command", required=True)
    register_bench(bench_subparsers)
    for module_name in BENCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register_bench(bench_subparsers)


def register_bench(bench_subparsers: Any) -> None:
    parser = bench_subparsers.add_parser(
        "routing", help="decision latency of every routing policy",
        description="Decision latency per routing policy on N instances, 8k-token prompts.")
    parser.add_argument("--instances", default="16,1024",
                        help="comma-separated fleet sizes (default 16,1024)")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--decisions", type=int, default=3000, help="timed decisions")
    parser.add_argument("--warmup", type=int, default=2000, help="untimed decisions first")
    parser.add_argument("--refresh-every", type=int, default=256,
                        help="decisions between snapshot refreshes (load reports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=9,
                        help="rounds of every policy; numbers are medians over rounds "
                             "(default 9: one round is at the mercy of a noisy spell)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the JSON ('-' for nowhere)")
    parser.add_argument("--json", action="store_true", help="print JSON (else a table)")
    parser.add_argument("--against", type=Path, default=None, metavar="TREE",
                        help="another checkout of this repository (extension built): run "
                             "each round on its routing code and on this one's, side by "
                             "side (see the module docstring)")
    parser.set_defaults(func=run_routing_cli)


def _snapshot(rng: np.random.Generator, num_instances: int, now: float) -> ClusterSnapshot:
    """Fresh load reports for a fixed membership (new ``InstanceView`` objects)."""
    running = rng.integers(0, 64, num_instances)
    waiting = rng.integers(0, 8, num_instances)
    used = rng.integers(0, KV_BLOCKS // 2, num_instances)
    views = tuple(
        InstanceView(
            instance_id=f"inst-{k:04d}",
            num_running=int(running[k]),
            num_waiting=int(waiting[k]),
            waiting_prefill_tokens=int(waiting[k]) * 2000,
            kv_usage=float(used[k]) / KV_BLOCKS,
            free_blocks=KV_BLOCKS - int(used[k]),
            total_blocks=KV_BLOCKS,
            block_size=TOKENS_PER_BLOCK,
            report_time=now,
        )
        for k in range(num_instances)
    )
    return ClusterSnapshot(epoch=1, instances=views)


class _Workload:
    """Documents asked again and again: a request is a shared system prompt, one of the
    documents (Zipf-popular) and a new 512-token question."""

    def __init__(self, rng: np.random.Generator, num_documents: int, prompt_tokens: int,
                 as_list: bool) -> None:
        self.rng = rng
        self.as_list = as_list
        self.question_tokens = min(512, prompt_tokens // 4)
        system_tokens = min(512, prompt_tokens // 4)
        document_tokens = prompt_tokens - system_tokens - self.question_tokens
        self.system = rng.integers(0, 128_000, system_tokens).astype(np.int32)
        self.documents = [rng.integers(0, 128_000, document_tokens).astype(np.int32)
                          for _ in range(num_documents)]
        weights = 1.0 / np.arange(1, num_documents + 1) ** 0.8
        self.popularity = weights / weights.sum()

    def prompt(self) -> np.ndarray | list[int]:
        document = int(self.rng.choice(len(self.documents), p=self.popularity))
        question = self.rng.integers(0, 128_000, self.question_tokens).astype(np.int32)
        prompt = np.concatenate([self.system, self.documents[document], question])
        return prompt.tolist() if self.as_list else prompt


def _percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return {
        "p50": round(float(np.percentile(us, 50)), 2),
        "p90": round(float(np.percentile(us, 90)), 2),
        "p99": round(float(np.percentile(us, 99)), 2),
        "max": round(float(us.max()), 2),
        "mean": round(float(us.mean()), 2),
    }


def bench_policy(policy: RoutingPolicy, num_instances: int, *, prompt_tokens: int,
                 decisions: int, warmup: int, refresh_every: int, seed: int,
                 as_list: bool = False) -> dict[str, Any]:
    """Time ``policy.route`` over ``warmup + decisions`` decisions; stats of the timed ones."""
    rng = np.random.default_rng(seed)
    workload = _Workload(rng, max(64, 4 * num_instances), prompt_tokens, as_list)
    snapshot = _snapshot(rng, num_instances, 0.0)
    route_ns: list[int] = []
    feedback_ns: list[int] = []
    adopt_ns: list[int] = []
    reasons: Counter[str] = Counter()
    dispatched: list[tuple[str, str]] = []
    decisions_made: list[Decision] = []
    clock = time.perf_counter_ns
    for seq in range(warmup + decisions):
        if seq and seq % refresh_every == 0:
            snapshot = _snapshot(rng, num_instances, seq * 0.001)
            start = clock()
            policy.adopt(snapshot)  # as the gateway's refresh loop does
            if seq >= warmup:
                adopt_ns.append(clock() - start)
        request = RoutingRequest(f"req-{seq}", workload.prompt(), 128)
        now = seq * 0.001
        start = clock()
        decision = policy.route(request, snapshot, now)
        routed = clock()
        policy.on_dispatched(request, decision, now)
        dispatched.append((request.request_id, decision.instance_id))
        decisions_made.append(decision)
        if seq >= FIRST_TOKEN_AFTER:
            rid, instance = dispatched[seq - FIRST_TOKEN_AFTER]
            policy.on_first_token(rid, instance, 0.2, None, now)
        if seq >= FINISH_AFTER:
            rid, instance = dispatched[seq - FINISH_AFTER]
            policy.on_finished(rid, instance, now)
        if seq >= warmup:
            route_ns.append(routed - start)
            feedback_ns.append(clock() - routed)
            reasons[decision.reason] += 1
    decision_stats = _percentiles(route_ns)
    feedback_stats = _percentiles(feedback_ns)
    return {
        **{f"decision_us_{k}": v for k, v in decision_stats.items()},
        "feedback_us_p50": feedback_stats["p50"],
        "feedback_us_p99": feedback_stats["p99"],
        "adopt_us_p50": _percentiles(adopt_ns)["p50"] if adopt_ns else None,
        "adopt_us_max": _percentiles(adopt_ns)["max"] if adopt_ns else None,
        "reasons": dict(sorted(reasons.items())),
        "decisions_sha256": _digest(decisions_made),
    }


def _digest(decisions: Sequence[Decision]) -> str:
    """A digest of decisions: equal digests, the same decisions field for field."""
    digest = hashlib.sha256()
    for d in decisions:
        digest.update(f"{d.instance_id}|{d.reason}|{d.candidates}|{d.predicted_ttft_s!r}|"
                      f"{d.cached_tokens_estimate}\n".encode())
    return digest.hexdigest()


def _median_of_repeats(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of each number, the first run's reasons (the
    runs are identical decision for decision: same seed), and each run's p50/p99."""
    row: dict[str, Any] = {}
    for field, value in repeats[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            row[field] = round(float(np.median([r[field] for r in repeats])), 2)
        elif field not in ("reasons", "decisions_sha256"):
            row[field] = value
    row["reasons"] = repeats[0]["reasons"]
    digests = {r.get("decisions_sha256") for r in repeats}
    row["decisions_sha256"] = digests.pop() if len(digests) == 1 else sorted(
        d for d in digests if d)
    row["repeats"] = [{"decision_us_p50": r["decision_us_p50"],
                       "decision_us_p99": r["decision_us_p99"]} for r in repeats]
    return row


def run_routing(instances: Sequence[int], policies: Sequence[str], *, prompt_tokens: int = 8192,
                decisions: int = 3000, warmup: int = 2000, refresh_every: int = 256,
                seed: int = 0, repeat: int = 1, progress: bool = False) -> dict[str, Any]:
    """The ``bench routing`` result for each fleet size (see the module docstring).

    With ``repeat`` > 1 every policy runs that many times, policies interleaved within each
    round (so a noisy spell on a shared machine hits all of them), and each number is the
    median over the rounds; ``repeats`` keeps every round's p50 and p99.
    """
    runs: dict[str, Any] = {}
    names = list(policies) + (["dualmap/list"] if "dualmap" in policies else [])
    bar = tqdm(total=len(instances) * repeat * len(names), desc="bench routing",
               unit="run", disable=not progress, file=sys.stderr)
    for num_instances in instances:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(repeat):
            for name in names:
                as_list = name == "dualmap/list"  # the same policy fed Python lists
                scale = 3 if as_list else 1
                gc.collect()
                results[name].append(bench_policy(
                    build_policy("dualmap" if as_list else name), num_instances,
                    prompt_tokens=prompt_tokens, decisions=decisions // scale,
                    warmup=warmup // scale, refresh_every=refresh_every, seed=seed,
                    as_list=as_list))
                bar.update()
        rows = {name: _median_of_repeats(results[name]) for name in policies}
        run: dict[str, Any] = {"instances": num_instances, "prompt_tokens": prompt_tokens,
                               "decisions": decisions, "repeat": repeat, "policies": rows}
        if "dualmap" in policies:
            run["list_input"] = {"dualmap": _median_of_repeats(results["dualmap/list"])}
            run["decision_us_p50"] = rows["dualmap"]["decision_us_p50"]
            run["decision_us_p99"] = rows["dualmap"]["decision_us_p99"]
            target = TARGET_P99_US.get(num_instances)
            if target is not None:
                run["target_decision_us_p99"] = target
                run["target_met"] = run["decision_us_p99"] <= target
        runs[str(num_instances)] = run
    bar.close()
    return runs


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(load[0], 2),
        "nice": os.nice(0) if hasattr(os, "nice") else 0,  # this process's scheduling niceness
        # which routing kernels ran (router/policy/fastpath.py): "compiled" or "python"
        "routing_kernels": "compiled" if fastpath.COMPILED else "python",
    }


def one_round(settings: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """One ``bench_policy`` run per fleet size and policy in ``settings`` (``instances``,
    ``policies``, ``prompt_tokens``, ``decisions``, ``warmup``, ``refresh_every``,
    ``seed``): fleet size -> policy -> result. What ``--against`` runs in each tree."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for num_instances in settings["instances"]:
        for name in settings["policies"]:
            gc.collect()
            runs.setdefault(str(num_instances), {})[name] = bench_policy(
                build_policy(name), num_instances, prompt_tokens=settings["prompt_tokens"],
                decisions=settings["decisions"], warmup=settings["warmup"],
                refresh_every=settings["refresh_every"], seed=settings["seed"])
    return runs


# Run in a fresh process with a tree's ``router`` package first on the path: this file's
# harness (the same timing code for both trees) on that tree's routing code.
_ROUND_IN_TREE = """
import json, runpy, sys
import router, router.policy.fastpath as fastpath
harness = runpy.run_path(sys.argv[1])
print(json.dumps({"package": router.__file__, "compiled": fastpath.COMPILED,
                  "runs": harness["one_round"](json.loads(sys.argv[2]))}))
"""


def _tree_info(tree: Path) -> dict[str, Any]:
    """A checkout's commit, whether it has uncommitted changes, and its path."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    return {"tree": str(tree), "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _round_in(tree: Path, settings: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND_IN_TREE, str(Path(__file__).resolve()),
         json.dumps(settings)], cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench round in {tree} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if not Path(result["package"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree}: imported router from {result['package']}")
    return result


def run_against(other: Path, settings: dict[str, Any], repeat: int,
                progress: bool = False) -> dict[str, Any]:
    """``--against``: ``repeat`` rounds on ``other`` ("before") and this checkout
    ("after"), alternating which runs first; per fleet size and policy, each tree's
    medians (``_median_of_repeats``), the after/before ratios of the decision p50 and p99
    (of the medians, and the median of each round's ratio), and whether both made the
    same decisions."""
    trees = {"before": other.resolve(), "after": Path(__file__).resolve().parents[1]}
    rounds: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    loads: list[float] = []
    for k in tqdm(range(repeat), desc="bench routing --against", disable=not progress,
                  file=sys.stderr):
        for side in ("before", "after") if k % 2 == 0 else ("after", "before"):
            loads.append(round(os.getloadavg()[0], 2))
            rounds[side].append(_round_in(trees[side], settings))
    by_instances: dict[str, Any] = {}
    for size in map(str, settings["instances"]):
        for name in settings["policies"]:
            rows = {side: _median_of_repeats([r["runs"][size][name] for r in rounds[side]])
                    for side in rounds}
            before, after = rows["before"], rows["after"]
            # Round k's two runs ran back to back: their ratio shares a noisy spell.
            paired = {q: round(float(np.median([
                a[f"decision_us_{q}"] / b[f"decision_us_{q}"]
                for a, b in zip(after["repeats"], before["repeats"], strict=True)])), 3)
                for q in ("p50", "p99")}
            by_instances.setdefault(size, {})[name] = {
                **rows,
                "ratio_p50": round(after["decision_us_p50"] / before["decision_us_p50"], 3),
                "ratio_p99": round(after["decision_us_p99"] / before["decision_us_p99"], 3),
                "paired_ratio_p50": paired["p50"],
                "paired_ratio_p99": paired["p99"],
                "same_decisions": (isinstance(after["decisions_sha256"], str)
                                   and after["decisions_sha256"] == before["decisions_sha256"]),
            }
    return {
        "benchmark": "routing-against",
        **{side: {**_tree_info(tree), "routing_kernels": (
            "compiled" if rounds[side][0]["compiled"] else "python")}
           for side, tree in trees.items()},
        "by_instances": by_instances,
        "load_average_1m_before_each_run": loads,
    }


def _emit(result: dict[str, Any], out: Path, print_json: bool) -> None:
    if str(out) != "-":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if print_json:
        print(json.dumps(result, indent=2))


def run_routing_cli(args: argparse.Namespace) -> int:
    instances = [int(x) for x in str(args.instances).split(",") if x]
    policies = [p for p in str(args.policies).split(",") if p]
    unknown = sorted(set(policies) - set(POLICY_NAMES))
    if unknown or not instances or min(instances) <= 0 or args.repeat <= 0:
        print(f"bad --policies/--instances: {unknown or args.instances}", file=sys.stderr)
        return 2
    machine = _machine()
    result: dict[str, Any]
    settings: dict[str, Any] = {"command": "llmfleet " + shlex.join(sys.argv[1:]),
                                "instances": instances, "policies": policies,
                "prompt_tokens": args.prompt_tokens, "decisions": args.decisions,
                "warmup": args.warmup, "refresh_every": args.refresh_every,
                "seed": args.seed, "repeat": args.repeat}
    if args.against is not None:
        result = run_against(args.against, settings, args.repeat, progress=True)
        result["machine"] = machine
        result["settings"] = {**settings, "against": str(args.against)}
        _emit(result, args.out, args.json)
        if not args.json:
            for size, rows in result["by_instances"].items():
                print(f"{size} instances: decision p50 / p99 in µs, before -> after")
                for name, row in rows.items():
                    b, a = row["before"], row["after"]
                    print(f"  {name:16s} {b['decision_us_p50']:6.1f} / {b['decision_us_p99']:6.1f}"
                          f" -> {a['decision_us_p50']:6.1f} / {a['decision_us_p99']:6.1f}"
                          f"  same decisions: {row['same_decisions']}")
        return 0
    runs = run_routing(instances, policies, prompt_tokens=args.prompt_tokens,
                       decisions=args.decisions, warmup=args.warmup,
                       refresh_every=args.refresh_every, seed=args.seed,
                       repeat=args.repeat, progress=True)
    if len(runs) == 1:
        result = {"benchmark": "routing", **next(iter(runs.values())), "machine": machine}
    else:
        result = {"benchmark": "routing", "by_instances": runs, "machine": machine}
    result["settings"] = settings
    _emit(result, args.out, args.json)
    if not args.json:
        for size, run in runs.items():
            print(f"{size} instances, {run['prompt_tokens']}-token prompts (route() in µs)")
            for name, row in run["policies"].items():
                print(f"  {name:16s} p50 {row['decision_us_p50']:8.1f}  "
                      f"p99 {row['decision_us_p99']:8.1f}  max {row['decision_us_max']:8.1f}")
    return 0
