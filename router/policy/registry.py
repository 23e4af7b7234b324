"""Policies and pipeline plugins by name, and building them from declarative config.

``build_policy("dualmap", slo_ttft_s=2.0)`` builds a named policy; ``policy_from_config``
accepts either form::

    {"policy": "dualmap", "params": {"slo_ttft_s": 2.0}}

    {"name": "cache_then_load",                     # optional
     "filters": ["healthy"],
     "scorers": [{"name": "prefix_cache", "weight": 2.0},
                 {"name": "pending_tokens", "weight": 1.0}],
     "picker": "max_score",                          # or {"name": "max_score"}
     "params": {"cache_capacity_tokens": 440000}}    # shared state (PipelinePolicy)

Unknown names, unknown parameters and malformed config raise ``ValueError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from router.policy.base import TrackedPolicy
from router.policy.cache_aware import CacheAwarePolicy
from router.policy.consistent_hash import ConsistentHashPolicy
from router.policy.dualmap import DualMapPolicy
from router.policy.filters.healthy import HealthyFilter
from router.policy.interfaces import Filter, Picker, RoutingPolicy, Scorer
from router.policy.least_loaded import LeastLoadedPolicy
from router.policy.llumnix import LlumnixPolicy
from router.policy.pickers.max_score import MaxScorePicker
from router.policy.pipeline import PipelinePolicy
from router.policy.power_of_two import PowerOfTwoPolicy
from router.policy.round_robin import RoundRobinPolicy
from router.policy.scorers.kv_free import KVFreeScorer
from router.policy.scorers.pending_tokens import PendingTokensScorer
from router.policy.scorers.predicted_ttft import PredictedTTFTScorer
from router.policy.scorers.prefix_cache import PrefixCacheScorer
from router.policy.scorers.queue_depth import QueueDepthScorer

POLICY_NAMES = (
    "round_robin",
    "least_loaded",
    "power_of_two",
    "consistent_hash",
    "cache_aware",
    "llumnix",
    "dualmap",
    "dualmap_no_slo",
)

_POLICIES: dict[str, tuple[type[TrackedPolicy], dict[str, Any]]] = {
    "round_robin": (RoundRobinPolicy, {}),
    "least_loaded": (LeastLoadedPolicy, {}),
    "power_of_two": (PowerOfTwoPolicy, {}),
    "consistent_hash": (ConsistentHashPolicy, {}),
    "cache_aware": (CacheAwarePolicy, {}),
    "llumnix": (LlumnixPolicy, {}),
    "dualmap": (DualMapPolicy, {}),
    "dualmap_no_slo": (DualMapPolicy, {"slo_aware": False}),
}

FILTERS: dict[str, Callable[[PipelinePolicy], Filter]] = {
    "healthy": lambda policy: HealthyFilter(),
}
SCORERS: dict[str, Callable[[PipelinePolicy], Scorer]] = {
    "prefix_cache": PrefixCacheScorer,
    "pending_tokens": PendingTokensScorer,
    "queue_depth": QueueDepthScorer,
    "kv_free": lambda policy: KVFreeScorer(),
    "predicted_ttft": PredictedTTFTScorer,
}
PICKERS: dict[str, Callable[[Mapping[str, float]], Picker]] = {
    "max_score": MaxScorePicker,
}


def _reject_unknown(params: Mapping[str, Any], accepted: frozenset[str], what: str) -> None:
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"unknown parameter(s) for {what}: {', '.join(unknown)}; "
                         f"accepted: {', '.join(sorted(accepted))}")


def accepted_params(name: str) -> frozenset[str]:
    """Parameter names ``build_policy(name, ...)`` accepts; ``ValueError`` if unknown."""
    entry = _POLICIES.get(name)
    if entry is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    cls, fixed = entry
    return frozenset(set(inspect.signature(cls).parameters) - set(fixed))


def build_policy(name: str, **params: Any) -> RoutingPolicy:
    """A fresh policy by name (one of ``POLICY_NAMES``); ``ValueError`` if unknown."""
    entry = _POLICIES.get(name)
    if entry is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    cls, fixed = entry
    _reject_unknown(params, accepted_params(name), f"policy {name!r}")
    return cls(**fixed, **params)


def _plugin_name(spec: Any, kind: str) -> tuple[str, Mapping[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return spec["name"], spec
    raise ValueError(f"{kind} entry must be a name or a mapping with 'name': {spec!r}")


def _lookup(table: Mapping[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def policy_from_config(config: Mapping[str, Any]) -> RoutingPolicy:
    """A policy from declarative config (named or pipeline form, see the module docstring)."""
    if not isinstance(config, Mapping):
        raise ValueError("policy config must be a mapping")
    params = config.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError("'params' must be a mapping")
    if "policy" in config:
        extra = sorted(set(config) - {"policy", "params"})
        if extra:
            raise ValueError(f"unexpected key(s) beside 'policy': {', '.join(extra)}")
        return build_policy(str(config["policy"]), **params)
    extra = sorted(set(config) - {"name", "filters", "scorers", "picker", "params"})
    if extra:
        raise ValueError(f"unexpected key(s) in pipeline config: {', '.join(extra)}")
    if "scorers" not in config or "picker" not in config:
        raise ValueError("a pipeline config needs 'scorers' and 'picker' (or use 'policy')")
    accepted = frozenset(set(inspect.signature(PipelinePolicy).parameters) - {"name"})
    _reject_unknown(params, accepted, "pipeline")
    policy = PipelinePolicy(name=str(config.get("name", "pipeline")), **params)
    filters = []
    for spec in config.get("filters", ["healthy"]):
        name, _ = _plugin_name(spec, "filter")
        filters.append(_lookup(FILTERS, name, "filter")(policy))
    scorers: list[Scorer] = []
    weights: dict[str, float] = {}
    for spec in config["scorers"]:
        name, options = _plugin_name(spec, "scorer")
        scorers.append(_lookup(SCORERS, name, "scorer")(policy))
        weight = options.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"scorer {name!r} weight must be a non-negative number")
        weights[name] = float(weight)
    picker_name, _ = _plugin_name(config["picker"], "picker")
    picker = _lookup(PICKERS, picker_name, "picker")(weights)
    policy.configure(filters, scorers, picker)
    return policy
