"""The dashboard's routes on the gateway app, its 1 Hz loop and the admin actions.

Paths (``router.auth`` puts ``/admin*`` and ``/dashboard*`` behind the admin token):

- ``GET  /dashboard``                        the page (static HTML, JS and CSS shipped in
                                             this package; no CDN, nothing from the internet)
- ``GET  /admin/dashboard/state``            everything the page draws, as one JSON object
- ``GET  /admin/dashboard/events``           the same, pushed once a second (SSE)
- ``POST /admin/instances/{id}/drain``       ``{"draining": true|false}``: no new requests
                                             for the instance (every gateway replica sees it
                                             at its next registry refresh)
- ``POST /admin/requests/{id}/migrate``      live migration (501 until migration lands)
- ``POST /admin/policy``                     ``{"policy": name, "params": {...}}``
- ``POST /admin/admission``                  ``{"mode": "none" | "laps" | "laps-spatial"}``

The page reads its data from ``/admin/...`` with ``fetch`` (not ``EventSource``), so it can
send ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from proto.openai import OpenAIError
from router.admission import ADMISSION_MODES, admission_defaults
from router.dashboard.observer import FleetObserver, ObservedGateway
from router.policy.registry import POLICY_NAMES
from router.state import ClusterStateStore

log = logging.getLogger("llmfleet.dashboard")

STATIC_DIR = Path(__file__).with_name("static")
TICK_S = 1.0
_LEADER_READ_TIMEOUT_S = 0.5
_QUEUE_DEPTH = 2  # messages waiting per viewer; a slow viewer skips ticks, never piles up
_MAX_STALLED_TICKS = 30  # a viewer that took nothing for this many ticks is dropped


class DashboardHub:
    """Runs the observer's tick once a second and pushes the state to open streams.

    The tick (counters, event diff, one Redis GET for the leader id) runs for the app's
    whole life, so the event log covers it; building and encoding the state runs only
    while at least one stream is open, once per tick however many viewers there are.
    """

    def __init__(self, gateway: ObservedGateway, observer: FleetObserver,
                 period_s: float = TICK_S) -> None:
        self.gateway = gateway
        self.observer = observer
        self.period_s = period_s
        self._viewers: dict[asyncio.Queue[bytes], int] = {}  # queue -> rings version sent
        self._stalled: dict[asyncio.Queue[bytes], int] = {}  # queue -> ticks it stayed full
        self._task: asyncio.Task[None] | None = None
        self._store: ClusterStateStore | None = None
        self.publish_ms = 0.0  # cost of the last state build + encode (for the bench)

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def store(self) -> ClusterStateStore:
        """The dashboard's own connection to the cluster state (created on first use)."""
        if self._store is None:
            config = self.gateway.config
            self._store = ClusterStateStore(config.redis_url, config.namespace,
                                            config.heartbeat_ttl_s)
        return self._store

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                 name="llmfleet-dashboard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    async def tick(self) -> None:
        leader: str | None = None
        known = False
        try:
            leader = await asyncio.wait_for(self.store().leader(), _LEADER_READ_TIMEOUT_S)
            known = True
        except Exception as exc:  # Redis away: the rest of the page still updates
            log.debug("dashboard: leader read failed: %r", exc)
        self.observer.tick(leader, known)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.tick()
                if self._viewers:
                    self.publish()
            except Exception:  # one bad tick must not end the dashboard
                log.exception("dashboard tick failed")
            next_at += self.period_s
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled loop): restart the cadence from now
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def publish(self) -> None:
        """Send this tick's state to every open stream; the ring arcs only to streams that
        do not have their current version yet."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        state = self.observer.build_state(include_rings=False)
        state["publish_ms"] = round(self.publish_ms, 3)  # the previous tick's cost
        version = self.observer.rings.version
        plain = _sse(state)
        full: bytes | None = None
        for queue, sent in list(self._viewers.items()):
            if queue.full():  # a slow viewer: drop its oldest message, resend the rings
                stalled = self._stalled[queue] = self._stalled.get(queue, 0) + 1
                if stalled >= _MAX_STALLED_TICKS:  # gone without closing: stop feeding it
                    self.unsubscribe(queue)
                    continue
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                sent = -1
            else:
                self._stalled.pop(queue, None)
            if sent == version:
                queue.put_nowait(plain)
                continue
            if full is None:
                full = _sse({**state, "rings": self.observer.rings.payload})
            queue.put_nowait(full)
            self._viewers[queue] = version
        self.publish_ms = (loop.time() - t0) * 1000

    def subscribe(self, rings_version: int = -1) -> asyncio.Queue[bytes]:
        """A new stream's queue; ``rings_version``: the rings it was already sent."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_QUEUE_DEPTH)
        self._viewers[queue] = rings_version
        self.gateway.metrics.dashboard_viewers.set(len(self._viewers))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._viewers.pop(queue, None)
        self._stalled.pop(queue, None)
        self.gateway.metrics.dashboard_viewers.set(len(self._viewers))


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# -- request bodies ---------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DrainBody(_Body):
    draining: bool = True


class MigrateBody(_Body):
    target: str | None = Field(default=None, description="destination instance (optional)")


class PolicyBody(_Body):
    policy: str
    params: dict[str, Any] = Field(default_factory=dict)


class AdmissionBody(_Body):
    mode: str
    params: dict[str, Any] = Field(default_factory=dict)


# -- installing ---------------------------------------------------------------------------


