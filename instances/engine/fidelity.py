"""Engine fidelity benchmark: the core in virtual time against its profile's formula.

``python -m instances.engine.fidelity --json`` drives ``EngineCore`` (emulated executor) in
virtual time and compares what a client would measure with the profile's closed-form model
(``instances.engine.profile``):

* TTFT of a lone prompt over prompt length (chunked prefill above the token budget: the
  formula is the sum of the chunks' iteration times), cold and with the whole prefix cached;
* TTFT of a prompt that joins a running decode batch (mixed iteration);
* TPOT (mean decode-step time) over batch size at a fixed context.

It also measures the core's own CPU cost on this machine (wall clock, outside the core):
1,000 steps of 64 decoding sequences and admitting a 15k-token prompt; and, with
``--tiny``, fits the tiny executor's real per-token numpy cost to the tiny-cpu profile's
form. Results go to ``docs/results/engine-fidelity.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from instances.engine.core import EngineCore
from instances.engine.factory import build_engine_core, load_profile
from instances.engine.profile import HardwareProfile, prefill_attention_pairs
from instances.engine.types import EngineRequest, SamplingParams

PROMPT_LENGTHS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXT = 1024
BUDGET = 8192


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _request(request_id: str, prompt: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def _ttft(core: EngineCore, request: EngineRequest, now: float) -> tuple[float, float]:
    """(TTFT, engine time at the first token) of ``request`` added at ``now``."""
    core.add_request(request)
    start = now
    while True:
        result = core.step(now)
        now += result.duration_s
        if any(e.request_id == request.request_id for e in result.events):
            return now - start, now


def _drain(core: EngineCore, now: float) -> float:
    while core.has_unfinished_requests():
        now += core.step(now).duration_s
    return now


def _chunked_prefill_formula(profile: HardwareProfile, length: int, cached: int) -> float:
    total = 0.0
    start = cached
    while start < length:
        chunk = min(BUDGET, length - start)
        total += profile.iteration_time(chunk, prefill_attention_pairs(start, chunk), 0, 0)
        start += chunk
    return total


def _relative_error(measured: float, formula: float) -> float:
    return abs(measured - formula) / formula if formula else 0.0


def ttft_sweep(profile_name: str) -> list[dict[str, Any]]:
    profile = load_profile(profile_name)
    rows = []
    for length in PROMPT_LENGTHS:
        core = build_engine_core("emulated", profile_name, max_num_batched_tokens=BUDGET)
        prompt = _prompt(length, length)
        cold, now = _ttft(core, _request("cold", prompt, 1), 0.0)
        now = _drain(core, now)
        warm, _ = _ttft(core, _request("warm", prompt, 1), now)
        cached = (length - 1) // core.block_size * core.block_size
        cold_formula = _chunked_prefill_formula(profile, length, 0)
        warm_formula = _chunked_prefill_formula(profile, length, cached)
        rows.append(
            {
                "prompt_tokens": length,
                "ttft_s": cold,
                "ttft_formula_s": cold_formula,
                "ttft_rel_error": _relative_error(cold, cold_formula),
                "ttft_linear_s": profile.iteration_floor_s + profile.prefill_s_per_token * length,
                "cached_tokens": cached,
                "ttft_cached_s": warm,
                "ttft_cached_formula_s": warm_formula,
                "ttft_cached_rel_error": _relative_error(warm, warm_formula),
            }
        )
    return rows


def _lockstep_decode_core(profile_name: str, batch: int, context: int) -> tuple[EngineCore, float]:
    """A core whose ``batch`` sequences of ``context`` prompt tokens all just prefilled."""
    core = build_engine_core(
        "emulated",
        profile_name,
        max_num_batched_tokens=batch * context,
        max_num_seqs=batch + 1,  # room for one more (the mixed-iteration joiner)
    )
    for i in range(batch):
        core.add_request(_request(f"d{i}", _prompt(100_000 + i, context), 10_000))
    now = core.step(0.0).duration_s  # one iteration prefills everyone
    return core, now


def tpot_sweep(profile_name: str, steps: int = 32) -> list[dict[str, Any]]:
    profile = load_profile(profile_name)
    rows = []
    for batch in BATCH_SIZES:
        core, now = _lockstep_decode_core(profile_name, batch, DECODE_CONTEXT)
        durations = []
        formula = []
        for k in range(steps):
            result = core.step(now)
            now += result.duration_s
            durations.append(result.duration_s)
            formula.append(profile.decode_time(batch, DECODE_CONTEXT + 1 + k))
        measured, expected = float(np.mean(durations)), float(np.mean(formula))
        rows.append(
            {
                "batch_size": batch,
                "context_tokens": DECODE_CONTEXT,
                "tpot_s": measured,
                "tpot_formula_s": expected,
                "tpot_rel_error": _relative_error(measured, expected),
            }
        )
    return rows


def mixed_iteration(
    profile_name: str, batch: int = 32, prompt_tokens: int = 2048
) -> dict[str, Any]:
    """TTFT of a prompt joining ``batch`` decoding sequences (one mixed iteration)."""
    profile = load_profile(profile_name)
    core, now = _lockstep_decode_core(profile_name, batch, DECODE_CONTEXT)
    ttft, _ = _ttft(core, _request("joiner", _prompt(7, prompt_tokens), 1), now)
    formula = profile.iteration_time(
        prompt_tokens,
        prefill_attention_pairs(0, prompt_tokens),
        batch,
        batch * (DECODE_CONTEXT + 1),
    )
    return {
        "decode_batch": batch,
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft,
        "ttft_formula_s": formula,
        "ttft_rel_error": _relative_error(ttft, formula),
    }


def core_overhead() -> dict[str, float]:
    """Wall-clock CPU cost of the core itself (emulated executor, this machine)."""
    core, now = _lockstep_decode_core("h100-llama3-8b", 64, 1000)
    started = time.perf_counter()
    for _ in range(1000):
        now += core.step(now).duration_s
    steps_s = time.perf_counter() - started
    prompt = _prompt(3, 15_000)
    fresh = build_engine_core()
    started = time.perf_counter()
    fresh.add_request(_request("big", prompt, 16))
    admit_s = time.perf_counter() - started
    started = time.perf_counter()
    first = fresh.step(0.0)
    first_step_s = time.perf_counter() - started
    assert first.num_prefill_tokens == BUDGET
    return {
        "steps_1000_x_64_seqs_wall_s": steps_s,
        "us_per_sequence_step": steps_s / 64_000 * 1e6,
        "add_request_15k_tokens_wall_s": admit_s,
        "first_step_15k_prompt_wall_s": first_step_s,
    }


def tiny_calibration() -> dict[str, Any]:
    """Fit the tiny executor's real numpy cost to the profile form (wall clock)."""
    from instances.engine.tiny import TinyExecutor

    profile = load_profile("tiny-cpu")
    prefill_rows = []
    for length in (32, 128, 256, 512):
        executor_core = build_engine_core("tiny", max_num_batched_tokens=4096)
        executor_core.add_request(_request("p", _prompt(length, length), 1))
        started = time.perf_counter()
        executor_core.step(0.0)
        prefill_rows.append(
            (length, prefill_attention_pairs(0, length), time.perf_counter() - started)
        )
    decode_rows = []
    for batch in (1, 4, 16):
        core = build_engine_core("tiny", max_num_batched_tokens=4096)
        for i in range(batch):
            core.add_request(_request(f"d{i}", _prompt(500 + i, 128), 64))
        now = core.step(0.0).duration_s
        started = time.perf_counter()
        for _ in range(8):
            now += core.step(now).duration_s
        decode_rows.append((batch, batch * 133, (time.perf_counter() - started) / 8))
    assert isinstance(core.executor, TinyExecutor)
    # Least squares: wall = a * tokens + b * pairs/1000 (floor fixed small: numpy overhead).
    a_matrix = np.array([[n, pairs / 1000] for n, pairs, _ in prefill_rows])
    prefill_fit = np.linalg.lstsq(a_matrix, np.array([w for *_, w in prefill_rows]), rcond=None)[0]
    d_matrix = np.array([[b, ctx / 1000] for b, ctx, _ in decode_rows])
    decode_fit = np.linalg.lstsq(d_matrix, np.array([w for *_, w in decode_rows]), rcond=None)[0]
    return {
        "prefill_wall_s": [{"tokens": n, "wall_s": w} for n, _, w in prefill_rows],
        "decode_step_wall_s": [{"batch": b, "wall_s": w} for b, _, w in decode_rows],
        "fit_prefill_s_per_token": float(prefill_fit[0]),
        "fit_prefill_attn_s_per_ktoken": float(prefill_fit[1]),
        "fit_decode_s_per_seq": float(decode_fit[0]),
        "fit_decode_attn_s_per_ktoken": float(decode_fit[1]),
        "profile_prefill_s_per_token": profile.prefill_s_per_token,
        "profile_decode_s_per_seq": profile.decode_s_per_seq,
    }


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in report["profiles"].items():
        ttft = result["ttft"]
        lengths = [r["prompt_tokens"] for r in ttft]
        (line,) = ax_ttft.plot(
            lengths, [r["ttft_formula_s"] * 1e3 for r in ttft], "-", label=f"{name} formula"
        )
        ax_ttft.plot(
            lengths,
            [r["ttft_s"] * 1e3 for r in ttft],
            "o",
            color=line.get_color(),
            label=f"{name} measured",
        )
        ax_ttft.plot(
            lengths,
            [r["ttft_cached_s"] * 1e3 for r in ttft],
            "x",
            color=line.get_color(),
            label=f"{name} cached prefix",
        )
        tpot = result["tpot"]
        batches = [r["batch_size"] for r in tpot]
        (line,) = ax_tpot.plot(
            batches, [r["tpot_formula_s"] * 1e3 for r in tpot], "-", label=f"{name} formula"
        )
        ax_tpot.plot(
            batches,
            [r["tpot_s"] * 1e3 for r in tpot],
            "o",
            color=line.get_color(),
            label=f"{name} measured",
        )
    ax_ttft.set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens",
        ylabel="TTFT (ms)",
        title="Lone-prompt TTFT (virtual time)",
    )
    ax_tpot.set(
        xscale="log",
        xlabel="decode batch size",
        ylabel="TPOT (ms)",
        title=f"Decode step time at {DECODE_CONTEXT}-token context",
    )
    ax_ttft.legend(fontsize=6)
    ax_tpot.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(profiles: list[str], with_tiny: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"max_num_batched_tokens": BUDGET, "profiles": {}}
    worst = 0.0
    for name in profiles:
        ttft, tpot, mixed = ttft_sweep(name), tpot_sweep(name), mixed_iteration(name)
        errors: list[float] = [r["ttft_rel_error"] for r in ttft]
        errors += [r["ttft_cached_rel_error"] for r in ttft]
        errors += [r["tpot_rel_error"] for r in tpot]
        errors.append(mixed["ttft_rel_error"])
        worst = max(worst, *errors)
        report["profiles"][name] = {
            "profile": asdict(load_profile(name)),
            "ttft": ttft,
            "tpot": tpot,
            "mixed": mixed,
            "max_rel_error": max(errors),
        }
    report["max_rel_error"] = worst
    report["core_overhead"] = core_overhead()
    if with_tiny:
        report["tiny_calibration"] = tiny_calibration()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--profiles",
        default="h100-llama3-8b,a100-llama3-8b,h100-qwen2.5-7b,dualmap-910b4-qwen2.5-7b",
    )
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--tiny", action="store_true", help="also fit the tiny executor's cost")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run([p for p in args.profiles.split(",") if p], args.tiny)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Real-time capacity is measured with live replicas (python -m instances.realtime_bench);
    # carry its last result along so this file states both halves of the fidelity story.
    realtime = out_dir / "engine-realtime.json"
    if realtime.exists():
        from instances.realtime_bench import fidelity_summary

        report["realtime"] = fidelity_summary(json.loads(realtime.read_text()))
    (out_dir / "engine-fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out_dir / "engine-fidelity.png")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"max relative error {report['max_rel_error']:.2e}; "
            f"wrote {out_dir / 'engine-fidelity.json'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
