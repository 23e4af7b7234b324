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
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from instances.engine.core import EngineCore
from instances.engine.request import Request
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


@dataclass(frozen=True)
class MigratedTo:
    """Where a request went when a live migration moved it off this engine."""

    instance_id: str
    url: str
    num_output_tokens: int  # tokens generated here (and delivered) before the move


@dataclass(frozen=True)
class MigratedEvent(TokenEvent):
    """The last event of a stream whose request moved (``finish_reason == "migrated"``)."""

    target: MigratedTo | None = None


@dataclass
class Continuation:
    """A migrated-in request's stream, handed to whoever serves its client from here on.

    ``output_token_ids`` were generated before the move (the client has them, or some of
    them); ``events`` yields what this engine generates next, ending with a finished event
    (a ``MigratedEvent`` if it moves on again)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    client_state: bytes
    num_cached_tokens: int
    events: AsyncGenerator[TokenEvent, None]


@dataclass
class _Stream:
    """One request's life on this engine (a request that comes back is a new one)."""

    request_id: str
    queue: asyncio.Queue[TokenEvent]
    migratable: bool
    client_state: bytes = b""
    migrated_to: MigratedTo | None = None
    adopted: Continuation | None = None  # migrated in, waiting for ``attach``
    orphan_timer: asyncio.TimerHandle | None = None
    orphaned: bool = False


