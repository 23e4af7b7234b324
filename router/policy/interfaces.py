"""Interfaces of the routing policy pipeline (llm-d shape: filters → scorers → picker).

Policies are pure: they receive the request, a snapshot of cluster state and the current
time, and return a ``Decision``. They never read the wall clock and never do I/O, so the
gateway and the simulator run the very same objects. Policies may keep internal state
(approximate cache views, learned prefill speed, in-flight load); that state changes only
through the ``on_*`` feedback hooks, which the gateway and the simulator both call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class InstanceView:
    """One replica as the router sees it: registry facts plus the last load report."""

    instance_id: str
    url: str = ""
    healthy: bool = True
    draining: bool = False
    weight: float = 1.0  # relative capacity; rings give it proportionally many virtual nodes
    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0  # engine-reported uncached prompt tokens not yet prefilled
    kv_usage: float = 0.0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    report_time: float = 0.0  # when the load report was taken (router clock)


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every replica the router may use, sorted by ``instance_id``, at ring ``epoch``."""

    epoch: int
    instances: tuple[InstanceView, ...]

    def by_id(self) -> dict[str, InstanceView]:
        return {i.instance_id: i for i in self.instances}


@dataclass(frozen=True)
class RoutingRequest:
    """What routing knows of a request: its prompt token ids and output budget.

    ``token_ids`` may be a list or an integer numpy array; an int32 array is the fast form
    (policies hash tokens as int32 bytes, and a list of 8k ints costs ~50 µs to convert).
    """

    request_id: str
    token_ids: Sequence[int] | npt.NDArray[np.integer]
    max_tokens: int = 16


class Decision(NamedTuple):
    """Where a request goes and why (``reason`` is counted in the gateway's /metrics).

    A named tuple rather than a frozen dataclass: one is built per decision, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) cost ~1 µs of the budget.
    """

    instance_id: str
    reason: str  # affinity | slo_fallback | load | rebalance | round_robin | hash | ...
    candidates: tuple[str, ...] = ()
    predicted_ttft_s: float | None = None
    cached_tokens_estimate: int = 0


class NoInstanceAvailable(Exception):
    """Raised by ``route`` when no healthy, non-draining instance exists."""


@dataclass
class ScoredInstances:
    """Working set passed along the pipeline: the candidates and their scores by name."""

    instances: list[InstanceView]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # scorer -> id -> score


class Filter(ABC):
    """Drops instances a request must not go to."""

    @abstractmethod
    def filter(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> list[InstanceView]: ...


class Scorer(ABC):
    """Scores each instance in [0, 1]; higher is better."""

    name: str

    @abstractmethod
    def score(
        self, request: RoutingRequest, instances: list[InstanceView], now: float
    ) -> dict[str, float]: ...


class Picker(ABC):
    """Chooses one instance from scored candidates."""

    @abstractmethod
    def pick(self, request: RoutingRequest, scored: ScoredInstances, now: float) -> Decision: ...


class RoutingPolicy(ABC):
    """A complete routing policy. Implementations live one per module in ``router.policy``."""

    name: str = "abstract"

    @abstractmethod
    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        """Choose an instance; raise ``NoInstanceAvailable`` if there is none."""

    def adopt(self, snapshot: ClusterSnapshot) -> None:
        """Take in a new snapshot ahead of the next decision.

        Whatever is O(instances) about a new snapshot (arrays of load, ring membership) is
        done here, so a caller that refreshes cluster state on its own schedule (the
        gateway's refresh loop) keeps it off the decision path. ``route`` adopts a snapshot
        it has not seen itself, so calling this is never required. Never raises for an
        empty or unroutable fleet (``route`` does).
        """

    def on_dispatched(self, request: RoutingRequest, decision: Decision, now: float) -> None:
        """The request was sent to ``decision.instance_id`` (update cache view, load)."""

    def on_first_token(
        self, request_id: str, instance_id: str, ttft_s: float, cached_tokens: int | None,
        now: float,
    ) -> None:
        """The first token arrived (learn prefill speed; prefill load is gone)."""

    def on_finished(self, request_id: str, instance_id: str, now: float) -> None:
        """The request ended, successfully or not."""
