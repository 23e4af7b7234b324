"""Runs a clock-agnostic ``EngineCore`` in real time on an asyncio loop.

The core only says how long an iteration takes on the emulated device; this driver sleeps
that long (divided by ``speedup``) before releasing the iteration's tokens, so clients see
the device's timing. Deadlines are absolute, so the core's own CPU time does not add drift.
Engine time (what the core's ``step(now)`` receives, and what metrics report) is real time
multiplied by ``speedup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from instances.engine.core import EngineCore
from instances.engine.types import EngineRequest, SamplingParams, StepResult, TokenEvent

# How often an idle-but-unfinished core is polled (e.g. while LAPS holds short prefills to
# batch them): small against the shortest iteration, large enough not to spin.
_IDLE_POLL_S = 0.001
_MAX_CATCH_UP_S = 0.05


@dataclass
class LoopStats:
    """How well the driver keeps to device time (for the real-time fidelity benchmark)."""

    iterations: int = 0
    device_s: float = 0.0  # sum of modelled iteration durations (engine seconds)
    wall_s: float = 0.0  # real seconds the engine was busy iterating
    late_s: float = 0.0  # real seconds by which iterations ended after their deadline
    cpu_s: float = 0.0  # real seconds spent inside core.step

    def slowdown(self, speedup: float) -> float:
        """Busy real time per modelled time, minus one: 0.05 means tokens 5 % late."""
        return self.wall_s * speedup / self.device_s - 1.0 if self.device_s else 0.0


class AsyncEngine:
    """Owns one ``EngineCore`` and the task that steps it; hands tokens to request streams."""

    def __init__(
        self,
        core: EngineCore,
        speedup: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.core = core
        self.speedup = speedup
        self._clock = clock
        self._on_step = on_step  # e.g. publish the step's KV events
        self._t0 = clock()
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loop_stats = LoopStats()

    def engine_now(self) -> float:
        """Engine seconds since start (real seconds × speedup)."""
        return (self._clock() - self._t0) * self.speedup

    def has_request(self, request_id: str) -> bool:
        """True while a request with this id is being generated."""
        return request_id in self._streams

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[TokenEvent, None]:
        """Add a request and yield its token events until it finishes.

        Leaving the iterator early (client gone) aborts the request in the core.
        """
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            arrival_time=self.engine_now(),
        )
        self.core.add_request(request)  # raises ValueError on requests that can never run
        self._streams[request_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finished
                yield event
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.core.abort_request(request_id)
                self._wakeup.set()

    async def _run(self) -> None:
        # Iterations follow an ideal timeline: a busy engine starts each iteration at the
        # previous one's deadline, so sleep overshoot (timer granularity, a busy CPU) is
        # absorbed by the next sleep instead of accumulating into slower tokens. Only when
        # the engine falls more than _MAX_CATCH_UP_S behind does it give up and restart the
        # timeline from now (no bursts of instant iterations after a long stall).
        timeline: float | None = None  # ideal end of the previous iteration while busy
        last_end = 0.0  # real end of the previous iteration
        while True:
            if not self.core.has_unfinished_requests():
                timeline = None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = self._clock()
            continuing = timeline is not None and now - timeline < _MAX_CATCH_UP_S
            start = timeline if continuing and timeline is not None else now
            result = self.core.step(start * self.speedup - self._t0 * self.speedup)
            if self._on_step is not None:
                self._on_step(result)
            cpu_done = self._clock()
            if result.duration_s <= 0 and not result.events:
                timeline = None
                await asyncio.sleep(_IDLE_POLL_S)
                continue
            deadline = start + result.duration_s / self.speedup
            delay = deadline - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            end = self._clock()
            stats = self.loop_stats
            stats.iterations += 1
            stats.device_s += result.duration_s
            stats.cpu_s += cpu_done - now
            stats.wall_s += end - (last_end if continuing else now)
            stats.late_s += max(0.0, end - deadline)
            timeline, last_end = deadline, end
            for event in result.events:
                queue = self._streams.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)
