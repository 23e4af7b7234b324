"""The gateway's ``StreamResumer``: one client stream across migrations and replica deaths.

It watches every streamed answer with ``migration.stitch.StreamStitcher`` (the migration
event is not passed on; the text relayed so far is counted) and, when the stream has to
continue elsewhere, opens the continuation on the gateway's own upstream pools:

1. The replica's stream ended with ``event: llmfleet.migrated`` (a live migration): continue
   at ``GET /v1/llmfleet/streams/{id}?text_offset=N`` on the destination it names.
2. The replica broke off mid-stream: ask the migration agents of the other registered
   replicas where the request runs now (it may have been migrated just before the source
   died) and continue there from the text the client already has.
3. Nobody has it: token replay (``migration.replay``) — re-issue the request on another
   healthy replica with the text generated so far appended and the remaining budget.
   The remaining budget counts one token per UTF-8 byte of generated text (the reference
   engine's byte-level tokenizer; an upper bound on tokens for subword tokenizers, so the
   continuation never runs longer than the original budget... but may run shorter). The
   replica's final ``usage`` counts that text as prompt; the client gets it back as
   completion tokens (prompt as the gateway tokenized it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from migration.coordinator import locate_request
from migration.replay import continuation_body
from migration.stitch import StreamStitcher, continuation_url
from migration.transport import ChannelPool
from proto.headers import REQUEST_ID_HEADER
from proto.registry import InstanceRecord
from router.forward import RequestContext
from router.upstream import Header, UpstreamClient, UpstreamError, UpstreamResponse

log = logging.getLogger("llmfleet.gateway")

_REQUEST_ID = REQUEST_ID_HEADER.encode()
_JSON = (b"content-type", b"application/json")
MAX_RESUMES = 16


class MigrationResumer:
    """Makes one ``_Watch`` per streamed request (see module docstring)."""

    def __init__(
        self,
        upstream: UpstreamClient,
        records: Callable[[], Mapping[str, InstanceRecord]],
        healthy: Callable[[str], bool] = lambda _: True,
        replay: bool = True,
        locate_timeout_s: float = 0.5,
    ) -> None:
        self.upstream = upstream
        self.records = records
        self.healthy = healthy
        self.replay = replay
        self.locate_timeout_s = locate_timeout_s
        self.pool = ChannelPool()
        self.resumed: dict[str, int] = {"migration": 0, "located": 0, "replay": 0}

    def watch(self, ctx: RequestContext) -> _Watch:
        return _Watch(self, ctx)

    async def close(self) -> None:
        await self.pool.close()


class _Watch:
    def __init__(self, resumer: MigrationResumer, ctx: RequestContext) -> None:
        self.resumer = resumer
        self.ctx = ctx
        self.stitcher = StreamStitcher()
        self.resumes = 0
        # Bytes of text the client had when the request was last replayed (0: never).
        self.replayed_bytes = 0
        self.failures: list[str] = []  # why the last resume found nowhere to continue

    @property
    def why_not_resumed(self) -> str | None:
        return "; ".join(self.failures) or None

    def feed(self, chunk: bytes) -> bytes:
        out = self.stitcher.feed(chunk)
        if self.replayed_bytes and b'"usage"' in out:
            out = self._client_usage(out)
        return out

    def _client_usage(self, out: bytes) -> bytes:
        """After a replay the replica's usage counts the text generated before it as prompt:
        report it as completion again. The prompt is the one the gateway tokenized (the
        backend's tokenizer); the shift is at most the replayed text's bytes (one token per
        byte at most)."""
        events = out.split(b"\n\n")
        for i, event in enumerate(events):
            if not (event.startswith(b"data: {") and b'"usage"' in event):
                continue
            try:
                chunk = orjson.loads(event[6:])
                usage = chunk["usage"]
                prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            shift = min(max(0, prompt - len(self.ctx.routing.token_ids)), self.replayed_bytes)
            usage["prompt_tokens"], usage["completion_tokens"] = prompt - shift, completion + shift
            events[i] = b"data: " + orjson.dumps(chunk)
        return b"\n\n".join(events)

    @property
    def wants_resume(self) -> bool:
        return self.stitcher.resume is not None

    async def resume(self, error: UpstreamError | None) -> tuple[str, UpstreamResponse] | None:
        stitcher = self.stitcher
        if stitcher.done or self.resumes >= MAX_RESUMES:
            return None
        self.resumes += 1
        self.failures = []
        records = self.resumer.records()
        moved = stitcher.resume
        if moved is not None:
            stitcher.continue_from()
            record = records.get(moved.instance_id)
            url = record.url if record is not None else moved.url
            answer = await self._get(url, moved.request_id, moved.text_offset)
            if answer is not None:
                self.resumer.resumed["migration"] += 1
                return moved.instance_id, answer
        elif error is None:
            return None  # the stream just ended (a replica without [DONE]): nothing to add
        stitcher.continue_from()
        # The replica that served the stream is gone (or its continuation is): find the
        # request on another replica, else replay it.
        failed = self.ctx.instance_id
        others = [r for r in records.values() if r.instance_id != failed]
        agents = [r.migration for r in others if r.migration]
        found = await locate_request(self.ctx.request_id, agents, self.resumer.pool,
                                     self.resumer.locate_timeout_s) if agents else None
        if found is not None:
            address, _ = found
            record = next((r for r in others if r.migration == address), None)
            if record is not None:
                answer = await self._get(record.url, self.ctx.request_id, stitcher.text_chars)
                if answer is not None:
                    self.resumer.resumed["located"] += 1
                    return record.instance_id, answer
        if not self.resumer.replay:
            self.failures.append("token replay is off")
            return None
        return await self._replay(others)

    async def _get(self, url: str, request_id: str, text_offset: int
                   ) -> UpstreamResponse | None:
        target = continuation_url("", request_id, text_offset)
        try:
            answer = await self.resumer.upstream.pool(url).request(
                b"GET", target, [(_REQUEST_ID, request_id.encode())])
        except UpstreamError:
            return None
        if answer.status != 200:
            with contextlib.suppress(UpstreamError):
                await answer.read()
            answer.close()
            return None
        return answer

    async def _replay(self, others: list[InstanceRecord]) -> tuple[str, UpstreamResponse] | None:
        ctx = self.ctx
        try:
            body: dict[str, Any] = orjson.loads(ctx.raw)
            generated = self.stitcher.text
            generated_bytes = len(generated.encode("utf-8"))
            replay = continuation_body(ctx.endpoint, body, generated, generated_bytes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            self.failures.append(f"it cannot be replayed ({exc})")
            return None
        raw = orjson.dumps(replay)
        headers: list[Header] = [_JSON, (_REQUEST_ID, ctx.request_id.encode())]
        for record in sorted(others, key=lambda r: r.instance_id):
            if not self.resumer.healthy(record.instance_id):
                self.failures.append(f"{record.instance_id} is not healthy")
                continue
            try:
                answer = await self.resumer.upstream.pool(record.url).request(
                    b"POST", ctx.endpoint, headers, raw)
            except UpstreamError as exc:
                self.failures.append(f"replay on {record.instance_id} failed: {exc}")
                continue
            if answer.status == 200:
                self.resumer.resumed["replay"] += 1
                self.replayed_bytes = generated_bytes
                return record.instance_id, answer
            refused = b""
            with contextlib.suppress(UpstreamError):
                refused = await answer.read()
            answer.close()
            # The replica's own words: a continuation it cannot take (too long for its
            # context, say) is the backend's judgement, and the only clue to it.
            self.failures.append(f"replay on {record.instance_id} refused ({answer.status}): "
                                 + refused[:300].decode(errors="replace"))
        if not others:
            self.failures.append("no other replica is in the fleet")
        log.warning("stream %s could not be continued: %s", ctx.request_id,
                    self.why_not_resumed)
        return None
