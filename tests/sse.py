"""What a client saw in an OpenAI-style SSE stream (completions or chat), fed as it arrives:
the tests that move streams between replicas compare it with the unmigrated answer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamAnswer:
    """One client's stream: its text (completion ``text`` or chat ``delta.content``), the
    data events that carried text, ``[DONE]`` markers, the final usage, and anything
    unexpected: error chunks and any event that is not ``data:`` (a migration event the
    gateway should never let through)."""

    serving: str = ""
    request_id: str = ""
    text: str = ""
    chunks: int = 0  # data events with text
    done: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    errors: list[Any] = field(default_factory=list)
    raw: bytes = b""  # an event not yet complete

    def absorb(self, data: bytes) -> None:
        """Take in the next bytes of the stream (events may be split anywhere)."""
        *events, self.raw = (self.raw + data).split(b"\n\n")
        for event in events:
            if event == b"data: [DONE]":
                self.done += 1
            elif event.startswith(b"data: {"):
                self._chunk(json.loads(event[6:]))
            else:
                self.errors.append(event)

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.errors.append(chunk["error"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                self.text += text
                self.chunks += 1
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"]["completion_tokens"]
            self.prompt_tokens = chunk["usage"]["prompt_tokens"]
