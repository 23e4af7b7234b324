"""The reference-engine replica over real HTTP: OpenAI API, errors, metrics, registration."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from instances.engine.factory import build_engine_core
from instances.launcher import free_port
from instances.server import EngineServerConfig, create_engine_app
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread, wait_until


def _serve(api: str = "vllm", redis_url: str | None = None, namespace: str = "llmfleet",
           speedup: float = 50.0) -> Iterator[str]:
    core = build_engine_core("emulated", num_gpu_blocks=4096)
    config = EngineServerConfig(api=api, redis_url=redis_url, namespace=namespace,
                                heartbeat_ttl_s=1.0, instance_id="engine-test",
                                advertise_url="http://127.0.0.1:1")
    with serve_in_thread(create_engine_app(core, config, speedup=speedup), free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    yield from _serve()


def test_completion_reports_usage_and_cached_tokens(engine_url: str) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes = 22 full blocks
    first = httpx.post(engine_url + "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 5}, timeout=30).json()
    assert first["object"] == "text_completion"
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["prompt_tokens"] == len(prompt)
    assert first["usage"]["completion_tokens"] == 5
    again = httpx.post(engine_url + "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 5}, timeout=30).json()
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (len(prompt) // 16) * 16 or cached == (len(prompt) - 1) // 16 * 16
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # deterministic


def test_token_id_prompt_and_chat_stream(engine_url: str) -> None:
    ids = list(b"token ids work too")
    body = httpx.post(engine_url + "/v1/completions",
                      json={"prompt": ids, "max_tokens": 3}, timeout=30).json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream("POST", engine_url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}}) as response:
        cached_header = response.headers["x-llmfleet-cached-tokens"]
        lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text) == 6
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert int(cached_header) == chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_stop_string_ends_generation(engine_url: str) -> None:
    free = httpx.post(engine_url + "/v1/completions",
                      json={"prompt": "stop test", "max_tokens": 40}, timeout=30).json()
    text = free["choices"][0]["text"]
    stop = text[10:12]
    cut = httpx.post(engine_url + "/v1/completions",
                     json={"prompt": "stop test", "max_tokens": 40, "stop": stop},
                     timeout=30).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.find(stop)]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [300]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors(engine_url: str, body: dict[str, object], status: int,
                                        param: str) -> None:
    response = httpx.post(engine_url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_client_disconnect_aborts_request(engine_url: str) -> None:
    def running() -> float:
        for line in httpx.get(engine_url + "/metrics").text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("metric missing")

    with httpx.stream("POST", engine_url + "/v1/completions", timeout=30, json={
            "prompt": "long one", "max_tokens": 20000, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(lines)
        assert running() == 1
    wait_until(lambda: running() == 0, timeout_s=5)


def test_prompt_larger_than_kv_capacity_is_refused(engine_url: str) -> None:
    response = httpx.post(engine_url + "/v1/completions", timeout=30,
                          json={"prompt": "x", "max_tokens": 100000})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_prompt"


def test_sglang_personality() -> None:
    for url in _serve(api="sglang"):
        text = httpx.get(url + "/metrics").text
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"):
            assert name in text
        assert "vllm:" not in text
        load = httpx.get(url + "/get_load").json()
        assert load[0]["num_reqs"] == 0


def test_registers_in_redis_and_leaves_on_stop(redis_url: str, namespace: str) -> None:
    async def live() -> list[str]:
        store = ClusterStateStore(redis_url, namespace)
        try:
            return [r.instance_id for r in await store.live_instances()]
        finally:
            await store.close()

    for _url in _serve(redis_url=redis_url, namespace=namespace):
        wait_until(lambda: asyncio.run(live()) == ["engine-test"], timeout_s=5)
    assert asyncio.run(live()) == []


def test_duplicate_request_id_in_flight_is_a_409(engine_url: str) -> None:
    with httpx.stream("POST", engine_url + "/v1/completions", timeout=30,
                      headers={"x-request-id": "dup"},
                      json={"prompt": "one", "max_tokens": 20000, "stream": True}) as first:
        lines = first.iter_lines()
        next(lines)
        second = httpx.post(engine_url + "/v1/completions", timeout=30,
                            headers={"x-request-id": "dup"}, json={"prompt": "two"})
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "duplicate_request_id"
