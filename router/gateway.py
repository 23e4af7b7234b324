"""The gateway: OpenAI API in, routing decision, forwarding to a replica, stream back.

``Gateway`` holds everything one gateway replica needs (cluster view refreshed from Redis,
the routing policy, one shared httpx client, metrics); ``create_gateway_app`` wraps it in a
FastAPI app. The same app runs under Ray Serve (``router.serve_app``) or plain uvicorn.
Gateway replicas are stateless: the registry and ring live in Redis, and every replica builds
the same rings from the same ring epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest

from instances.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from proto.headers import CACHED_TOKENS_HEADER, INSTANCE_HEADER, REQUEST_ID_HEADER
from proto.openai import OpenAIError, error_body, install_error_handlers
from router.dashboard import FleetObserver, install_dashboard
from router.metrics import GatewayMetrics
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    InstanceView,
    NoInstanceAvailable,
    RoutingPolicy,
    RoutingRequest,
)
from router.state import ClusterStateStore, InstanceRecord, snapshot_from_records

log = logging.getLogger("llmfleet.gateway")

# A replica that refused a connection is skipped locally for this long, so requests stop
# going to it before its heartbeat TTL runs out.
SUSPECT_S = 5.0
MAX_ATTEMPTS = 3


@dataclass
class GatewayConfig:
    redis_url: str
    policy: str = "round_robin"
    policy_params: dict[str, Any] = field(default_factory=dict)
    # The fleet facts policies are told (router.fleet_params): TTFT SLO and the replicas'
    # hardware profile (prefill cost per token, KV capacity).
    slo_ttft_s: float = 3.0
    profile: str | None = None
    namespace: str = "llmfleet"
    refresh_interval_s: float = 0.2
    heartbeat_ttl_s: float = 3.0
    leader_lease_s: float = 2.0
    gateway_id: str = field(default_factory=lambda: f"gw-{uuid.uuid4().hex[:8]}")
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0


class Gateway:
    """One gateway replica's state and request path."""

    def __init__(self, config: GatewayConfig, policy: RoutingPolicy | None = None) -> None:
        from router.fleet_params import build_fleet_policy, fleet_policy_params

        self.config = config
        self.policy = policy or build_fleet_policy(
            config.policy, fleet_policy_params(config.slo_ttft_s, config.profile),
            config.policy_params)
        self.store = ClusterStateStore(config.redis_url, config.namespace,
                                       config.heartbeat_ttl_s)
        self.metrics = GatewayMetrics()
        self.snapshot = ClusterSnapshot(epoch=0, instances=())
        self.records: dict[str, InstanceRecord] = {}
        self.is_leader = False
        # The dashboard's observer (router.dashboard), told of every routing decision.
        self.observer: FleetObserver | None = None
        self._suspect_until: dict[str, float] = {}
        self._masked: tuple[ClusterSnapshot, frozenset[str], ClusterSnapshot] | None = None
        self._client: httpx.AsyncClient | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._first_refresh = asyncio.Event()
        self._stopping = False
        # Precise cache views: policies that can use KV events get them from every replica
        # that publishes them (vLLM format over ZMQ).
        self._kv_subscriber: Any = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._refresher is not None:
            return
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.read_timeout_s,
                                  connect=self.config.connect_timeout_s),
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512),
        )
        if hasattr(self.policy, "apply_kv_events"):
            from proto.kv_events import KVEventSubscriber

            self._kv_subscriber = KVEventSubscriber(self._on_kv_events)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_refresh.wait(), timeout=5.0)

    async def stop(self) -> None:
        if self._refresher is not None:
            # The flag, not only the cancel: redis-py can swallow a CancelledError that lands
            # inside a command, and the loop would then run on forever.
            self._stopping = True
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._kv_subscriber is not None:
            await self._kv_subscriber.close()
            self._kv_subscriber = None
        await self.store.close()

    def _on_kv_events(self, instance_id: str, events: Any) -> None:
        self.policy.apply_kv_events(instance_id, events)  # type: ignore[attr-defined]
        self.metrics.kv_batches.inc()

    async def _refresh_loop(self) -> None:
        while not self._stopping:
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: keep routing on the last view
                log.warning("cluster state refresh failed: %s", exc)
            self._first_refresh.set()
            await asyncio.sleep(self.config.refresh_interval_s)

    async def refresh(self) -> None:
        """Re-read the registry; the leader also publishes ring membership (new epoch)."""
        live = await self.store.live_instances()
        self.is_leader = await self.store.try_lead(self.config.gateway_id,
                                                   self.config.leader_lease_s)
        if self.is_leader:
            await self.store.publish_ring([(r.instance_id, r.weight) for r in live])
        epoch, members = await self.store.ring()
        self.records = {r.instance_id: r for r in live}
        if self._kv_subscriber is not None:
            self._kv_subscriber.sync({r.instance_id: r.kv_events for r in live if r.kv_events})
        self.snapshot = snapshot_from_records(epoch, members, live)
        # The O(instances) part of a new snapshot is done here, not in the next decision.
        self.policy.adopt(self.snapshot)
        healthy = sum(1 for v in self.snapshot.instances if v.healthy)
        self.metrics.instances.labels(state="healthy").set(healthy)
        self.metrics.instances.labels(state="unhealthy").set(len(self.snapshot.instances) - healthy)

    # -- routing ------------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted({r.model for r in self.records.values() if r.model})

    def _routable_snapshot(self, exclude: set[str], now: float) -> ClusterSnapshot:
        """The snapshot with locally suspected or excluded replicas marked unhealthy.

        Policies detect "nothing changed" by object identity, so the same inputs must give
        the same objects: with nothing to hide this is the refreshed snapshot itself, and a
        masked snapshot is memoised until the snapshot or the hidden set changes (otherwise
        every decision while a replica is suspect would rebuild the policy's arrays).
        """
        hidden = frozenset(i for i, until in self._suspect_until.items() if until > now)
        if exclude:
            hidden |= exclude
        if not hidden:
            return self.snapshot
        memo = self._masked
        if memo is not None and memo[0] is self.snapshot and memo[1] == hidden:
            return memo[2]
        views = tuple(
            InstanceView(**{**v.__dict__, "healthy": False})
            if v.healthy and v.instance_id in hidden else v
            for v in self.snapshot.instances)
        masked = ClusterSnapshot(self.snapshot.epoch, views)
        self._masked = (self.snapshot, hidden, masked)
        return masked

    def route(self, request: RoutingRequest, exclude: set[str], now: float) -> Decision:
        snapshot = self._routable_snapshot(exclude, now)
        t0 = time.perf_counter()
        decision = self.policy.route(request, snapshot, now)
        self.metrics.decision_us.observe(time.perf_counter() - t0)
        self.metrics.decisions.labels(policy=self.policy.name, reason=decision.reason).inc()
        if self.observer is not None:
            self.observer.on_decision(request.request_id, decision)
        return decision

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- forwarding ---------------------------------------------------------------------
    async def handle(self, request: Request, endpoint: str, chat: bool) -> Response:
        started = time.monotonic()
        status = 500
        try:
            response = await self._handle(request, endpoint, chat, started)
            status = response.status_code
            return response
        except OpenAIError as exc:
            status = exc.status_code
            raise
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def _handle(self, request: Request, endpoint: str, chat: bool,
                      started: float) -> Response:
        body: ChatCompletionRequest | CompletionRequest
        if chat:
            body = await parse_body(request, ChatCompletionRequest)
        else:
            body = await parse_body(request, CompletionRequest)
        if not self.records:
            raise OpenAIError("No healthy replica is available", 503, "service_unavailable",
                              code="no_healthy_replica")
        if body.model is not None and body.model not in self.models():
            raise OpenAIError(f"The model '{body.model}' does not exist", 404,
                              param="model", code="model_not_found")
        try:
            token_ids = body.prompt_token_array()
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="messages") from exc
        max_tokens = body.output_budget()
        # Our own id, unique even if clients reuse theirs: it keys the policy's in-flight
        # view, the replica's request and the request table.
        client_id = request.headers.get(REQUEST_ID_HEADER)
        request_id = f"{client_id}-{uuid.uuid4().hex[:12]}" if client_id else uuid.uuid4().hex
        routing_request = RoutingRequest(request_id, token_ids, max_tokens)
        raw = await request.body()
        exclude: set[str] = set()
        last_error = "no replica answered"
        for attempt in range(MAX_ATTEMPTS):
            now = time.monotonic()
            try:
                decision = self.route(routing_request, exclude, now)
            except NoInstanceAvailable as exc:
                raise OpenAIError("No healthy replica is available", 503,
                                  "service_unavailable", code="no_healthy_replica") from exc
            record = self.records.get(decision.instance_id)
            if record is None:
                exclude.add(decision.instance_id)
                continue
            self.policy.on_dispatched(routing_request, decision, now)
            self._spawn(self.store.record_request(request_id, decision.instance_id))
            try:
                upstream = await self._send(record.url + endpoint, raw, request_id)
            except httpx.TransportError as exc:
                # Nothing reached the client yet: try another replica.
                self.policy.on_finished(request_id, decision.instance_id, time.monotonic())
                self._suspect_until[decision.instance_id] = time.monotonic() + SUSPECT_S
                exclude.add(decision.instance_id)
                last_error = f"{decision.instance_id}: {exc!r}"
                if attempt + 1 < MAX_ATTEMPTS:
                    self.metrics.retries.inc()
                continue
            if body.stream and upstream.status_code == 200:
                return self._stream_back(upstream, routing_request, decision, started)
            try:
                content = await upstream.aread()
            except httpx.TransportError as exc:
                # The replica failed before its whole answer arrived; the client has seen
                # nothing yet, so the request can still go elsewhere.
                self._suspect_until[decision.instance_id] = time.monotonic() + SUSPECT_S
                exclude.add(decision.instance_id)
                last_error = f"{decision.instance_id}: {exc!r}"
                if attempt + 1 < MAX_ATTEMPTS:
                    self.metrics.retries.inc()
                continue
            finally:
                await upstream.aclose()
                self.policy.on_finished(request_id, decision.instance_id, time.monotonic())
            self.metrics.latency.labels(endpoint="non_stream").observe(
                time.monotonic() - started)
            return Response(content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type", "application/json"),
                            headers={INSTANCE_HEADER: decision.instance_id})
        raise OpenAIError(f"All replicas failed: {last_error}", 503, "service_unavailable",
                          code="upstream_unavailable")

    async def _send(self, url: str, raw: bytes, request_id: str) -> httpx.Response:
        assert self._client is not None, "gateway not started"
        req = self._client.build_request(
            "POST", url, content=raw,
            headers={"content-type": "application/json", REQUEST_ID_HEADER: request_id})
        return await self._client.send(req, stream=True)

    def _stream_back(self, upstream: httpx.Response, request: RoutingRequest,
                     decision: Decision, started: float) -> StreamingResponse:
        policy = self.policy
        cached_header = upstream.headers.get(CACHED_TOKENS_HEADER)
        cached_tokens = int(cached_header) if cached_header and cached_header.isdigit() else None

        async def relay() -> AsyncIterator[bytes]:
            first_seen = False
            try:
                async for chunk in upstream.aiter_raw():
                    if not first_seen and _has_token_text(chunk):
                        first_seen = True
                        now = time.monotonic()
                        self.metrics.ttft.observe(now - started)
                        policy.on_first_token(request.request_id, decision.instance_id,
                                              now - started, cached_tokens, now)
                    yield chunk
            except httpx.HTTPError as exc:
                # The replica went away mid-stream. Say so in the stream (OpenAI-style error
                # event, then [DONE]) rather than cutting the connection without a word.
                self.metrics.stream_errors.inc()
                log.warning("stream from %s broke: %r", decision.instance_id, exc)
                error = error_body(f"The replica serving this request failed mid-stream: "
                                   f"{exc!r}", "server_error", code="upstream_stream_broken")
                yield f"\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
            finally:
                await upstream.aclose()
                policy.on_finished(request.request_id, decision.instance_id, time.monotonic())
                self.metrics.latency.labels(endpoint="stream").observe(
                    time.monotonic() - started)

        return StreamingResponse(relay(), status_code=200, media_type="text/event-stream",
                                 headers={INSTANCE_HEADER: decision.instance_id})


