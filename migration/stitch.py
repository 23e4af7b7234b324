"""Stream stitching: one client stream across the replicas a request moves through.

When a live migration moves a streamed request, the source ends its SSE stream with

    event: llmfleet.migrated
    data: {"request_id": ..., "instance_id": ..., "url": ..., "text_offset": N, "tokens": T}

(no ``[DONE]``): every token generated on the source was sent before it, ``text_offset``
characters of text in all (text held back for a possible stop string is not sent: the
destination continues from that offset), ``tokens`` tokens. The destination serves the rest
of the stream, in the same format and with the same response id, at
``GET {url}/v1/llmfleet/streams/{request_id}?text_offset=N``; it may itself end with another
migration event.

``StreamStitcher`` is the pure part a forwarder runs over the upstream bytes: it passes
every SSE event through except the migration event, which it turns into ``resume`` (where to
continue), and it counts the text forwarded so far (``text_chars``, ``text``), which is what
a forwarder needs when the upstream dies mid-stream: resume at that offset wherever the
request runs now, or re-issue it elsewhere (``migration.replay``). ``stitch`` is the loop
around it, with the I/O passed in.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

MIGRATED_EVENT = "llmfleet.migrated"
CONTINUATION_PATH = "/v1/llmfleet/streams/{request_id}"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n")


def migrated_event(
    request_id: str, instance_id: str, url: str, text_offset: int, tokens: int
) -> str:
    """The SSE event a source sends last when its request moved to ``instance_id``."""
    data = {"request_id": request_id, "instance_id": instance_id, "url": url,
            "text_offset": text_offset, "tokens": tokens}
    return f"event: {MIGRATED_EVENT}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def continuation_url(url: str, request_id: str, text_offset: int | None = None) -> str:
    """Where a replica serves the rest of a migrated-in stream."""
    path = CONTINUATION_PATH.format(request_id=quote(request_id, safe=""))
    query = "" if text_offset is None else f"?text_offset={text_offset}"
    return f"{url.rstrip('/')}{path}{query}"


@dataclass(frozen=True)
class Resume:
    """Where a stream continues after a migration event."""

    request_id: str
    instance_id: str
    url: str
    text_offset: int
    tokens: int

    @property
    def continuation_url(self) -> str:
        return continuation_url(self.url, self.request_id, self.text_offset)


class StreamStitcher:
    """Relays an OpenAI SSE byte stream, spotting the migration event (see module doc).

    ``feed`` takes upstream bytes in any pieces and returns the bytes to forward now (whole
    events only). After a migration event ``resume`` is set and ``feed`` forwards nothing
    more from that upstream; ``continue_from`` starts on the next one.
    """

    def __init__(self, keep_text: bool = True) -> None:
        self._buffer = b""
        self.resume: Resume | None = None
        self.done = False  # saw ``data: [DONE]``
        self._text_chars = 0
        self._chunks = 0
        self._finish_reason: str | None = None
        self.hops = 0  # migrations followed
        self._keep_text = keep_text
        self._text: list[str] = []
        # Forwarded data not yet counted: the relay of a long stream must stay cheap, so the
        # JSON of its events is parsed only when someone asks what was sent (a resume).
        self._uncounted: list[bytes] = []

    @property
    def text_chars(self) -> int:
        """Characters of generated text forwarded."""
        self._settle()
        return self._text_chars

    @property
    def chunks(self) -> int:
        """Data events with generated text forwarded."""
        self._settle()
        return self._chunks

    @property
    def finish_reason(self) -> str | None:
        self._settle()
        return self._finish_reason

    @property
    def text(self) -> str:
        """The generated text forwarded so far (with ``keep_text``)."""
        self._settle()
        return "".join(self._text)

    def _settle(self) -> None:
        if not self._uncounted:
            return
        pending = b"".join(self._uncounted)
        self._uncounted.clear()
        for event in pending.replace(b"\r\n", b"\n").split(b"\n\n"):
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload.startswith(b"{"):
                        self._count(payload)

    @property
    def complete(self) -> bool:
        """The client got the whole stream."""
        return self.done

    def feed(self, data: bytes) -> bytes:
        if self.resume is not None or self.done:
            return b""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        start = 0
        if b"\r\n\r\n" not in buffer:
            # The common case (LF-separated events): the whole events before the first one
            # that may be special (a migration event, [DONE]) go on as one block, counted
            # later (``_settle``); only the rest is looked at event by event.
            special = min((at for at in (buffer.find(b"event:"), buffer.find(b"[DONE]"))
                           if at != -1), default=-1)
            cut = buffer.rfind(b"\n\n", 0, len(buffer) if special == -1 else special)
            if cut != -1:
                start = cut + 2
                block = buffer[:start]
                self._uncounted.append(block)
                out.append(block)
            if special == -1:
                self._buffer = buffer[start:]
                return out[0] if out else b""
        crlf = b"\r\n\r\n" in buffer
        while True:
            end, sep = _next_boundary(buffer, start, crlf)
            if end < 0:
                break
            event = buffer[start:end + sep]
            start = end + sep
            if self._forward(event):
                out.append(event)
            if self.resume is not None or self.done:
                start = len(buffer)  # nothing after a migration event or [DONE] counts
                break
        self._buffer = buffer[start:]
        return b"".join(out)

    def continue_from(self) -> None:
        """Start relaying the next upstream (after following ``resume``)."""
        self.resume = None
        self._buffer = b""
        self.hops += 1

    def _forward(self, event: bytes) -> bool:
        name = ""
        data: list[bytes] = []
        for line in event.splitlines():
            if line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        payload = b"\n".join(data)
        if name == MIGRATED_EVENT:
            info = json.loads(payload)
            self.resume = Resume(str(info["request_id"]), str(info["instance_id"]),
                                 str(info["url"]), int(info["text_offset"]),
                                 int(info.get("tokens", 0)))
            return False
        if payload == b"[DONE]":
            self.done = True
            return True
        if payload.startswith(b"{"):
            self._uncounted.append(event)
        return True

    def _count(self, payload: bytes) -> None:
        try:
            chunk: Any = json.loads(payload)
        except ValueError:
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                self._text_chars += len(text)
                self._chunks += 1
                if self._keep_text:
                    self._text.append(text)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]


def _next_boundary(buffer: bytes, start: int, crlf: bool = True) -> tuple[int, int]:
    if not crlf:  # no CRLF separator anywhere: do not rescan the buffer for one per event
        at = buffer.find(b"\n\n", start)
        return (at, 2) if at != -1 else (-1, 0)
    best, size = -1, 0
    for sep in _BOUNDARIES:
        at = buffer.find(sep, start)
        if at != -1 and (best == -1 or at < best):
            best, size = at, len(sep)
    return best, size


Upstream = AsyncIterator[bytes]


async def stitch(
    first: Upstream,
    open_continuation: Callable[[Resume], Awaitable[Upstream]],
    recover: Callable[[StreamStitcher, BaseException | None], Awaitable[Upstream | None]]
    | None = None,
    max_hops: int = 32,
    stitcher: StreamStitcher | None = None,
) -> AsyncIterator[bytes]:
    """The client's stream: ``first``'s bytes, then each continuation after a migration
    event (``open_continuation``). When an upstream fails or ends before ``[DONE]``,
    ``recover`` (if given) may return another upstream to go on with (the request found
    on another replica at ``stitcher.text_chars``, or a token replay); otherwise the error
    propagates (or the stream just ends, if the upstream ended cleanly)."""
    stitcher = stitcher or StreamStitcher()
    upstream: Upstream | None = first
    while upstream is not None:
        failure: BaseException | None = None
        try:
            async for data in upstream:
                out = stitcher.feed(data)
                if out:
                    yield out
                if stitcher.resume is not None or stitcher.done:
                    break
        except Exception as exc:  # connection errors of any HTTP client library
            failure = exc
        finally:
            close = getattr(upstream, "aclose", None)
            if close is not None:
                await close()
        if stitcher.done:
            return
        if stitcher.resume is not None and stitcher.hops < max_hops:
            resume = stitcher.resume
            stitcher.continue_from()
            upstream = await open_continuation(resume)
            continue
        upstream = await recover(stitcher, failure) if recover is not None else None
        if upstream is None:
            if failure is not None:
                raise failure
            return
        stitcher.continue_from()
