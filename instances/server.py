"""``llmfleet engine``: one reference-engine replica behind an OpenAI-compatible HTTP API.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (plain and SSE streaming with
``data: [DONE]``), ``/v1/models``, ``/health``, ``/metrics`` (vLLM V1 metric names, or SGLang's
with ``--api sglang``, which also serves ``/get_load``). With a Redis URL the replica registers
itself in the cluster registry and heartbeats its load until it stops.

Live migration (``migration/``, docs/migration.md): the replica serves the gRPC
``MigrationAgent`` on ``--migration-port`` and announces it in its registry record. A
streamed request that moves ends its SSE stream here with an ``event: llmfleet.migrated``
naming the destination; the destination serves the rest at
``GET /v1/llmfleet/streams/{request_id}?text_offset=N`` (``migration.stitch``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from instances.async_engine import AsyncEngine, MigratedEvent
from instances.engine.core import EngineCore
from instances.engine.types import SamplingParams, TokenEvent
from instances.launcher import free_port
from instances.migration_adapter import EngineMigrationHandle
from instances.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from migration.agent import MigrationAgent
from migration.stitch import CONTINUATION_PATH, migrated_event
from proto.byte_tokenizer import EOS_TOKEN_ID
from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE
from proto.headers import CACHED_TOKENS_HEADER, INSTANCE_HEADER, REQUEST_ID_HEADER
from proto.logs import RequestIdMiddleware, add_log_format_argument, configure_logging
from proto.openai import OpenAIError, install_error_handlers
from proto.tokenize import BYTE_TOKENIZER, IncrementalDecoder, load_tokenizer

log = logging.getLogger("llmfleet.engine")

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)


@dataclass
class EngineServerConfig:
    """What one replica serves and how it announces itself."""

    model: str = "llmfleet-emulated"
    api: str = "vllm"  # "vllm" | "sglang": metric names and extra endpoints
    max_model_len: int = 131072
    instance_id: str = field(default_factory=lambda: f"engine-{uuid.uuid4().hex[:8]}")
    advertise_url: str = ""
    redis_url: str | None = None
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    namespace: str = DEFAULT_NAMESPACE
    weight: float = 1.0
    kv_events_endpoint: str | None = None  # e.g. "tcp://127.0.0.1:*" (any free port)
    # A local Hugging Face tokenizer (proto.tokenize); None: byte-level. The core must be
    # built with the same one (build_engine_core(tokenizer=...)) so its vocabulary matches.
    tokenizer: str | None = None
    # The gRPC migration agent: None serves none, 0 any free port.
    migration_port: int | None = 0
    migration_host: str = "127.0.0.1"


class EngineMetrics:
    """Prometheus metrics under vLLM V1 names (or SGLang's), in a registry of their own."""

    def __init__(self, engine: AsyncEngine, config: EngineServerConfig) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": config.model, "engine": config.instance_id}
        names = list(labels)
        core = engine.core
        reg = self.registry

        def gauge(name: str, doc: str, fn: Any) -> None:
            Gauge(name, doc, names, registry=reg).labels(**labels).set_function(fn)

        if config.api == "sglang":
            gauge("sglang:num_running_reqs", "Running requests",
                  lambda: core.stats().num_running)
            gauge("sglang:num_queue_reqs", "Queued requests", lambda: core.stats().num_waiting)
            gauge("sglang:token_usage", "KV token usage (0..1)", lambda: core.stats().kv_usage)
            gauge("sglang:cache_hit_rate", "Prefix cache hit rate", self._hit_rate)
        else:
            gauge("vllm:num_requests_running", "Running requests",
                  lambda: core.stats().num_running)
            gauge("vllm:num_requests_waiting", "Waiting requests",
                  lambda: core.stats().num_waiting)
            gauge("vllm:kv_cache_usage_perc", "KV cache usage (0..1)",
                  lambda: core.stats().kv_usage)
            # Counters derived from the core's cumulative counts: expose them as gauges
            # named like vLLM's counters so scrapers read the same names.
            gauge("vllm:prefix_cache_queries_total", "Prompt tokens looked up in prefix cache",
                  lambda: core.stats().prefix_cache_queries)
            gauge("vllm:prefix_cache_hits_total", "Prompt tokens served from prefix cache",
                  lambda: core.stats().prefix_cache_hits)
            gauge("vllm:num_preemptions_total", "Preemptions",
                  lambda: core.stats().num_preemptions)
        prefix = "sglang" if config.api == "sglang" else "vllm"
        self.ttft = Histogram(f"{prefix}:time_to_first_token_seconds", "TTFT (engine time)",
                              names, buckets=_LATENCY_BUCKETS, registry=reg).labels(**labels)
        self.itl = Histogram(f"{prefix}:inter_token_latency_seconds", "Inter-token latency",
                             names, buckets=_LATENCY_BUCKETS, registry=reg).labels(**labels)
        self.e2e = Histogram(f"{prefix}:e2e_request_latency_seconds", "End-to-end latency",
                             names, buckets=_LATENCY_BUCKETS, registry=reg).labels(**labels)
        self.prompt_tokens = Counter(f"{prefix}:prompt_tokens", "Prompt tokens", names,
                                     registry=reg).labels(**labels)
        self.generation_tokens = Counter(f"{prefix}:generation_tokens", "Generated tokens",
                                         names, registry=reg).labels(**labels)
        self.request_success = Counter(f"{prefix}:request_success", "Finished requests",
                                       [*names, "finished_reason"], registry=reg)
        self._labels = labels
        self._core = core

    def _hit_rate(self) -> float:
        stats = self._core.stats()
        if not stats.prefix_cache_queries:
            return 0.0
        return stats.prefix_cache_hits / stats.prefix_cache_queries

    def finished(self, reason: str) -> None:
        self.request_success.labels(**self._labels, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class _Generation:
    """Text and accounting of one request as its tokens arrive."""

    stop_strings: list[str]
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent to the client
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    decoder: IncrementalDecoder = field(default_factory=BYTE_TOKENIZER.decoder)
    eos_token_id: int | None = EOS_TOKEN_ID

    def add(self, event: TokenEvent) -> None:
        self.prompt_tokens = event.num_prompt_tokens
        self.cached_tokens = event.num_cached_tokens
        self.completion_tokens += len(event.new_token_ids)
        self.text += "".join(self.decoder.step(t) for t in event.new_token_ids
                             if t != self.eos_token_id)
        if event.finished:
            self.finish_reason = event.finish_reason
        for stop in self.stop_strings:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"

    def pending_text(self) -> str:
        """Text safe to send now: hold back what could still become a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop_strings), default=0)
        end = max(self.emitted, len(self.text) - hold)
        chunk = self.text[self.emitted:end]
        self.emitted = end
        return chunk

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def create_engine_app(
    core: EngineCore, config: EngineServerConfig, speedup: float = 1.0
) -> FastAPI:
    """The replica's FastAPI app. The engine loop and heartbeat run while the app lives."""
    tok = load_tokenizer(config.tokenizer)
    # Stop on the tokenizer's EOS (the core's byte-level EOS only stands in when there is none).
    stop_ids = () if tok.eos_token_id is None else (tok.eos_token_id,)
    publisher = None
    if config.kv_events_endpoint:
        from proto.kv_events import KVEventPublisher

        publisher = KVEventPublisher(config.instance_id, config.kv_events_endpoint)
    state: dict[str, Any] = {"draining": False,
                             "kv_events": publisher.endpoint if publisher else ""}

    def publish_kv_events(_: Any) -> None:
        assert publisher is not None
        publisher.publish(time.time(), core.drain_kv_events())

    engine = AsyncEngine(core, speedup=speedup,
                         on_step=publish_kv_events if publisher else None)
    metrics = EngineMetrics(engine, config)
    agent: MigrationAgent | None = None
    if config.migration_port is not None:
        agent = MigrationAgent(
            EngineMigrationHandle(engine, config.instance_id, config.advertise_url))
    state["migration"] = ""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if agent is not None:
            assert config.migration_port is not None
            state["migration"] = await agent.start(config.migration_host, config.migration_port)
            app.state.migration_address = state["migration"]
        heartbeat = None
        if config.redis_url:
            heartbeat = asyncio.create_task(_heartbeat_loop(engine, config, state))
        try:
            yield
        finally:
            if heartbeat is not None:
                state["stopping"] = True  # redis-py may swallow the cancel mid-command
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if agent is not None:
                await agent.stop(grace=1.0)
            await engine.stop()
            if publisher is not None:
                publisher.close()

    app = FastAPI(title="llmfleet engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    app.state.kv_events_endpoint = state["kv_events"]
    app.state.migration_agent = agent
    app.state.migration_address = ""

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "draining" if state["draining"] else "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config.model)]}

    @app.get("/metrics")
    async def prom_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    if config.api == "sglang":
        @app.get("/get_load")
        async def get_load() -> list[dict[str, Any]]:
            stats = core.stats()
            return [{
                "dp_rank": 0,
                "num_reqs": stats.num_running + stats.num_waiting,
                "num_waiting_reqs": stats.num_waiting,
                "num_tokens": int(stats.kv_usage * stats.total_blocks * stats.block_size),
            }]

    @app.get("/load")
    async def load() -> dict[str, Any]:
        stats = core.stats()
        return {**stats.__dict__, "engine_time": engine.engine_now(),
                "loop": engine.loop_stats.__dict__}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        try:
            prompt_ids = body.prompt_token_ids(tok)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="prompt") from exc
        return await _serve(request, body, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        try:
            prompt_ids = body.prompt_token_ids(tok)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="messages") from exc
        return await _serve(request, body, prompt_ids, chat=True)

    async def _serve(
        request: Request, body: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int], chat: bool,
    ) -> Response:
        if body.model is not None and body.model != config.model:
            raise OpenAIError(f"The model '{body.model}' does not exist", 404,
                              param="model", code="model_not_found")
        max_tokens = body.output_budget()
        if len(prompt_ids) + max_tokens > config.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {config.max_model_len} tokens; "
                f"the request has {len(prompt_ids)} prompt tokens and max_tokens={max_tokens}.",
                400, param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                seed=body.seed, stop_token_ids=stop_ids)
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if engine.has_request(request_id):
            raise OpenAIError(f"A request with id {request_id!r} is already in flight", 409,
                              param=REQUEST_ID_HEADER, code="duplicate_request_id")
        gen = _Generation(stop_strings=body.stop_strings(), decoder=tok.decoder(),
                          eos_token_id=tok.eos_token_id)
        started = engine.engine_now()
        response_id = ("chatcmpl-" if chat else "cmpl-") + request_id
        created = int(time.time())
        include_usage = body.include_usage_in_stream()
        # A streamed request can follow a live migration: the destination formats the rest
        # of its stream from this.
        client_state = json.dumps({
            "chat": chat, "id": response_id, "created": created, "model": config.model,
            "include_usage": include_usage, "stop": gen.stop_strings}).encode()
        events = engine.generate(request_id, prompt_ids, params, migratable=body.stream,
                                 client_state=client_state)
        try:
            first = await events.__anext__()  # admission errors surface before any byte
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, code="invalid_prompt") from exc
        except StopAsyncIteration as exc:  # pragma: no cover - generate always yields
            raise OpenAIError("engine produced no output", 500, "server_error") from exc
        metrics.prompt_tokens.inc(len(prompt_ids))
        metrics.ttft.observe(engine.engine_now() - started)

        async def all_events() -> AsyncIterator[TokenEvent]:
            yield first
            last = engine.engine_now()
            async for event in events:
                now = engine.engine_now()
                metrics.itl.observe(now - last)
                last = now
                yield event

        def finish() -> None:
            metrics.generation_tokens.inc(gen.completion_tokens)
            metrics.e2e.observe(engine.engine_now() - started)
            metrics.finished(gen.finish_reason or "abort")

        if not body.stream:
            async for event in all_events():
                gen.add(event)
                if gen.finish_reason:
                    break
            await events.aclose()
            finish()
            gen.pending_text()
            return JSONResponse(_full_response(chat, response_id, created, config.model, gen))

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse(_chunk(True, response_id, created, config.model,
                                      {"role": "assistant", "content": ""}, None))
                async for line in _sse_events(gen, all_events(), chat, response_id, created,
                                              config.model, include_usage):
                    yield line
            finally:
                await events.aclose()
                finish()

        # The first token is already here, so its prefix-cache hit can travel in a header:
        # the gateway's TTFT model learns from uncached tokens, not prompt length.
        return StreamingResponse(sse(), media_type="text/event-stream", headers={
            INSTANCE_HEADER: config.instance_id,
            CACHED_TOKENS_HEADER: str(first.num_cached_tokens)})

    @app.get(CONTINUATION_PATH)
    async def continuation(request_id: str, text_offset: int | None = None) -> Response:
        """The rest of a stream that migrated here, from character ``text_offset`` of its
        text on (default: right after what the source sent)."""
        try:
            moved = engine.attach(request_id)
        except KeyError as exc:
            raise OpenAIError(f"No migrated stream {request_id!r} waits here", 404,
                              code="stream_not_found") from exc
        client = json.loads(moved.client_state)
        gen = _Generation(stop_strings=list(client["stop"]), decoder=tok.decoder(),
                          eos_token_id=tok.eos_token_id)
        gen.add(TokenEvent(request_id, tuple(moved.output_token_ids), False, None,
                           len(moved.prompt_token_ids), moved.num_cached_tokens))
        hold = max((len(stop) - 1 for stop in gen.stop_strings), default=0)
        sent = max(0, len(gen.text) - hold) if text_offset is None else text_offset
        gen.emitted = min(max(0, sent), len(gen.text))
        cached = moved.num_cached_tokens

        async def keep_source_usage() -> AsyncIterator[TokenEvent]:
            # Usage reports the prompt cache hit where the request started.
            async for event in moved.events:
                yield event
                gen.cached_tokens = cached

        async def sse() -> AsyncIterator[str]:
            try:
                async for line in _sse_events(gen, keep_source_usage(), bool(client["chat"]),
                                              client["id"], int(client["created"]),
                                              client["model"], bool(client["include_usage"])):
                    yield line
            finally:
                await moved.events.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={INSTANCE_HEADER: config.instance_id})

    return app


