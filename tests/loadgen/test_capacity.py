"""Capacity search: bisection over rate on attainment, checked on systems with known answers."""

from __future__ import annotations

import pytest

from loadgen.capacity import capacity_for_policy, find_capacity
from loadgen.config import RunConfig
from loadgen.request import Segment, TraceRequest, segment_key
from tests.loadgen.fakes import RoundRobin, constant_engines


@pytest.mark.parametrize("initial_rate", [0.5, 7.0, 100.0])
def test_find_capacity_on_a_step_function(initial_rate: float) -> None:
    calls: list[float] = []

    def attainment(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= 7.3 else 0.5

    search = find_capacity(attainment, initial_rate=initial_rate, rel_tol=0.001)
    assert 7.3 * 0.999 <= search.capacity_rps <= 7.3
    assert 7.3 < search.upper_rps <= 7.3 * 1.002
    assert [r for r, _ in search.probes] == calls


def test_find_capacity_reports_zero_when_nothing_passes() -> None:
    search = find_capacity(lambda rate: 0.0, initial_rate=1.0, min_rate=0.01)
    assert search.capacity_rps == 0.0
    assert search.upper_rps == pytest.approx(0.01, rel=0.02)


def _evenly_spaced(count: int) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", float(i), 16, 1, segments=(Segment(segment_key(i), 16),))
            for i in range(count)]


def _toy_capacity(instances: int, service_s: float, slo_s: float) -> float:
    config = RunConfig(instances=instances, slo_ttft_s=slo_s, policy="rr")
    search, at_capacity = capacity_for_policy(
        config, requests=_evenly_spaced(400), initial_rate=1.0, rel_tol=0.005, max_probes=40,
        engine_factory=constant_engines(service_s), policy_factory=lambda c: RoundRobin(),
    )
    assert at_capacity is not None and at_capacity["slo_attainment"] >= 0.9
    return search.capacity_rps


def test_capacity_of_round_robin_over_deterministic_servers() -> None:
    # 2 FIFO servers, 0.1 s per request, evenly spaced arrivals, SLO 0.15 s, 400 requests.
    # Below 20 rps nobody queues. Above it, request k on a server (k < 200) has TTFT
    # 0.1 + k * (0.1 - 2 / rate); 90 % pass while k = 179 does: rate <= 2 / (0.1 - 0.05/179).
    known = 2.0 / (0.1 - 0.05 / 179)
    capacity = _toy_capacity(2, 0.1, 0.15)
    assert known * 0.99 <= capacity <= known


def test_capacity_is_monotone_in_slo_and_fleet_size() -> None:
    tight = _toy_capacity(2, 0.1, 0.12)
    loose = _toy_capacity(2, 0.1, 0.5)
    bigger = _toy_capacity(3, 0.1, 0.12)
    assert tight <= loose
    assert bigger > tight
    assert bigger == pytest.approx(1.5 * tight, rel=0.03)


def test_capacity_warnings_flag_results_above_the_ideal_bound() -> None:
    from loadgen.cli import capacity_warnings

    result = {"ideal_bound_rps": 100.0, "requests": 2001, "policies": {
        "steady": {"effective_capacity_rps": 80.0, "e2e_p90": 2.0},    # span 25 s = 12.5 E2E
        "bursty": {"effective_capacity_rps": 400.0, "e2e_p90": 2.0},   # above bound, span 5 s
        "failed": {"effective_capacity_rps": None},
    }}
    warnings = capacity_warnings(result)
    assert len(warnings) == 2 and all(w.startswith("bursty") for w in warnings)
    assert result["policies"]["steady"]["exceeds_ideal_bound"] is False
    assert result["policies"]["steady"]["span_over_e2e_p90"] == 12.5
    assert result["policies"]["bursty"]["exceeds_ideal_bound"] is True
    assert "exceeds_ideal_bound" not in result["policies"]["failed"]
