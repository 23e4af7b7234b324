"""Matplotlib figures of run and capacity results (written to files; Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadgen.metrics import QUANTILE_POINTS


def plot_run(summary: Mapping[str, Any], path: str | Path) -> Path:
    """TTFT distribution (quantile curve with the SLO) and per-instance request split."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_ttft, ax_inst) = plt.subplots(1, 2, figsize=(11, 4))
    quantiles = summary.get("ttft_quantiles") or []
    if quantiles:
        ax_ttft.plot(quantiles, [p / 100 for p in QUANTILE_POINTS], marker=".")
    ax_ttft.axvline(summary["slo_ttft_s"], color="red", linestyle="--", label="TTFT SLO")
    ax_ttft.set_xlabel("TTFT (s)")
    ax_ttft.set_ylabel("fraction of requests")
    ax_ttft.set_title(f"{summary.get('mode', '')} {summary.get('policy', '')}: "
                      f"attainment {summary.get('slo_attainment')}")
    ax_ttft.legend()
    per_instance = summary.get("per_instance") or []
    if per_instance:
        names = [p["instance_id"] for p in per_instance]
        key = "busy_s" if "busy_s" in per_instance[0] else "requests"
        ax_inst.bar(names, [p[key] for p in per_instance])
        ax_inst.set_ylabel(key)
        ax_inst.tick_params(axis="x", rotation=90)
        ax_inst.set_title(f"load imbalance {summary.get('load_imbalance')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_capacity(result: Mapping[str, Any], path: str | Path) -> Path:
    """Left: SLO attainment against rate for every policy (the probes of the search).
    Right: effective capacity per policy against the ideal bound."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    policies: Mapping[str, Any] = result["policies"]
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in policies.items():
        probes = sorted((p["rate"], p["slo_attainment"] or 0.0) for p in entry.get("probes", []))
        if probes:
            ax_curve.plot([p[0] for p in probes], [p[1] for p in probes], marker="o", label=name)
    ax_curve.axhline(result.get("target", 0.9), color="grey", linestyle="--")
    ax_curve.set_xlabel("request rate (req/s)")
    ax_curve.set_ylabel("TTFT SLO attainment (lower bound if stopped early)")
    ax_curve.set_ylim(0, 1.02)
    ax_curve.legend(fontsize=8)
    names = list(policies)
    ax_bar.bar(names, [policies[n]["effective_capacity_rps"] or 0.0 for n in names])
    bound = result.get("ideal_bound_rps")
    if bound:
        ax_bar.axhline(bound, color="red", linestyle="--", label=f"ideal bound {bound:.1f}")
        ax_bar.legend()
    ax_bar.set_ylabel("effective capacity (req/s)")
    ax_bar.tick_params(axis="x", rotation=45)
    ax_bar.set_title(f"{result.get('trace_format')} x{result.get('instances')} "
                     f"{result.get('profile')} SLO {result.get('slo_ttft_s')} s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
