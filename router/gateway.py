"""The gateway: OpenAI API in, routing decision, admission, forwarding, answer back.

A request passes four seams, one job each:

1. **parse** (``proto.openai.parse_route_view``): read what routing needs — the prompt or
   messages, ``model``, ``stream``, the output budget — and nothing else; the client's body
   is forwarded unchanged, so the backend judges the rest (``n``, ``tools``, ``logprobs``,
   its vocabulary) and its answer, 4xx included, comes back as it came;
2. **decide** (the routing policy, ``router.policy``): pick a replica from the snapshot
   the control loop last built — no Redis round trip, no I/O;
3. **admit** (``router.admit``): the admission queues (``--admission``: pass-through,
   LAPS) release the request to its replica when it has room; 429 with ``Retry-After``
   when every replica's in-flight budget is full;
4. **forward** (``router.forward``, ``router.upstream``): one keep-alive pool per replica,
   bytes relayed as they come, retry on another replica if one fails before answering, and
   a hook that lets a stream continue from another replica.

The control loop (``router.control``) keeps the snapshot fresh apart from the request path.
The hot endpoints (``POST /v1/completions``, ``POST /v1/chat/completions``) are served by a
plain ASGI handler; everything else (models, health, metrics, admin, dashboard) by FastAPI.
The same app runs under Ray Serve (``router.serve_app``) or plain uvicorn. Gateway replicas
are stateless: registry, ring and request table live in Redis, and every replica builds the
same rings from the same ring epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from instances.launcher import BackendWatcher
from migration.policy import RebalanceConfig
from proto.backends import BACKENDS
from proto.defaults import (
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_LEADER_LEASE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_NAMESPACE,
    DEFAULT_POLICY,
    DEFAULT_REFRESH_INTERVAL_S,
    DEFAULT_SLO_TTFT_S,
)
from proto.headers import CACHED_TOKENS_HEADER, REQUEST_ID_HEADER
from proto.logs import bind_request_id
from proto.openai import OpenAIError, RouteView, install_error_handlers, parse_route_view
from proto.registry import InstanceRecord
from proto.tokenize import Tokenizer, load_tokenizer
from proto.tokens import as_token_array
from router.admission import admission_defaults, build_admission
from router.admission.decide import route as admission_route
from router.admission.rebalancer import HotspotRebalancer, apply_moves, supports_rebalancing
from router.admit import AdmissionGate, TooBusy
from router.auth import AuthGuard, AuthMiddleware, BodyLimitMiddleware
from router.control import ControlLoop
from router.dashboard import FleetObserver, install_dashboard
from router.forward import Relay, RequestContext, send_error
from router.metrics import GatewayMetrics
from router.migrations import GatewayMigrations
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    InstanceView,
    NoInstanceAvailable,
    RoutingPolicy,
    RoutingRequest,
)
from router.state import ClusterStateStore
from router.stream_resume import MigrationResumer
from router.upstream import Header, UpstreamClient, UpstreamError, UpstreamResponse

log = logging.getLogger("llmfleet.gateway")

# A replica that refused a connection is skipped locally for this long, so requests stop
# going to it before its heartbeat TTL runs out.
SUSPECT_S = 5.0
MAX_ATTEMPTS = 3
ENDPOINTS = {"/v1/completions": False, "/v1/chat/completions": True}

_CONTENT_TYPE_JSON = (b"content-type", b"application/json")
_CACHED_TOKENS = CACHED_TOKENS_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()


@dataclass
class GatewayConfig:
    redis_url: str
    policy: str = DEFAULT_POLICY
    policy_params: dict[str, Any] = field(default_factory=dict)
    # The fleet facts policies are told (router.fleet_params): TTFT SLO and the replicas'
    # hardware profile (prefill cost per token, KV capacity).
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S
    profile: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    leader_lease_s: float = DEFAULT_LEADER_LEASE_S
    gateway_id: str = field(default_factory=lambda: f"gw-{uuid.uuid4().hex[:8]}")
    connect_timeout_s: float = 2.0
    # Admission between decision and forwarding (router.admission): none | laps |
    # laps-spatial, with its parameters.
    admission: str = "none"
    admission_params: dict[str, Any] = field(default_factory=dict)
    # Llumnix freeness rebalancing by live migration (router.migrations), off by default,
    # with its parameters (migration.policy.RebalanceConfig: threshold, period_s, ...).
    migration_rebalance: bool = False
    migration_params: dict[str, Any] = field(default_factory=dict)
    # Requests one gateway replica keeps in flight per replica before it answers 429
    # (0: no limit).
    max_inflight_per_instance: int = 1024
    # A local Hugging Face tokenizer (file or directory) to count the backend's tokens;
    # None: the byte-level tokenizer.
    tokenizer: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # API keys on /v1/*, the admin token on /admin/* (router.auth). ``up`` and ``gateway``
    # turn it on unless the gateway listens on loopback only (router.auth.auth_required).
    auth: bool = False


class Gateway:
    """One gateway replica's state and request path."""

    def __init__(self, config: GatewayConfig, policy: RoutingPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from router.fleet_params import build_fleet_policy, fleet_policy_params

        self.config = config
        self.clock = clock
        self.policy = policy or build_fleet_policy(
            config.policy, fleet_policy_params(config.slo_ttft_s, config.profile),
            config.policy_params)
        self.store = ClusterStateStore(config.redis_url, config.namespace,
                                       config.heartbeat_ttl_s)
        self.metrics = GatewayMetrics()
        self.tokenizer: Tokenizer = load_tokenizer(config.tokenizer)
        self.snapshot = ClusterSnapshot(epoch=0, instances=())
        self.records: dict[str, InstanceRecord] = {}
        self._models: frozenset[str] = frozenset()
        self.control = ControlLoop(self.store, config.gateway_id, clock, self._adopt,
                                   config.refresh_interval_s, config.leader_lease_s)
        self.gate = self._build_gate(config.admission, config.admission_params)
        self._admission_seen: dict[str, dict[str, int]] = {"released": {}, "moves": {}}
        self.control.add_job("admission", self._admission_job)
        self.control.add_job("hot_keys", self._hot_keys_job)
        self.control.add_job("backends", self._backends_job)
        self._backend_watcher: BackendWatcher | None = None
        self._hot_keys_version = -1
        self.relay = Relay(self._first_token, self.metrics.stream_errors.inc, clock)
        self.upstream = UpstreamClient(config.connect_timeout_s)
        # Streams follow live migrations and outlive a replica dying mid-stream.
        self.resumer = MigrationResumer(self.upstream, lambda: self.records)
        self.relay.resumer = self.resumer
        # The streams this replica relays now (what live migration can move), and the
        # migrations it orders: by hand (admin API), off drained replicas and, when on, off
        # replicas short of KV blocks (freeness).
        self.streams: dict[str, RequestContext] = {}
        self.migrations = GatewayMigrations(
            self.store, self.metrics, lambda: self.records, lambda: self.snapshot,
            self.streams, rebalance=RebalanceConfig.from_params(config.migration_params)
            if config.migration_rebalance else None)
        self.migrations.install(self.control)
        # The dashboard's observer (router.dashboard), told of every routing decision.
        self.observer: FleetObserver | None = None
        self._suspect_until: dict[str, float] = {}
        self._masked: tuple[ClusterSnapshot, frozenset[str], ClusterSnapshot] | None = None
        self._ids = itertools.count()
        self._started = False
        # Precise cache views: policies that can use KV events get them from every replica
        # that publishes them (vLLM format over ZMQ).
        self._kv_subscriber: Any = None
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._decision_counters: dict[tuple[str, str], Any] = {}

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.control.is_leader

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if hasattr(self.policy, "apply_kv_events"):
            from proto.kv_events import KVEventSubscriber

            self._kv_subscriber = KVEventSubscriber(self._on_kv_events)
        self.control.start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.control.first_refresh.wait(), timeout=5.0)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.control.stop()
        self.gate.close()
        self.upstream.close()
        await self.resumer.close()
        await self.migrations.close()
        if self._backend_watcher is not None:
            await self._backend_watcher.close()
            self._backend_watcher = None
        if self._kv_subscriber is not None:
            await self._kv_subscriber.close()
            self._kv_subscriber = None
        await self.store.close()

    def _on_kv_events(self, instance_id: str, events: Any) -> None:
        self.policy.apply_kv_events(instance_id, events)  # type: ignore[attr-defined]
        self.metrics.kv_batches.inc()

    async def refresh(self) -> None:
        """One control-loop round now (tests and tools; the loop does this periodically)."""
        await self.control.refresh()

    def _adopt(self, snapshot: ClusterSnapshot, records: dict[str, InstanceRecord]) -> None:
        self.records = records
        self._models = frozenset(r.model for r in records.values() if r.model)
        if self._kv_subscriber is not None:
            self._kv_subscriber.sync({i: r.kv_events for i, r in records.items() if r.kv_events})
        self.upstream.forget({r.url for r in records.values()})
        self.snapshot = snapshot
        # The O(instances) part of a new snapshot is done here, not in the next decision.
        self.policy.adopt(snapshot)
        healthy = sum(1 for v in snapshot.instances if v.healthy)
        self.metrics.instances.labels(state="healthy").set(healthy)
        self.metrics.instances.labels(state="unhealthy").set(len(snapshot.instances) - healthy)

    def _build_gate(self, mode: str, params: dict[str, Any]) -> AdmissionGate:
        if mode != "none":
            # Fleet-derived parameters (budget, aging from the SLO), explicit ones win.
            params = {**admission_defaults(self.config.slo_ttft_s), **params}
        return AdmissionGate(build_admission(mode, **params), self.clock,
                             self.config.max_inflight_per_instance)

    def set_admission(self, mode: str, **params: Any) -> None:
        """Switch the admission mode; requests already queued keep their old gate."""
        self.gate = self._build_gate(mode, params)
        self.config.admission, self.config.admission_params = mode, dict(params)

    async def _backends_job(self, now: float, leader: bool) -> None:
        """The leader watches the servers added through the admin API (they join the
        registry and the rings through it); a replica that lost the lease stops watching."""
        if not leader:
            if self._backend_watcher is not None and self._backend_watcher.watching:
                self._backend_watcher.sync({})
            return
        wanted = await self.store.backends()
        if self._backend_watcher is None:
            if not wanted:
                return
            config = self.config
            self._backend_watcher = BackendWatcher(config.redis_url, config.namespace,
                                                   config.heartbeat_ttl_s, config.tokenizer)
        self._backend_watcher.sync(wanted)

    async def _hot_keys_job(self, now: float, leader: bool) -> None:
        """Each tick: publish the hot prefixes this replica found; the leader merges them
        into the fleet table; every replica keys prompts by that table."""
        policy = self.policy
        local = getattr(policy, "hot_key_table", None)
        adopt = getattr(policy, "adopt_hot_key_table", None)
        if local is None or adopt is None:
            return
        await self.store.publish_local_hot_keys(self.config.gateway_id, local())
        if leader:
            await self.store.merge_hot_keys(stale_s=10 * self.config.refresh_interval_s + 2)
        version, table = await self.store.hot_keys()
        if version != self._hot_keys_version:
            adopt(table)
            self._hot_keys_version = version

    async def _admission_job(self, now: float, leader: bool) -> None:
        """Each tick: rebalance this replica's queued requests off hotspots (the queues are
        this replica's own, so every replica rebalances its own), and export the
        admission's counters."""
        gate = self.gate
        if gate.passthrough:
            return
        admission = gate.admission
        if supports_rebalancing(self.policy):
            moves = HotspotRebalancer(admission, self.policy).plan_moves(  # type: ignore[arg-type]
                now, self.snapshot)
            if moves:
                gate.apply(apply_moves(admission, self.policy, moves, now))
        counters = admission.counters()
        for name, metric in (("released", self.metrics.admission_releases),
                             ("moves", self.metrics.admission_moves)):
            seen = self._admission_seen[name]
            for reason, total in counters.get(name, {}).items():
                if total > seen.get(reason, 0):
                    metric.labels(reason=reason).inc(total - seen.get(reason, 0))
                    seen[reason] = total

    # -- decide -------------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted(self._models)

    def _routable_snapshot(self, exclude: set[str], now: float) -> ClusterSnapshot:
        """The snapshot with locally suspected or excluded replicas marked unhealthy.

        Policies detect "nothing changed" by object identity, so the same inputs must give
        the same objects: with nothing to hide this is the refreshed snapshot itself, and a
        masked snapshot is memoised until the snapshot or the hidden set changes (otherwise
        every decision while a replica is suspect would rebuild the policy's arrays).
        """
        if not exclude and not self._suspect_until:
            return self.snapshot
        hidden = frozenset(i for i, until in self._suspect_until.items() if until > now)
        if exclude:
            hidden |= exclude
        if not hidden:
            self._suspect_until.clear()
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
        gate = self.gate
        t0 = time.perf_counter()
        if gate.passthrough:
            decision = self.policy.route(request, snapshot, now)
        else:  # spatial pools draw the candidates within the request's class's pool
            decision = admission_route(self.policy, gate.admission, request, snapshot, now)
        self.metrics.decision_us.observe(time.perf_counter() - t0)
        key = (self.policy.name, decision.reason)
        counter = self._decision_counters.get(key)
        if counter is None:
            counter = self._decision_counters[key] = self.metrics.decisions.labels(
                policy=key[0], reason=key[1])
        counter.inc()
        if self.observer is not None:
            self.observer.on_decision(request.request_id, decision)
        return decision

    def _decide(self, ctx: RequestContext) -> Decision:
        """Route ``ctx``; if its replica is at its in-flight budget, route among the others
        (``TooBusy`` when none has room)."""
        now = self.clock()
        decision = self.route(ctx.routing, ctx.exclude, now)
        if self.gate.full(decision.instance_id):
            full = {i for i in self.gate.inflight if self.gate.full(i)}
            try:
                decision = self.route(ctx.routing, ctx.exclude | full, now)
            except NoInstanceAvailable as exc:
                raise TooBusy(self.gate.retry_after_s) from exc
        return decision

    # -- the request path ---------------------------------------------------------------
    def _tokens(self, view: RouteView) -> Any:
        if view.prompt_text is not None:
            return self.tokenizer.encode_prompt(view.prompt_text)
        if view.prompt_ids is not None:
            return as_token_array(view.prompt_ids)
        assert view.messages is not None
        return self.tokenizer.encode_chat(view.messages)

    def _request_id(self, client_id: bytes | None) -> str:
        # Our own id, unique even if clients reuse theirs: it keys the policy's in-flight
        # view, the replica's request and the request table.
        own = f"{self.config.gateway_id}-{next(self._ids)}"
        return f"{client_id.decode(errors='replace')}-{own}" if client_id else own

    def _count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.metrics.requests.labels(
                endpoint=endpoint, status=str(status))
        counter.inc()

    async def serve(self, scope: Scope, receive: Receive, send: Send,
                    endpoint: str) -> None:
        """Serve one ``POST`` to a hot endpoint (raw ASGI)."""
        started = self.clock()
        status = 500
        try:
            status = await self._serve(scope, receive, send, endpoint, started)
        except OpenAIError as exc:
            status = exc.status_code
            await send_error(send, status, exc.message, exc.error_type, exc.code, exc.param)
        except TooBusy as exc:
            status = 429
            await send_error(send, 429, "Every replica is at its in-flight limit; retry later",
                             "rate_limit_error", "fleet_busy",
                             headers=[(b"retry-after", str(max(1, round(exc.retry_after_s)))
                                       .encode())])
        except Exception as exc:
            # A bug, not bad input: still an OpenAI-style body, if the answer has not begun.
            log.exception("unexpected error serving %s", endpoint)
            with contextlib.suppress(Exception):
                await send_error(send, 500, f"Internal error: {exc!r}", "server_error")
        finally:
            self._count(endpoint, status)

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise OpenAIError(f"Request body exceeds {limit} bytes", 413,
                                  code="request_too_large")
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise OpenAIError("The client closed the request", 499,
                                  code="client_closed_request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise OpenAIError(f"Request body exceeds {limit} bytes", 413,
                                  code="request_too_large")
            parts.append(chunk)
        return b"".join(parts)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, endpoint: str,
                     started: float) -> int:
        raw = await self._read_body(receive)
        view = parse_route_view(raw, ENDPOINTS[endpoint])
        if not self.records:
            raise OpenAIError("No healthy replica is available", 503, "service_unavailable",
                              code="no_healthy_replica")
        if view.model is not None and view.model not in self._models:
            raise OpenAIError(f"The model '{view.model}' does not exist", 404,
                              param="model", code="model_not_found")
        client_id = None
        for name, value in scope["headers"]:
            if name == _REQUEST_ID:
                client_id = value
                break
        routing = RoutingRequest(self._request_id(client_id), self._tokens(view),
                                 view.output_budget)
        bind_request_id(routing.request_id)  # this request's log lines carry its id
        ctx = RequestContext(endpoint, raw, view, routing, started)
        last_error = "no replica answered"
        for _ in range(MAX_ATTEMPTS):
            try:
                upstream = await self._dispatch(ctx)
            except OpenAIError as exc:
                if exc.code != "no_healthy_replica" or not ctx.exclude:
                    raise
                # Every replica left was tried and failed: say how, not "none healthy".
                raise OpenAIError(f"All replicas failed: {last_error}", 503,
                                  "service_unavailable", code="upstream_unavailable") from exc
            if isinstance(upstream, str):
                last_error = upstream
                continue
            if view.stream and upstream.status == 200:
                await self._stream(ctx, upstream, receive, send)
                return 200
            try:
                body = await upstream.read()
            except UpstreamError as exc:
                # The replica failed before its whole answer arrived; the client has seen
                # nothing yet, so the request can still go elsewhere.
                last_error = self._failed(ctx, exc)
                continue
            self._done(ctx)
            self.metrics.latency.labels(endpoint="non_stream").observe(self.clock() - started)
            await self.relay.whole(ctx, upstream, body, send)
            return upstream.status
        raise OpenAIError(f"All replicas failed: {last_error}", 503, "service_unavailable",
                          code="upstream_unavailable")

    async def _dispatch(self, ctx: RequestContext) -> UpstreamResponse | str:
        """Decide, admit and send ``ctx`` once; the replica's answer, or why it failed."""
        try:
            decision = self._decide(ctx)
        except NoInstanceAvailable as exc:
            raise OpenAIError("No healthy replica is available", 503,
                              "service_unavailable", code="no_healthy_replica") from exc
        record = self.records.get(decision.instance_id)
        if record is None:  # left the registry since the snapshot was built
            ctx.exclude.add(decision.instance_id)
            return f"{decision.instance_id} left the fleet"
        self.policy.on_dispatched(ctx.routing, decision, self.clock())
        try:
            release = await self.gate.admit(ctx.routing, decision)
        except BaseException:
            self.policy.on_finished(ctx.request_id, decision.instance_id, self.clock())
            raise
        if release.klass != "none":
            self.metrics.queue_wait.labels(queue=release.klass).observe(release.waited_s)
        if release.decision is not decision:
            # Re-decided while queued (rebalancing): the policy already moved its books.
            decision = release.decision
            record = self.records.get(decision.instance_id, record)
        ctx.decision = decision
        ctx.instance_id = decision.instance_id
        ctx.attempts += 1
        self.control.note_request(ctx.request_id, decision.instance_id)
        headers: list[Header] = [_CONTENT_TYPE_JSON, (_REQUEST_ID, ctx.request_id.encode())]
        try:
            return await self.upstream.pool(record.url).request(b"POST", ctx.endpoint,
                                                                headers, ctx.raw)
        except UpstreamError as exc:
            return self._failed(ctx, exc)

    def _failed(self, ctx: RequestContext, exc: UpstreamError) -> str:
        """Nothing reached the client yet: free the attempt's books, try another replica."""
        instance_id = ctx.instance_id
        log.warning("replica %s failed before answering: %s; it is suspect for %.0f s",
                    instance_id, exc, SUSPECT_S)
        self._done(ctx)
        self._suspect_until[instance_id] = self.clock() + SUSPECT_S
        ctx.exclude.add(instance_id)
        if ctx.attempts < MAX_ATTEMPTS:
            self.metrics.retries.inc()
        return f"{instance_id}: {exc}"

    def _done(self, ctx: RequestContext) -> None:
        now = self.clock()
        self.policy.on_finished(ctx.request_id, ctx.instance_id, now)
        self.gate.finished(ctx.request_id, ctx.instance_id)

    def _first_token(self, ctx: RequestContext, now: float) -> None:
        ttft = now - ctx.started
        self.metrics.ttft.observe(ttft)
        self.policy.on_first_token(ctx.request_id, ctx.instance_id, ttft, ctx.cached_tokens,
                                   now)
        self.gate.first_token(ctx.request_id)

    def _switch(self, ctx: RequestContext, instance_id: str) -> None:
        """The stream continues on ``instance_id`` (migration or mid-stream failover)."""
        self._done(ctx)
        ctx.instance_id = instance_id
        self.gate.running_on(instance_id)
        self.control.note_request(ctx.request_id, instance_id)

    async def _stream(self, ctx: RequestContext, upstream: UpstreamResponse, receive: Receive,
                      send: Send) -> None:
        cached = upstream.header(_CACHED_TOKENS)
        # The replica's cached-token count, handed to the policy with the first token.
        ctx.cached_tokens = int(cached) if cached is not None and cached.isdigit() else None
        relay = asyncio.ensure_future(self.relay.stream(ctx, upstream, send, self._switch))
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        self.streams[ctx.request_id] = ctx
        try:
            await asyncio.wait((relay, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not relay.done():
                # The client went away: stop the replica's work too.
                relay.cancel()
                upstream.close()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await relay
            disconnect.cancel()
            self.streams.pop(ctx.request_id, None)
            self._done(ctx)
            end = self.clock()
            self.metrics.latency.labels(endpoint="stream").observe(end - ctx.started)
            if ctx.first_token_at is not None and ctx.chunks > 1:
                # One observation per request (mean gap), not one per chunk: the relay of
                # a long answer must stay cheap.
                self.metrics.itl.observe((end - ctx.first_token_at) / (ctx.chunks - 1))
        if not relay.cancelled():
            relay.result()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class GatewayApp:
    """The gateway's ASGI app: the hot endpoints raw, everything else through FastAPI."""

    def __init__(self, gateway: Gateway, fallback: ASGIApp) -> None:
        self.gateway = gateway
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = scope["path"]
            root = scope.get("root_path")
            if root and endpoint.startswith(root):  # mounted under a prefix (Serve route)
                endpoint = endpoint[len(root):]
            if endpoint in ENDPOINTS:
                if not self.gateway._started:
                    await self.gateway.start()
                await self.gateway.serve(scope, receive, send, endpoint)
                return
        await self.fallback(scope, receive, send)


def create_gateway_app(gateway: Gateway) -> ASGIApp:
    """The gateway's ASGI app; starts the gateway on startup (or on first use).

    With ``config.auth`` every route but ``/health`` and ``/metrics`` needs a key
    (``router.auth``); request bodies are limited to ``config.max_body_bytes``.
    """

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
    config = gateway.config
    # The hot endpoints check the body limit as they read; other routes get the middleware.
    served: ASGIApp = GatewayApp(gateway, BodyLimitMiddleware(app, config.max_body_bytes))
    if config.auth:
        served = AuthMiddleware(served, AuthGuard(config.redis_url, config.namespace))
    return served


class BackendBody(BaseModel):
    """A server to put behind the gateway (``POST /admin/backends``)."""

    url: str
    kind: str | None = None  # a proto.backends kind, or auto (told from its /metrics)
    instance_id: str | None = None
    model: str | None = None
    weight: float | None = None


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    install_error_handlers(app)

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
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/backends")
    async def list_backends() -> dict[str, Any]:
        return {"backends": [{"instance_id": i, **spec}
                             for i, spec in sorted((await gateway.store.backends()).items())]}

    @app.post("/admin/backends")
    async def add_backend(body: BackendBody) -> dict[str, Any]:
        spec = body.model_dump(exclude_none=True, exclude={"instance_id"})
        if not body.url.startswith(("http://", "https://")):
            raise OpenAIError("'url' must be http(s)://host:port", 400, param="url",
                              code="invalid_backend_url")
        if body.kind not in (None, "auto", *BACKENDS):
            raise OpenAIError(f"Unknown backend kind '{body.kind}'; one of auto, "
                              f"{', '.join(sorted(BACKENDS))}", 400, param="kind",
                              code="unknown_backend_kind")
        instance_id = body.instance_id or "external-" + hashlib.sha256(
            body.url.encode()).hexdigest()[:8]
        await gateway.store.add_backend(instance_id, spec)
        return {"instance_id": instance_id, **spec}

    @app.delete("/admin/backends/{instance_id}")
    async def remove_backend(instance_id: str) -> dict[str, Any]:
        if not await gateway.store.remove_backend(instance_id):
            raise OpenAIError(f"No backend '{instance_id}' was added through the admin API",
                              404, param="instance_id", code="backend_not_found")
        return {"instance_id": instance_id, "removed": True}

    @app.get("/admin/instances")
    async def instances() -> dict[str, Any]:
        await gateway.start()
        return {"epoch": gateway.snapshot.epoch, "leader": gateway.is_leader,
                "policy": gateway.policy.name, "admission": gateway.config.admission,
                "instances": [v.__dict__ for v in gateway.snapshot.instances]}