async def _sse_events(
    gen: _Generation, events: AsyncIterator[TokenEvent], chat: bool, response_id: str,
    created: int, model: str, include_usage: bool,
) -> AsyncIterator[str]:
    """SSE lines of a stream's tokens, then usage and ``[DONE]``; or, when the request
    moved to another replica, a ``llmfleet.migrated`` event (and nothing held back for
    stop strings is flushed: the destination continues from ``gen.emitted``)."""
    async for event in events:
        if isinstance(event, MigratedEvent) and event.target is not None:
            target = event.target
            yield migrated_event(event.request_id, target.instance_id, target.url,
                                 gen.emitted, target.num_output_tokens)
            return
        gen.add(event)
        text = gen.pending_text()
        if text or gen.finish_reason:
            delta = {"content": text} if chat else text
            yield _sse(_chunk(chat, response_id, created, model, delta, gen.finish_reason))
        if gen.finish_reason:
            break
    if include_usage:
        chunk = _chunk(chat, response_id, created, model, None, None)
        chunk["choices"] = []
        chunk["usage"] = gen.usage()
        yield _sse(chunk)
    yield "data: [DONE]\n\n"


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "llmfleet"}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _chunk(chat: bool, response_id: str, created: int, model: str, delta: Any,
           finish_reason: str | None) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "logprobs": None,
                                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": model,
            "choices": [choice]}


