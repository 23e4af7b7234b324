"""Router-side admission: LAPS queues between the routing decision and forwarding, spatial
pools, and hotspot rebalancing of queued requests (see ``docs/admission.md``).

``build_admission(mode, **params)`` makes the object for ``--admission none|laps|laps-spatial``;
the gateway and the simulator call it the same way (``interfaces.Admission``).
"""

from __future__ import annotations

from typing import Any

from router.admission.interfaces import (
    LONG,
    SHORT,
    Admission,
    ControlAction,
    NotQueued,
    Release,
)
from router.admission.laps import LapsAdmission
from router.admission.passthrough import PassThroughAdmission
from router.admission.spatial import SpatialLapsAdmission

ADMISSION_MODES = ("none", "laps", "laps-spatial")

__all__ = ["ADMISSION_MODES", "LONG", "SHORT", "Admission", "ControlAction", "NotQueued",
           "Release", "admission_defaults", "build_admission"]


def admission_defaults(slo_ttft_s: float, max_num_batched_tokens: int = 8192) -> dict[str, Any]:
    """Parameters derived from the fleet, as ``fleet_policy_params`` does for policies: a
    budget of two engine iterations of prefill in flight per instance (the engine never runs
    dry between releases), longs promoted over shorts after a third of the SLO, every
    request released by the SLO at the latest in ``fifo`` order (holding it longer cannot
    help it), and in ``goodput`` order the SLO that decides which requests can still make
    it, deferred ones released into at most one engine iteration of prefill in flight, and
    by 10 x the SLO at the latest."""
    return {
        "budget_tokens": 2 * max_num_batched_tokens,
        "long_age_s": slo_ttft_s / 3.0,
        "max_wait_s": slo_ttft_s,
        "slo_ttft_s": slo_ttft_s,
        "defer_max_s": 10.0 * slo_ttft_s,
        "deferred_budget_tokens": max_num_batched_tokens,
    }


def build_admission(mode: str, **params: Any) -> Admission:
    """The admission object for ``mode`` (``none`` takes no parameters)."""
    if mode == "none":
        if params:
            raise ValueError(f"admission 'none' takes no parameters, got {sorted(params)}")
        return PassThroughAdmission()
    if mode == "laps":
        return LapsAdmission(**params)
    if mode == "laps-spatial":
        return SpatialLapsAdmission(**params)
    raise ValueError(f"unknown admission mode {mode!r}; choose from {ADMISSION_MODES}")
