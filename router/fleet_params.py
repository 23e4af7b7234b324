"""Policy parameters that come from the fleet itself, as an operator would set them.

A routing policy predicts TTFT and sizes its cache views better when told the TTFT SLO, the
replicas' prefill cost per token and their KV capacity. The gateway (``llmfleet up``,
``llmfleet gateway``) and the simulator derive them the same way, here, from the hardware
profile of the replicas; a policy receives only the ones it accepts, and explicit
``--policy-param`` values win.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proto.defaults import DEFAULT_PROFILE
from proto.profiles import profile_fields
from router.policy.interfaces import RoutingPolicy
from router.policy.registry import accepted_params, build_policy


def fleet_policy_params(
    slo_ttft_s: float,
    profile: str | None = None,
    num_gpu_blocks: int | None = None,
    block_size: int = 16,
) -> dict[str, Any]:
    """The fleet-derived parameters for replicas of hardware ``profile``."""
    hardware = profile_fields(profile or DEFAULT_PROFILE)
    capacity = num_gpu_blocks * block_size if num_gpu_blocks else int(
        hardware["kv_capacity_tokens"])
    return {
        "slo_ttft_s": slo_ttft_s,
        "prefill_s_per_token": float(hardware["prefill_s_per_token"]),
        "cache_capacity_tokens": capacity,
        "cache_block_size": block_size,
    }


def build_fleet_policy(
    name: str, fleet_params: Mapping[str, Any], explicit: Mapping[str, Any] | None = None
) -> RoutingPolicy:
    """``build_policy(name)`` with the fleet parameters it accepts, then ``explicit`` ones
    (which are checked: an unknown explicit parameter is a ``ValueError``)."""
    accepted = accepted_params(name)
    params = {k: v for k, v in fleet_params.items() if k in accepted}
    params.update(explicit or {})
    return build_policy(name, **params)
