"""The stream stitcher and token-replay bodies (pure functions, no I/O)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migration.replay import continuation_body
from migration.stitch import (
    MIGRATED_EVENT,
    Resume,
    StreamStitcher,
    continuation_url,
    migrated_event,
    stitch,
)


def _chunk(text: str, finish: str | None = None, chat: bool = False) -> bytes:
    choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "finish_reason": finish})
    return b"data: " + json.dumps({"id": "cmpl-1", "choices": [choice]}).encode() + b"\n\n"


SOURCE = [_chunk("Hel"), _chunk("lo, "), _chunk("wörld")]
MOVE = migrated_event("r1", "engine-b", "http://127.0.0.1:9/", 10, 3).encode()


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for point in [*points, len(data)]:
        out.append(data[last:point])
        last = point
    return out


@given(cuts=st.lists(st.integers(0, 400), max_size=12), crlf=st.booleans())
def test_stitcher_passes_events_through_and_stops_at_the_migration_event(
    cuts: list[int], crlf: bool,
) -> None:
    body = b"".join(SOURCE)
    move = MOVE
    if crlf:
        body, move = body.replace(b"\n", b"\r\n"), move.replace(b"\n", b"\r\n")
    stream = body + move + _chunk("after the event: never forwarded")
    stitcher = StreamStitcher()
    out = b"".join(stitcher.feed(piece) for piece in _pieces(stream, cuts))
    assert out == body
    assert stitcher.resume == Resume("r1", "engine-b", "http://127.0.0.1:9/", 10, 3)
    assert stitcher.text == "Hello, wörld" and stitcher.text_chars == 12
    assert stitcher.chunks == 3 and not stitcher.done
    assert stitcher.resume.continuation_url == (
        "http://127.0.0.1:9/v1/llmfleet/streams/r1?text_offset=10")


def test_stitcher_counts_chat_deltas_and_sees_done() -> None:
    stitcher = StreamStitcher()
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    data = role + _chunk("ab", chat=True) + _chunk("c", "stop", chat=True) + b"data: [DONE]\n\n"
    assert stitcher.feed(data) == data
    assert stitcher.done and stitcher.finish_reason == "stop" and stitcher.text == "abc"
    assert stitcher.feed(b"data: late\n\n") == b""


def test_continuation_url_quotes_the_request_id() -> None:
    assert continuation_url("http://h:1", "a/b c") == "http://h:1/v1/llmfleet/streams/a%2Fb%20c"


async def _upstream(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise ConnectionError("replica died")


async def test_stitch_follows_migrations_and_recovers_from_a_dead_replica() -> None:
    opened: list[str] = []

    async def open_continuation(resume: Resume) -> AsyncIterator[bytes]:
        opened.append(resume.continuation_url)
        # The destination continues, then dies mid-stream.
        return _upstream(_chunk(" and"), fail=True)

    recovered: list[tuple[int, str]] = []

    async def recover(stitcher: StreamStitcher, error: BaseException | None
                      ) -> AsyncIterator[bytes] | None:
        assert isinstance(error, ConnectionError)
        recovered.append((stitcher.text_chars, stitcher.text))
        return _upstream(_chunk(" more", "length"), b"data: [DONE]\n\n")

    out = b"".join([d async for d in stitch(_upstream(*SOURCE, MOVE), open_continuation,
                                            recover)])
    text = "".join(json.loads(e[6:])["choices"][0]["text"]
                   for e in out.split(b"\n\n") if e.startswith(b"data: {"))
    assert text == "Hello, wörld and more" and out.endswith(b"data: [DONE]\n\n")
    assert MIGRATED_EVENT.encode() not in out
    assert opened == ["http://127.0.0.1:9/v1/llmfleet/streams/r1?text_offset=10"]
    assert recovered == [(16, "Hello, wörld and")]


async def test_stitch_without_recovery_raises_the_upstream_error() -> None:
    async def never(resume: Resume) -> AsyncIterator[bytes]:
        raise AssertionError("no migration here")

    with pytest.raises(ConnectionError):
        async for _ in stitch(_upstream(SOURCE[0], fail=True), never):
            pass


def test_replay_body_for_completions() -> None:
    body = {"model": "m", "prompt": "Once", "max_tokens": 10, "temperature": 0.7, "seed": 3,
            "stop": ["\n"], "stream": True}
    out = continuation_body("/v1/completions", body, " upon a", 3)
    assert out == {**body, "prompt": "Once upon a", "max_tokens": 7}
    assert body["prompt"] == "Once"  # the original is untouched
    ids = continuation_body("/v1/completions", {"prompt": [1, 2], "max_tokens": 4}, "x", 1,
                            generated_token_ids=[120])
    assert ids["prompt"] == [1, 2, 120] and ids["max_tokens"] == 3
    with pytest.raises(ValueError):
        continuation_body("/v1/completions", {"prompt": [1, 2]}, "x", 1)
    assert continuation_body("/v1/completions", {"prompt": "a"}, "b", 40)["max_tokens"] == 1


def test_replay_body_for_chat() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 20}
    out = continuation_body("/v1/chat/completions", body, "Hello the", 2)
    assert out["messages"][-1] == {"role": "assistant", "content": "Hello the"}
    assert out["continue_final_message"] and not out["add_generation_prompt"]
    assert out["max_completion_tokens"] == 18 and "max_tokens" not in out
    assert len(body["messages"]) == 1  # type: ignore[arg-type]