def _full_response(chat: bool, response_id: str, created: int, model: str,
                   gen: _Generation) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": gen.text},
            "logprobs": None, "finish_reason": gen.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": gen.text, "logprobs": None,
                  "finish_reason": gen.finish_reason}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": gen.usage()}


async def _heartbeat_loop(engine: AsyncEngine, config: EngineServerConfig,
                          state: dict[str, Any]) -> None:
    """Register in Redis and refresh the registration with a load report, ~3× per TTL."""
    from proto.registry import InstanceRecord, RegistryWriter, load_report

    assert config.redis_url
    store = RegistryWriter.from_url(config.redis_url, config.namespace, config.heartbeat_ttl_s)
    period = config.heartbeat_ttl_s / 3
    try:
        while not state.get("stopping"):
            record = InstanceRecord(
                instance_id=config.instance_id, url=config.advertise_url, model=config.model,
                api=config.api, weight=config.weight, block_size=engine.core.block_size,
                load=load_report(engine.core.stats(), time.time(), state["draining"]),
                kv_events=state["kv_events"], migration=state["migration"])
            try:
                await store.heartbeat(record)
            except Exception as exc:  # Redis briefly away: keep serving, retry next period
                log.warning("heartbeat to %s failed: %s", config.redis_url, exc)
            await asyncio.sleep(period)
    finally:
        with contextlib.suppress(Exception):
            await store.deregister(config.instance_id)
        await store.close()


