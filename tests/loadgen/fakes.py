"""Small engine cores and policies with known behaviour, for testing the simulator alone."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from instances.engine.types import (
    EngineRequest,
    EngineStats,
    StepResult,
    TokenEvent,
)
from loadgen.config import RunConfig
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    NoInstanceAvailable,
    RoutingPolicy,
    RoutingRequest,
)


class ConstantServiceEngine:
    """Serves one request at a time, FIFO; each request takes exactly ``service_s`` and
    produces all its tokens at the end (so TTFT = queueing delay + service_s)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.queue: deque[EngineRequest] = deque()
        # The request of the step in flight counts as running until the next step() call.
        self.in_service: EngineRequest | None = None

    def add_request(self, request: EngineRequest) -> None:
        self.queue.append(request)

    def abort_request(self, request_id: str) -> None:
        self.queue = deque(r for r in self.queue if r.request_id != request_id)

    def step(self, now: float) -> StepResult:
        self.in_service = None
        if not self.queue:
            return StepResult(duration_s=0.0, events=())
        request = self.in_service = self.queue.popleft()
        tokens = tuple(7 for _ in range(request.params.max_tokens))
        event = TokenEvent(request.request_id, tokens, True, "length",
                           len(request.prompt_token_ids), 0)
        return StepResult(duration_s=self.service_s, events=(event,),
                          num_prefill_tokens=len(request.prompt_token_ids))

    def stats(self) -> EngineStats:
        running = 0 if self.in_service is None else 1
        return EngineStats(running, len(self.queue), 0.0, 100, 100, 16, 0, 0, 0, 0)

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue) or self.in_service is not None


@dataclass
class _Running:
    request: EngineRequest
    produced: int = 0


@dataclass
class BatchingEngine:
    """Continuous batching in miniature: each step prefills waiting requests whole (FIFO, up to
    ``token_budget`` uncached tokens, at least one request) and decodes one token for every
    running request. An infinite block-level prefix cache makes repeated prefixes free.
    ``duration = floor_s + prefill_s_per_token * uncached + decode_s_per_seq * decoding``."""

    floor_s: float = 0.005
    prefill_s_per_token: float = 1e-5
    decode_s_per_seq: float = 1e-4
    token_budget: int = 8192
    block_size: int = 16
    waiting: deque[EngineRequest] = field(default_factory=deque)
    running: list[_Running] = field(default_factory=list)
    cached: set[tuple[int, ...]] = field(default_factory=set)
    queries: int = 0
    hits: int = 0

    def add_request(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        self.running = [r for r in self.running if r.request.request_id != request_id]

    def _cached_prefix(self, tokens: list[int]) -> int:
        hit = 0
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            if tuple(tokens[:end]) not in self.cached:
                break
            hit = end
        return min(hit, len(tokens) - 1)

    def step(self, now: float) -> StepResult:
        events: list[TokenEvent] = []
        decoding = 0
        for run in list(self.running):
            run.produced += 1
            decoding += 1
            done = run.produced >= run.request.params.max_tokens
            events.append(TokenEvent(run.request.request_id, (1,), done,
                                     "length" if done else None,
                                     len(run.request.prompt_token_ids), 0))
            if done:
                self.running.remove(run)
        uncached_total = 0
        while self.waiting:
            tokens = self.waiting[0].prompt_token_ids
            cached = self._cached_prefix(tokens)
            uncached = len(tokens) - cached
            if uncached_total and uncached_total + uncached > self.token_budget:
                break
            request = self.waiting.popleft()
            uncached_total += uncached
            self.queries += len(tokens)
            self.hits += cached
            for end in range(self.block_size, len(tokens) + 1, self.block_size):
                self.cached.add(tuple(tokens[:end]))
            done = request.params.max_tokens <= 1
            events.append(TokenEvent(request.request_id, (1,), done,
                                     "length" if done else None, len(tokens), cached))
            if not done:
                self.running.append(_Running(request, produced=1))
        if not events:
            return StepResult(0.0, ())
        duration = (self.floor_s + self.prefill_s_per_token * uncached_total
                    + self.decode_s_per_seq * decoding)
        return StepResult(duration, tuple(events), uncached_total, decoding)

    def stats(self) -> EngineStats:
        waiting_tokens = sum(len(r.prompt_token_ids) for r in self.waiting)
        return EngineStats(len(self.running), len(self.waiting), 0.0, 1000, 1000,
                           self.block_size, waiting_tokens, self.queries, self.hits, 0)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)


class RoundRobin(RoutingPolicy):
    """Cycles through healthy instances in snapshot order."""

    name = "test_round_robin"

    def __init__(self) -> None:
        self.next_index = 0
        self.calls: list[str] = []

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        usable = [i for i in snapshot.instances if i.healthy and not i.draining]
        if not usable:
            raise NoInstanceAvailable("none")
        choice = usable[self.next_index % len(usable)]
        self.next_index += 1
        return Decision(choice.instance_id, "round_robin")

    def on_dispatched(self, request: RoutingRequest, decision: Decision, now: float) -> None:
        self.calls.append(f"dispatch:{request.request_id}")

    def on_first_token(self, request_id: str, instance_id: str, ttft_s: float,
                       cached_tokens: int | None, now: float) -> None:
        self.calls.append(f"first:{request_id}")

    def on_finished(self, request_id: str, instance_id: str, now: float) -> None:
        self.calls.append(f"finished:{request_id}")


class LeastWaiting(RoutingPolicy):
    """Picks the instance with the fewest running + waiting requests in the snapshot."""

    name = "test_least_waiting"

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        best = min(snapshot.instances, key=lambda i: (i.num_running + i.num_waiting,
                                                      i.instance_id))
        return Decision(best.instance_id, "load")


def constant_engines(service_s: float):  # type: ignore[no-untyped-def]
    def factory(instance_id: str, index: int, config: RunConfig) -> ConstantServiceEngine:
        return ConstantServiceEngine(service_s)
    return factory


def batching_engines(instance_id: str, index: int, config: RunConfig) -> BatchingEngine:
    return BatchingEngine()
