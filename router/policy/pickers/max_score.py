"""Max-score picker: the instance with the highest weighted sum of scores."""

from __future__ import annotations

from collections.abc import Mapping

from router.policy.interfaces import Decision, Picker, RoutingRequest, ScoredInstances


class MaxScorePicker(Picker):
    """Picks ``argmax Σ weight[scorer] × score`` (ties: lowest instance id); reason ``score``.

    A scorer missing from ``weights`` counts with weight 1.
    """

    name = "max_score"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})

    def pick(self, request: RoutingRequest, scored: ScoredInstances, now: float) -> Decision:
        if not scored.instances:
            raise ValueError("nothing to pick from")
        best_id, best_total = "", float("-inf")
        for view in sorted(scored.instances, key=lambda v: v.instance_id):
            total = sum(
                self.weights.get(name, 1.0) * scores.get(view.instance_id, 0.0)
                for name, scores in scored.scores.items()
            )
            if total > best_total:
                best_id, best_total = view.instance_id, total
        return Decision(best_id, "score", candidates=tuple(v.instance_id for v in scored.instances))