class AsyncEngine:
    """Owns one ``EngineCore`` and the task that steps it; hands tokens to request streams.

    Live migration (``instances.migration_adapter`` drives these): a request started with
    ``migratable=True`` can be ``suspend``-ed (it stops stepping, keeps its blocks), then
    ``resume``-d or ``release_migrated``-ed (its stream ends with a ``MigratedEvent`` saying
    where it went, after every token generated here). The destination ``adopt``-s it and
    buffers its tokens until the client's side ``attach``-es to the continuation. A request
    may come back before its old stream here has ended: the old stream gets the events of
    the old life (the core reports them first), the new one the rest.
    """

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
        self._streams: dict[str, _Stream] = {}
        # Released as migrated; their last events (the step in flight, then the "migrated"
        # finish) are still to be delivered.
        self._departing: dict[str, _Stream] = {}
        # Migrated in, nobody attached yet (oldest first: a request can move on, and even
        # come back, before its client catches up).
        self._unattached: dict[str, deque[_Stream]] = {}
        # Per request id, one entry per life in the core (oldest first): what to run when
        # that life's finished event comes (a migrated-in request unpins its blocks).
        self._lives: dict[str, deque[Callable[[], None] | None]] = {}
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
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        migratable: bool = False,
        client_state: bytes = b"",
    ) -> AsyncGenerator[TokenEvent, None]:
        """Add a request and yield its token events until it finishes.

        Leaving the iterator early (client gone) aborts the request in the core.
        ``migratable``: the client can follow a live migration (a stream); ``client_state``
        travels with the request to the destination (how to format the rest of its stream).
        """
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            arrival_time=self.engine_now(),
        )
        stream = self._add(request, migratable, client_state)
        async for event in self._consume(stream):
            yield event

    def _add(
        self, request: EngineRequest, migratable: bool, client_state: bytes,
        on_finish: Callable[[], None] | None = None,
    ) -> _Stream:
        self.core.add_request(request)  # raises ValueError on requests that can never run
        # Every life of a request in the core ends with exactly one finished event, in
        # order, whether or not anybody still reads its stream.
        self._lives.setdefault(request.request_id, deque()).append(on_finish)
        stream = _Stream(request.request_id, asyncio.Queue(), migratable, client_state)
        self._streams[request.request_id] = stream
        self._wakeup.set()
        return stream

    async def _consume(self, stream: _Stream) -> AsyncGenerator[TokenEvent, None]:
        request_id = stream.request_id
        finished = False
        try:
            while not finished:
                event = await stream.queue.get()
                finished = event.finished
                if finished and event.finish_reason == "migrated":
                    event = MigratedEvent(**vars(event), target=stream.migrated_to)
                yield event
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
                if not finished:
                    self.core.abort_request(request_id)
                    self._wakeup.set()

    # ---- live migration -------------------------------------------------------------------

    def is_migratable(self, request_id: str) -> bool:
        """A request whose client can follow a move (started with ``migratable=True``)."""
        stream = self._streams.get(request_id)
        return stream is not None and stream.migratable

    def suspend(self, request_id: str) -> tuple[Request, bytes]:
        """Stop a migratable decoding request (it keeps its blocks); its core state and
        client state. ValueError if it is not migratable or not decoding."""
        stream = self._streams.get(request_id)
        if stream is None or not stream.migratable:
            raise ValueError(f"request {request_id!r} is not a migratable stream")
        return self.core.suspend_request(request_id), stream.client_state

    def resume(self, request_id: str) -> None:
        """Undo ``suspend`` (the migration failed before its commit). KeyError if the
        request is no longer suspended (it was aborted meanwhile)."""
        self.core.resume_request(request_id)
        self._wakeup.set()

    def release_migrated(self, request_id: str, target: MigratedTo) -> None:
        """The request runs at ``target`` now: free it here; its stream ends with a
        ``MigratedEvent`` after every token generated here."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.migrated_to = target
            self._departing[request_id] = stream
        self.core.abort_request(request_id, "migrated")
        self._wakeup.set()

    def adopt(
        self,
        request: EngineRequest,
        client_state: bytes,
        num_cached_tokens: int = 0,
        on_finish: Callable[[], None] | None = None,
        orphan_timeout_s: float = 30.0,
    ) -> None:
        """Start a migrated-in request (``request.output_token_ids`` holds the tokens
        generated so far); its events wait for ``attach``. Nobody attaching within
        ``orphan_timeout_s`` means its client is gone: it is aborted. ``on_finish`` runs
        when it leaves this engine. ValueError if it cannot run here."""
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        before = list(request.output_token_ids)
        stream = self._add(request, True, client_state, on_finish)
        stream.adopted = Continuation(request_id, list(request.prompt_token_ids), before,
                                      client_state, num_cached_tokens, self._consume(stream))
        stream.orphan_timer = asyncio.get_running_loop().call_later(
            orphan_timeout_s, self._abort_orphan, stream)
        self._unattached.setdefault(request_id, deque()).append(stream)

    def has_continuation(self, request_id: str) -> bool:
        """Whether a migrated-in stream of this request waits for ``attach``."""
        return bool(self._unattached.get(request_id))

    def attach(self, request_id: str) -> Continuation:
        """Take the stream of an adopted request (once per adoption, oldest first); it may
        have finished or moved on already, its events wait in it. KeyError if none."""
        waiting = self._unattached.get(request_id)
        if not waiting:
            raise KeyError(request_id)
        stream = waiting.popleft()
        if not waiting:
            del self._unattached[request_id]
        continuation, stream.adopted = stream.adopted, None
        assert continuation is not None
        if stream.orphan_timer is not None:
            stream.orphan_timer.cancel()
        return continuation

    def _abort_orphan(self, stream: _Stream) -> None:
        request_id = stream.request_id
        waiting = self._unattached.get(request_id)
        if waiting is None or stream not in waiting:
            return
        waiting.remove(stream)
        if not waiting:
            del self._unattached[request_id]
        stream.adopted = None
        if self._streams.get(request_id) is not stream:
            return  # it moved on: nothing runs here any more
        if self.core.get_request(request_id) is None:
            del self._streams[request_id]  # it finished meanwhile: all events delivered
            return
        stream.orphaned = True  # its abort event drops the stream
        self.core.abort_request(request_id)
        self._wakeup.set()

    def _deliver(self, event: TokenEvent) -> None:
        request_id = event.request_id
        if event.finished:
            lives = self._lives.get(request_id)
            if lives:
                callback = lives.popleft()
                if not lives:
                    del self._lives[request_id]
                if callback is not None:
                    callback()
        stream = self._departing.get(request_id)
        if stream is not None:
            if event.finished:  # the departed life's last event; later ones are a new life
                del self._departing[request_id]
        else:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            if event.finished and stream.orphaned:
                del self._streams[request_id]
        # A migrated-in request that ends before anybody attached keeps its events queued
        # for whoever attaches before the orphan timer.
        stream.queue.put_nowait(event)

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
            # Yield every iteration, even when late: an engine slower than its model must not
            # starve the streams, the HTTP server and the migration agent on this loop.
            await asyncio.sleep(max(delay, 0.0))
            end = self._clock()
            stats = self.loop_stats
            stats.iterations += 1
            stats.device_s += result.duration_s
            stats.cpu_s += cpu_done - now
            stats.wall_s += end - (last_end if continuing else now)
            stats.late_s += max(0.0, end - deadline)
            timeline, last_end = deadline, end
            for event in result.events:
                self._deliver(event)
