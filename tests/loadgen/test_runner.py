"""The live runner against an in-process fake OpenAI server (httpx mock transport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from loadgen.config import RunConfig
from loadgen.request import Segment, TraceRequest, segment_key
from loadgen.runner import run_live

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_GAP_S = 0.01


def _requests(count: int, gap_s: float) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", i * gap_s, 40, 4, segments=(Segment(segment_key(i), 40),))
            for i in range(count)]


class FakeServer:
    """Streams ``max_tokens`` one-character chunks; request r3 gets an HTTP 500."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        request_id = request.headers["x-request-id"]
        if request_id == "r3":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        instance = "inst-a" if int(request_id[1:]) % 3 else "inst-b"

        async def stream() -> AsyncIterator[bytes]:
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for index in range(body["max_tokens"]):
                if index:
                    await asyncio.sleep(TOKEN_GAP_S)
                chunk = {"choices": [{"index": 0, "text": "x"}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": body["max_tokens"],
                                              "prompt_tokens_details": {"cached_tokens": 10}}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, content=stream(), headers={
            "content-type": "text/event-stream", "x-llmfleet-instance": instance})


async def test_live_runner_measures_latency_usage_and_errors() -> None:
    server = FakeServer()
    config = RunConfig(url="http://fake", slo_ttft_s=0.5, max_requests=6)
    summary = await run_live(config, requests=_requests(8, 0.01),
                             transport=httpx.MockTransport(server.handler))
    assert summary["requests"] == 6 and summary["completed"] == 5 and summary["errors"] == 1
    assert summary["model"] == "fake-model"
    assert summary["slo_attainment"] == pytest.approx(5 / 6)
    assert FIRST_TOKEN_DELAY_S <= summary["ttft_p50"] < FIRST_TOKEN_DELAY_S + 0.2
    assert TOKEN_GAP_S * 0.8 <= summary["tpot_p50"] < TOKEN_GAP_S + 0.1
    assert summary["cache_hit_rate"] == pytest.approx(10 / 40)
    assert summary["output_tokens_per_s"] > 0
    assert {p["instance_id"] for p in summary["per_instance"]} == {"inst-a", "inst-b"}
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and len(body["prompt"]) == 40
    assert all(isinstance(t, int) and 0 <= t < 256 for t in body["prompt"])


async def test_live_runner_stops_sending_after_max_seconds() -> None:
    server = FakeServer()
    config = RunConfig(url="http://fake", model="m", max_seconds=0.25, drain_timeout_s=5.0)
    summary = await run_live(config, requests=_requests(100, 0.1),
                             transport=httpx.MockTransport(server.handler))
    assert summary["requests"] == 3  # arrivals at 0.0, 0.1, 0.2
    assert len(server.bodies) == 3 and server.bodies[0]["model"] == "m"


async def test_live_runner_reports_connection_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    summary = await run_live(RunConfig(url="http://nowhere", model="m"),
                             requests=_requests(2, 0.0), transport=httpx.MockTransport(refuse))
    assert summary["errors"] == 2 and summary["completed"] == 0
    assert summary["slo_attainment"] == 0.0
