"""Helpers that drive an EngineCore in virtual time for the engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from instances.engine.core import EngineCore
from instances.engine.types import EngineRequest, SamplingParams, TokenEvent


@dataclass
class DriveLog:
    """What a virtual-time run produced, per request id."""

    outputs: dict[str, list[int]] = field(default_factory=dict)
    first_token_time: dict[str, float] = field(default_factory=dict)
    finish_time: dict[str, float] = field(default_factory=dict)
    finish_reason: dict[str, str | None] = field(default_factory=dict)
    cached_tokens: dict[str, int] = field(default_factory=dict)
    num_steps: int = 0
    end_time: float = 0.0


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 8,
    temperature: float = 0.0,
    seed: int | None = None,
) -> EngineRequest:
    return EngineRequest(
        request_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
    )


def run_until_idle(
    core: EngineCore,
    requests: Sequence[EngineRequest] = (),
    start_time: float = 0.0,
    max_steps: int = 100_000,
    log: DriveLog | None = None,
) -> DriveLog:
    """Add ``requests`` at ``start_time`` and step until the core is idle."""
    log = log or DriveLog()
    for request in requests:
        core.add_request(request)
        log.outputs.setdefault(request.request_id, [])
    now = start_time
    steps = 0
    while core.has_unfinished_requests():
        result = core.step(now)
        now += result.duration_s
        steps += 1
        record_events(log, result.events, now)
        assert steps <= max_steps, "engine did not finish in time"
    log.num_steps += steps
    log.end_time = now
    return log


def record_events(log: DriveLog, events: Sequence[TokenEvent], now: float) -> None:
    for event in events:
        log.outputs.setdefault(event.request_id, []).extend(event.new_token_ids)
        if event.new_token_ids and event.request_id not in log.first_token_time:
            log.first_token_time[event.request_id] = now
            log.cached_tokens[event.request_id] = event.num_cached_tokens
        if event.finished:
            log.finish_time[event.request_id] = now
            log.finish_reason[event.request_id] = event.finish_reason