def run_engine(args: argparse.Namespace) -> int:
    from instances.engine.factory import build_engine_core

    configure_logging(args.log_format, process_name="engine")
    port = args.port or free_port(args.host)
    config = EngineServerConfig(
        model=args.model, api=args.api, max_model_len=args.max_model_len,
        instance_id=args.instance_id or f"engine-{port}",
        advertise_url=args.advertise_url or f"http://{args.host}:{port}",
        redis_url=args.redis_url or os.environ.get("REDIS_URL"),
        heartbeat_ttl_s=args.heartbeat_ttl, namespace=args.namespace, weight=args.weight,
        kv_events_endpoint=args.kv_events_endpoint or None, tokenizer=args.tokenizer or None,
        migration_port=(None if args.migration_port < 0
                        else args.migration_port or free_port(args.host)),
        migration_host=args.host)
    overrides: dict[str, Any] = {"enable_kv_events": bool(args.kv_events_endpoint)}
    if args.num_gpu_blocks:
        overrides["num_gpu_blocks"] = args.num_gpu_blocks
    core = build_engine_core(args.executor, args.profile, seed=args.seed,
                             tokenizer=config.tokenizer, **overrides)
    app = create_engine_app(core, config, speedup=args.speedup)
    # Log lines written while serving a request carry the gateway's id for it.
    app.add_middleware(RequestIdMiddleware, header=REQUEST_ID_HEADER)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=2))
    # Print where we listen first: launchers and tests wait for this line.
    migration = (f"{args.host}:{config.migration_port}"
                 if config.migration_port is not None else "")
    print(json.dumps({"event": "engine_ready", "instance_id": config.instance_id,
                      "url": config.advertise_url, "migration": migration}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("engine", help="run one reference-engine replica")
    p.add_argument("--executor", choices=("emulated", "tiny"), default="emulated")
    p.add_argument("--profile", default=None,
                   help="hardware profile (default: h100-llama3-8b, tiny-cpu for tiny)")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="run the emulated clock X times faster (reported times scaled back)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--model", default="llmfleet-emulated", help="served model name")
    p.add_argument("--api", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--num-gpu-blocks", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis-url", default=None, help="register in this Redis (or $REDIS_URL)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--instance-id", default=None)
    p.add_argument("--advertise-url", default=None)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL_S)
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a local Hugging Face tokenizer.json (or a directory with one): prompts "
                        "and outputs counted in its tokens; default byte-level")
    p.add_argument("--migration-port", type=int, default=0,
                   help="port of the gRPC live-migration agent (0: any free port, -1: none)")
    add_log_format_argument(p)
    p.add_argument("--kv-events-endpoint", default="",
                   help="publish vLLM-format KV events on this ZMQ endpoint "
                        "(tcp://127.0.0.1:* picks a free port)")
    p.set_defaults(func=run_engine)
