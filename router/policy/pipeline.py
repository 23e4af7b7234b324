"""A routing policy composed of pipeline plugins (llm-d shape: filters → scorers → picker).

``PipelinePolicy`` runs its filters in order, asks each scorer for scores in [0, 1] of the
instances left, and lets the picker choose. It keeps the same state as DualMap (load board,
cache view, learned TTFT model) for the scorers to read, fed by the usual hooks. Plugins
come from declarative config through ``router.policy.registry.policy_from_config``.

Scoring visits every instance left after filtering (Python loops over dicts, as llm-d's
scorers do over pods): flexible, but O(N) per decision; the named policies have their own
vectorised or O(1) paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from proto.defaults import DEFAULT_CACHE_CAPACITY_TOKENS, DEFAULT_PREFILL_S_PER_TOKEN
from router.policy.cache_tracking import CacheTrackingPolicy
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    Filter,
    NoInstanceAvailable,
    Picker,
    RoutingRequest,
    ScoredInstances,
    Scorer,
)


class PipelinePolicy(CacheTrackingPolicy):
    """Filters, scorers and a picker over the shared router state (see the module docstring).

    Build it, then ``configure`` the plugins (scorers are built with the policy they read).
    """

    def __init__(
        self,
        name: str = "pipeline",
        cache_block_size: int = 16,
        cache_capacity_tokens: int = DEFAULT_CACHE_CAPACITY_TOKENS,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        learning_decay: float = 0.95,
    ) -> None:
        super().__init__(cache_block_size, cache_capacity_tokens, prefill_s_per_token,
                         learning_decay)
        self.name = name
        self.filters: list[Filter] = []
        self.scorers: list[Scorer] = []
        self.picker: Picker | None = None

    def configure(self, filters: Sequence[Filter], scorers: Sequence[Scorer],
                  picker: Picker) -> None:
        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scorers: {names}")
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        if self.picker is None:
            raise RuntimeError("pipeline not configured")
        self.sync(snapshot)
        instances = list(snapshot.instances)
        for plugin in self.filters:
            instances = plugin.filter(request, instances, now)
        if not instances:
            raise NoInstanceAvailable("every instance was filtered out")
        scored = ScoredInstances(instances)
        for scorer in self.scorers:
            scored.scores[scorer.name] = scorer.score(request, instances, now)
        return self.picker.pick(request, scored, now)
