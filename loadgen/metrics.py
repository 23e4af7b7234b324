"""Per-request outcomes and the summary JSON shared by the simulator and the live runner.

Both ``llmfleet sim`` and ``llmfleet loadgen`` describe a run with the same fields, computed
here from one ``RequestOutcome`` per request, so a simulated and a measured run can be set
side by side (DESIGN.md's CLI contract names the fields).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Percentiles at which TTFT is reported as a curve (for CDF plots and sim-vs-live comparison).
QUANTILE_POINTS = tuple(range(0, 101, 5))


@dataclass
class RequestOutcome:
    """What happened to one request. Times are seconds on the run's clock (virtual or wall).

    ``ttft_s``/``e2e_s`` are None when the first token/the end never came (error, timeout,
    or a simulation stopped early); such requests count as SLO misses. ``cached_tokens`` is
    the prompt tokens served from the prefix cache when the server reported it.
    """

    request_id: str
    arrival_s: float
    prompt_len: int
    target_output_len: int
    instance_id: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None
    inter_token_s: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.e2e_s is not None and self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets_slo(self, slo_ttft_s: float, slo_tpot_s: float | None) -> bool:
        if not self.finished or self.ttft_s is None or self.ttft_s > slo_ttft_s:
            return False
        if slo_tpot_s is None:
            return True
        tpot = self.tpot_s
        return tpot is None or tpot <= slo_tpot_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def imbalance(values: Sequence[float]) -> float | None:
    """max / mean of per-instance quantities: 1.0 is perfect balance, N means one of N
    instances did everything. None when there is nothing to compare."""
    if not values:
        return None
    mean = float(np.mean(values))
    if mean <= 0:
        return None
    return float(np.max(values)) / mean


def _rounded(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def summarize(
    outcomes: Sequence[RequestOutcome],
    *,
    slo_ttft_s: float,
    slo_tpot_s: float | None = None,
    warmup_requests: int = 0,
    wall_seconds: float = 0.0,
) -> dict[str, Any]:
    """The common summary of a run.

    The first ``warmup_requests`` requests by arrival are excluded from the latency,
    attainment and hit-rate statistics (they ran into an empty, cold cluster) but still
    count in ``requests``/``completed``/``errors``. ``slo_attainment`` is the fraction of
    measured requests that finished with TTFT <= ``slo_ttft_s`` (and TPOT <= ``slo_tpot_s``
    when given); failed and unfinished requests count as misses. ``throughput_rps`` is
    finished requests over the span from the first arrival to the last completion;
    ``goodput_rps`` counts only SLO-meeting measured requests over the same span.
    ``cache_hit_rate`` is cached prompt tokens over prompt tokens of measured requests whose
    cached count is known (None when no server reported it). ``ttft_quantiles`` lists the
    TTFT at percentiles ``QUANTILE_POINTS`` (0, 5, ..., 100).
    """
    ordered = sorted(outcomes, key=lambda o: (o.arrival_s, o.request_id))
    measured = ordered[warmup_requests:]
    finished = [o for o in ordered if o.finished]
    first_arrival = ordered[0].arrival_s if ordered else 0.0
    last_end = max(
        (o.arrival_s + o.e2e_s for o in finished if o.e2e_s is not None), default=first_arrival
    )
    span = last_end - first_arrival
    ttfts = [o.ttft_s for o in measured if o.ttft_s is not None and o.finished]
    tpots = [t for o in measured if o.finished and (t := o.tpot_s) is not None]
    e2es = [o.e2e_s for o in measured if o.e2e_s is not None and o.finished]
    itls = [gap for o in measured for gap in o.inter_token_s]
    good = sum(1 for o in measured if o.meets_slo(slo_ttft_s, slo_tpot_s))
    known_cache = [o for o in measured if o.cached_tokens is not None and o.finished]
    prompt_known = sum(o.prompt_len for o in known_cache)
    output_tokens = sum(o.output_tokens for o in finished)
    input_tokens = sum(o.prompt_len for o in finished)
    return {
        "requests": len(ordered),
        "completed": len(finished),
        "errors": sum(1 for o in ordered if o.error is not None),
        "unfinished": sum(1 for o in ordered if o.e2e_s is None and o.error is None),
        "measured_requests": len(measured),
        "warmup_requests": min(warmup_requests, len(ordered)),
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_s": slo_tpot_s,
        "slo_attainment": _rounded(good / len(measured)) if measured else None,
        "goodput_rps": _rounded(good / span) if span > 0 else None,
        "ttft_mean": _rounded(float(np.mean(ttfts))) if ttfts else None,
        "ttft_p50": _rounded(percentile(ttfts, 50)),
        "ttft_p90": _rounded(percentile(ttfts, 90)),
        "ttft_p99": _rounded(percentile(ttfts, 99)),
        "tpot_p50": _rounded(percentile(tpots, 50)),
        "tpot_p90": _rounded(percentile(tpots, 90)),
        "tpot_p99": _rounded(percentile(tpots, 99)),
        "itl_p50": _rounded(percentile(itls, 50)),
        "itl_p99": _rounded(percentile(itls, 99)),
        "e2e_p50": _rounded(percentile(e2es, 50)),
        "e2e_p90": _rounded(percentile(e2es, 90)),
        "e2e_p99": _rounded(percentile(e2es, 99)),
        "throughput_rps": _rounded(len(finished) / span) if span > 0 else None,
        "input_tokens_per_s": _rounded(input_tokens / span) if span > 0 else None,
        "output_tokens_per_s": _rounded(output_tokens / span) if span > 0 else None,
        "cache_hit_rate": (
            _rounded(sum(o.cached_tokens or 0 for o in known_cache) / prompt_known)
            if prompt_known > 0 else None
        ),
        "ttft_quantiles": (
            [_rounded(float(q)) for q in np.percentile(ttfts, QUANTILE_POINTS)] if ttfts else []
        ),
        "duration_s": _rounded(span),
        "wall_seconds": round(wall_seconds, 3),
    }


# What every sim and loadgen summary reports of it.
FOLLOWUP_FIELDS = ("followups", "followup_colocation", "followup_colocation_tokens")


def followup_colocation(
    requests: Sequence[Any], served_by: Mapping[str, str | None],
    records: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Follow-up co-location of a run: over turns ``k >= 1`` of every session whose turn
    ``k - 1`` was served too, the share served by the same replica (``followup_colocation``)
    and the same weighted by the previous turn's prompt tokens, the prefix the two share
    (``followup_colocation_tokens``). With ``records`` (``recording_factory``), the turns
    that moved are broken down by why in ``moved_reasons`` (``records``: request id -> an object
    with the decision's ``reason``, ``candidates`` and ``key_hash``, as
    ``loadgen.affinity_experiment`` records them). ``requests`` are ``TraceRequest``s: a
    session's turns carry ``session_id`` and ``turn``; traces without sessions have no
    follow-ups (None)."""
    by_session: dict[str, list[Any]] = {}
    for request in requests:
        if request.session_id is not None:
            by_session.setdefault(request.session_id, []).append(request)
    turns = same = 0
    tokens = same_tokens = 0
    moved: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for session in by_session.values():
        session.sort(key=lambda r: r.turn)
        for previous, current in itertools.pairwise(session):
            if current.turn != previous.turn + 1:
                continue
            before, now = served_by.get(previous.request_id), served_by.get(current.request_id)
            if before is None or now is None:
                continue
            shared = min(previous.prompt_len, current.prompt_len)
            turns += 1
            tokens += shared
            record = records.get(current.request_id) if records is not None else None
            if record is not None:
                reasons[record.reason] += 1
            if before == now:
                same += 1
                same_tokens += shared
                continue
            if record is None:
                continue
            if record.reason != "affinity":
                moved[record.reason] += 1
            elif before not in record.candidates:
                prev = records.get(previous.request_id) if records is not None else None
                changed = prev is not None and prev.key_hash != record.key_hash
                moved["key_moved" if changed else "not_a_home"] += 1
            else:
                moved["affinity_pick"] += 1
    return {
        "followups": turns,
        "followup_colocation": round(same / turns, 4) if turns else None,
        "followup_colocation_tokens": round(same_tokens / tokens, 4) if tokens else None,
        "followup_reasons": dict(sorted(reasons.items())),
        "moved_reasons": dict(sorted(moved.items())),
    }