def install_dashboard(app: FastAPI, gateway: Any) -> FleetObserver:
    """Add the dashboard's routes to ``app`` and run its loop with the app's lifespan.

    Sets ``gateway.observer`` to the returned observer, whose ``on_decision`` the gateway
    calls after each routing decision.
    """
    observer = FleetObserver(gateway)
    gateway.observer = observer
    hub = DashboardHub(gateway, observer)
    app.state.dashboard = hub
    _wrap_lifespan(app, hub)
    page = (STATIC_DIR / "index.html").read_text()
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        hub.start()
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @app.get("/admin/dashboard/state")
    async def dashboard_state() -> JSONResponse:
        hub.start()
        if observer.ticks == 0:
            await hub.tick()
        return JSONResponse(observer.build_state())

    @app.get("/admin/dashboard/events")
    async def dashboard_events() -> StreamingResponse:
        hub.start()
        if observer.ticks == 0:
            await hub.tick()
        first = _sse(observer.build_state())
        queue = hub.subscribe(observer.rings.version)

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield first
                while True:
                    yield await queue.get()
            finally:
                hub.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache",
                                          "x-accel-buffering": "no"})

    @app.post("/admin/instances/{instance_id}/drain")
    async def drain(instance_id: str, body: DrainBody | None = None) -> dict[str, Any]:
        draining = True if body is None else body.draining
        known = {v.instance_id for v in gateway.snapshot.instances} | set(gateway.records)
        if instance_id not in known:
            raise OpenAIError(f"No instance '{instance_id}' in the fleet", 404,
                              param="instance_id", code="instance_not_found")
        await hub.store().set_draining(instance_id, draining)
        action = "drained" if draining else "undrained"
        observer.note("drain" if draining else "undrain", f"operator {action} {instance_id}",
                      instance_id)
        log.info("operator %s %s", action, instance_id)
        return {"instance_id": instance_id, "draining": draining}

    @app.post("/admin/requests/{request_id}/migrate")
    async def migrate(request_id: str, body: MigrateBody | None = None) -> dict[str, Any]:
        migrations = getattr(gateway, "migrations", None)
        if migrations is None:
            raise OpenAIError(
                "Live migration is not available in this gateway yet: requests cannot be "
                "moved between replicas", 501, "not_implemented_error",
                param="request_id", code="migration_unavailable")
        result = await migrations.migrate(request_id, None if body is None else body.target)
        return {"request_id": request_id, "result": result}

    @app.post("/admin/policy")
    async def set_policy(body: PolicyBody) -> dict[str, Any]:
        from router.fleet_params import build_fleet_policy, fleet_policy_params

        if body.policy not in POLICY_NAMES:
            raise OpenAIError(f"Unknown routing policy '{body.policy}'; one of "
                              f"{', '.join(POLICY_NAMES)}", 400, param="policy",
                              code="unknown_policy")
        config = gateway.config
        try:
            policy = build_fleet_policy(
                body.policy, fleet_policy_params(config.slo_ttft_s, config.profile), body.params)
        except (TypeError, ValueError) as exc:
            raise OpenAIError(f"Invalid policy parameters: {exc}", 400, param="params",
                              code="invalid_policy_params") from exc
        policy.adopt(gateway.snapshot)
        old = gateway.policy.name
        # One assignment: requests routed before finish on the old policy's bookkeeping
        # (the new one's hooks ignore ids they never saw); later ones use the new policy.
        gateway.policy = policy
        config.policy, config.policy_params = body.policy, dict(body.params)
        log.info("operator changed the routing policy %s -> %s", old, policy.name)
        return {"policy": policy.name, "previous": old, "scope": "this gateway replica"}

    @app.post("/admin/admission")
    async def set_admission(body: AdmissionBody) -> dict[str, Any]:
        if body.mode not in ADMISSION_MODES:
            raise OpenAIError(f"Unknown admission mode '{body.mode}'; one of "
                              f"{', '.join(ADMISSION_MODES)}", 400, param="mode",
                              code="unknown_admission_mode")
        current = observer.admission_mode()
        if body.mode == current and not body.params:
            return {"mode": current, "previous": current, "scope": "this gateway replica"}
        setter = getattr(gateway, "set_admission", None)
        if setter is None:
            raise OpenAIError(
                f"Admission mode '{body.mode}' is not available in this gateway: requests "
                "are forwarded as soon as they are routed (mode 'none')", 501,
                "not_implemented_error", param="mode", code="admission_unavailable")
        # As for policies: the fleet-derived defaults (from the SLO), then explicit params.
        params = {} if body.mode == "none" else admission_defaults(gateway.config.slo_ttft_s)
        params.update(body.params)
        try:
            setter(body.mode, **params)
        except (TypeError, ValueError) as exc:
            raise OpenAIError(f"Invalid admission parameters: {exc}", 400, param="params",
                              code="invalid_admission_params") from exc
        observer.note("admission", f"operator changed admission {current} → {body.mode}")
        log.info("operator changed admission %s -> %s", current, body.mode)
        return {"mode": body.mode, "previous": current, "scope": "this gateway replica"}

    return observer


def _wrap_lifespan(app: FastAPI, hub: DashboardHub) -> None:
    """Start the dashboard loop after the app's own start-up, stop it before its shutdown."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            hub.start()
            try:
                yield state
            finally:
                await hub.stop()

    app.router.lifespan_context = lifespan