def _has_token_text(chunk: bytes) -> bool:
    """True if an SSE chunk carries generated text (not the empty role-only first delta)."""
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        try:
            payload = json.loads(line[6:])
        except ValueError:
            continue
        for choice in payload.get("choices", []):
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


def create_gateway_app(gateway: Gateway) -> FastAPI:
    """FastAPI app around ``gateway``; starts it lazily on first use and on startup."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="llmfleet gateway", lifespan=lifespan)
    _add_routes(app, gateway)
    install_dashboard(app, gateway)
    return app


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        await gateway.start()
        return await gateway.handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        await gateway.start()
        return await gateway.handle(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        await gateway.start()
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "llmfleet"}
            for m in gateway.models()]}

    @app.get("/health")
    async def health() -> JSONResponse:
        await gateway.start()
        healthy = [v.instance_id for v in gateway.snapshot.instances if v.healthy]
        status = 200 if healthy else 503
        return JSONResponse({"status": "ok" if healthy else "no_healthy_replica",
                             "healthy_instances": len(healthy),
                             "epoch": gateway.snapshot.epoch}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry),
                        media_type="text/plain; version=0.0.4")

    @app.get("/admin/instances")
    async def instances() -> dict[str, Any]:
        await gateway.start()
        return {"epoch": gateway.snapshot.epoch, "leader": gateway.is_leader,
                "policy": gateway.policy.name,
                "instances": [v.__dict__ for v in gateway.snapshot.instances]}
