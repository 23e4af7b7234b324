"""The gateway as a drop-in: what it does not need to understand goes through untouched.

A recording backend (a plain ASGI server registered in a real Redis) keeps every body it
receives; requests go through a real gateway over real HTTP. For each pass-through case the
backend must receive the client's bytes exactly, and a backend's own 4xx must come back
with its status and body unchanged. What routing needs is still checked by the gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from instances.launcher import free_port
from proto.registry import InstanceRecord
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread

MODEL = "recorded-model"
REFUSAL = {"object": "error", "message": "This model's maximum context length is 8 tokens",
           "type": "BadRequestError", "param": None, "code": 400}


class RecordingBackend:
    """Answers like an OpenAI server and records each request body byte for byte."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        if b"too-long-for-me" in body:
            status, payload = 400, json.dumps(REFUSAL).encode()
        else:
            status, payload = 200, json.dumps({"id": "x", "object": "text_completion",
                                               "choices": [{"index": 0, "text": "ok"}]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    backend = RecordingBackend()
    with serve_in_thread(backend, free_port()) as backend_url:
        async def register() -> None:
            store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=120)
            await store.heartbeat(InstanceRecord("rec-0", backend_url, MODEL, api="openai"))
            await store.close()

        asyncio.run(register())
        gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                        policy="dualmap"))
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            yield {"url": url, "backend": backend}


PASS_THROUGH = {
    "n=2": ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2, "max_tokens": 4}),
    "best_of, top_k, unknown fields": (
        "/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3, "top_k": 20,
                            "min_p": 0.1, "repetition_penalty": 1.1, "x_vendor": {"a": [1]}}),
    "logprobs": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 5,
                                     "echo": True}),
    "token ids beyond the byte vocabulary": (
        "/v1/completions", {"model": MODEL, "prompt": [128000, 9906, 1917, 0, 2**31 - 1]}),
    "a batch of prompts": ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"]}),
    "a batch of token-id prompts": ("/v1/completions", {"model": MODEL,
                                                        "prompt": [[1, 2], [300000]]}),
    "tools": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}],
        "tool_choice": "auto", "parallel_tool_calls": False}),
    "response_format": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "json please"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        "logprobs": True, "top_logprobs": 3, "n": 3, "seed": 7}),
    "image parts and tool messages": ("/v1/chat/completions", {
        "model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,AA=="}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]}),
}


@pytest.mark.parametrize("case", list(PASS_THROUGH))
def test_body_reaches_the_backend_byte_for_byte(fleet: dict[str, Any], case: str) -> None:
    endpoint, payload = PASS_THROUGH[case]
    # Odd spacing and key order on purpose: nothing may re-encode the body on the way.
    raw = json.dumps(payload, indent=1, sort_keys=True).encode() + b"\n "
    response = httpx.post(fleet["url"] + endpoint, content=raw,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 200, response.text
    assert fleet["backend"].bodies[-1] == raw
    assert response.headers["x-llmfleet-instance"] == "rec-0"


def test_backend_4xx_comes_back_unchanged(fleet: dict[str, Any]) -> None:
    raw = json.dumps({"model": MODEL, "prompt": "too-long-for-me"}).encode()
    response = httpx.post(fleet["url"] + "/v1/completions", content=raw, timeout=10)
    assert response.status_code == 400
    assert response.json() == REFUSAL
    assert fleet["backend"].bodies[-1] == raw


@pytest.mark.parametrize(("endpoint", "raw", "status", "param"), [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"model": "recorded-model"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": [1, -5]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "model": 3}', 400, "model"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', 400, "messages.0"),
    ("/v1/completions", b'{"prompt": "x", "model": "no-such-model"}', 404, "model"),
])
def test_what_routing_needs_is_still_checked(fleet: dict[str, Any], endpoint: str, raw: bytes,
                                             status: int, param: str | None) -> None:
    seen = len(fleet["backend"].bodies)
    response = httpx.post(fleet["url"] + endpoint, content=raw, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert len(fleet["backend"].bodies) == seen  # refused at the gateway, never forwarded


def test_body_limit(redis_url: str, namespace: str) -> None:
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    max_body_bytes=1000))
    with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
        response = httpx.post(url + "/v1/completions",
                              content=json.dumps({"prompt": "x" * 2000}).encode(), timeout=10)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
