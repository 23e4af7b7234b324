"""The forward seam: send a routed request to its replica and relay the answer.

The client's body goes to the replica byte for byte, and the replica's answer comes back
the same way: status, content type and body (4xx included), with the serving replica's id
added as a header. A streamed answer is relayed chunk by chunk as it arrives, each chunk
handed to the server at once (no buffering, no re-encoding); the first token leaves as soon
as the replica sends it.

A stream can continue from another replica: a ``StreamResumer`` (live migration, token
replay, mid-stream failover) watches the relayed bytes and, when the replica's stream ends
with a migration event or breaks, may hand back a new upstream answer to relay on from;
the client sees one stream.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from starlette.types import Send

from proto.headers import INSTANCE_HEADER, REQUEST_ID_HEADER
from proto.openai import RouteView, error_body
from router.policy.interfaces import Decision, RoutingRequest
from router.upstream import Header, UpstreamError, UpstreamResponse

# The first SSE chunk that carries generated text (not the empty, role-only first delta).
# A byte search: parsing every chunk as JSON would cost more than the relay itself.
_TOKEN_TEXT = re.compile(rb'"(?:text|content)"\s*:\s*"(?!")')
_INSTANCE = INSTANCE_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class RequestContext:
    """One client request on its way through the gateway."""

    endpoint: str  # "/v1/completions" | "/v1/chat/completions"
    raw: bytes  # the client's body, forwarded unchanged
    view: RouteView
    routing: RoutingRequest
    started: float
    decision: Decision | None = None
    instance_id: str = ""
    cached_tokens: int | None = None
    attempts: int = 0
    first_token_at: float | None = None
    chunks: int = 0
    last_chunk_at: float = 0.0
    exclude: set[str] = field(default_factory=set)

    @property
    def request_id(self) -> str:
        return self.routing.request_id


class StreamWatch(Protocol):
    """One resumable stream's watcher (made by a ``StreamResumer`` per stream)."""

    def feed(self, chunk: bytes) -> bytes:
        """Note a chunk from the replica; return what to pass on to the client."""
        ...

    @property
    def wants_resume(self) -> bool:
        """True once the replica's stream announced that the request moved elsewhere."""
        ...

    async def resume(self, error: UpstreamError | None) -> tuple[str, UpstreamResponse] | None:
        """Where to continue: (instance id, its answer), or None to end the stream."""
        ...

    @property
    def why_not_resumed(self) -> str | None:
        """After ``resume`` gave None: why the stream could not go on (for the client)."""
        ...


class StreamResumer(Protocol):
    def watch(self, ctx: RequestContext) -> StreamWatch | None: ...


async def send_error(send: Send, status: int, message: str, error_type: str,
                     code: str | None = None, param: str | None = None,
                     headers: list[Header] | None = None) -> None:
    """An OpenAI-style JSON error as a whole response."""
    body = orjson.dumps(error_body(message, error_type, param, code))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Relay:
    """Relays replica answers to the client (plain or streamed) and reports progress."""

    def __init__(self, on_first_token: Callable[[RequestContext, float], None],
                 on_stream_error: Callable[[], None], clock: Callable[[], float]) -> None:
        self.on_first_token = on_first_token
        self.on_stream_error = on_stream_error
        self.clock = clock
        self.resumer: StreamResumer | None = None

    def response_headers(self, ctx: RequestContext, upstream: UpstreamResponse) -> list[Header]:
        content_type = upstream.header(b"content-type") or b"application/json"
        return [(b"content-type", content_type), (_INSTANCE, ctx.instance_id.encode()),
                (_REQUEST_ID, ctx.request_id.encode())]

    async def whole(self, ctx: RequestContext, upstream: UpstreamResponse, body: bytes,
                    send: Send) -> None:
        headers = self.response_headers(ctx, upstream)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": upstream.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def stream(self, ctx: RequestContext, upstream: UpstreamResponse, send: Send,
                     switch: Callable[[RequestContext, str], None]) -> None:
        """Relay an SSE answer until it ends; continue elsewhere if a resumer says so.

        ``switch(ctx, instance_id)`` is told when the stream continues on another replica.
        """
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_SSE_HEADERS, (_INSTANCE, ctx.instance_id.encode()),
                                (_REQUEST_ID, ctx.request_id.encode())]})
        watch = self.resumer.watch(ctx) if self.resumer is not None else None
        clock = self.clock
        while True:
            error: UpstreamError | None = None
            try:
                async for chunk in upstream.chunks():
                    if watch is not None:
                        chunk = watch.feed(chunk)
                        if not chunk:
                            continue
                    if ctx.first_token_at is None and _TOKEN_TEXT.search(chunk):
                        ctx.first_token_at = clock()
                        self.on_first_token(ctx, ctx.first_token_at)
                    ctx.chunks += 1
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                ctx.last_chunk_at = clock()
            except UpstreamError as exc:
                error = exc
            if watch is None or (error is None and not watch.wants_resume):
                break
            resumed = await watch.resume(error)
            if resumed is None:
                break
            upstream.close()
            instance_id, upstream = resumed
            switch(ctx, instance_id)
            error = None
        upstream.close()
        if error is not None:
            # The replica went away mid-stream and nothing could continue it. Say so in the
            # stream (OpenAI-style error event, then [DONE]) rather than cutting it silently.
            self.on_stream_error()
            why = watch.why_not_resumed if watch is not None else None
            event = error_body(f"The replica serving this request failed mid-stream: {error}"
                               + (f"; it could not be continued: {why}" if why else ""),
                               "server_error", code="upstream_stream_broken")
            await send({"type": "http.response.body",
                        "body": b"data: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
