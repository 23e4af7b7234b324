"""Scorers of the routing pipeline: each rates instances in [0, 1], higher is better.

Scorers that need state (cache view, load board, TTFT model) read it from the pipeline
policy they are built for (``router.policy.pipeline.PipelinePolicy``).
"""

from __future__ import annotations

from collections.abc import Mapping


def lower_is_better(values: Mapping[str, float]) -> dict[str, float]:
    """Scores ``1 - value / max`` (the largest value scores 0; all 1 if every value is 0)."""
    if not values:
        return {}
    top = max(values.values())
    if top <= 0:
        return dict.fromkeys(values, 1.0)
    return {key: 1.0 - value / top for key, value in values.items()}
