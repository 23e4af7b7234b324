"""The live runner against a fake OpenAI server over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from instances.launcher import free_port
from loadgen.config import RunConfig
from loadgen.metrics import RequestOutcome
from loadgen.request import Segment, TraceRequest, segment_key
from loadgen.runner import client_pool, run_live, send_one

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_GAP_S = 0.01


def _requests(count: int, gap_s: float) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", i * gap_s, 40, 4, segments=(Segment(segment_key(i), 40),))
            for i in range(count)]


class FakeServer:
    """Streams ``max_tokens`` one-character chunks, split oddly across writes; request r3
    gets an HTTP 500, r4 a stream error event, r5 a stream that stalls after one token."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.connections: set[tuple[str, int]] = set()
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ])

    async def models(self, request: Request) -> Response:
        return JSONResponse({"data": [{"id": "fake-model"}]})

    async def completions(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.bodies.append(body)
        if request.client is not None:
            self.connections.add((request.client.host, request.client.port))
        request_id = request.headers["x-request-id"]
        if request_id == "r3":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        instance = "inst-a" if int(request_id[1:]) % 3 else "inst-b"

        async def stream() -> AsyncIterator[bytes]:
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for index in range(body["max_tokens"]):
                if index:
                    await asyncio.sleep(TOKEN_GAP_S)
                if request_id == "r5" and index == 1:
                    await asyncio.sleep(30)
                chunk = json.dumps({"choices": [{"index": 0, "text": "x"}]})
                # An event split in the middle: the client must join lines across reads.
                yield f"data: {chunk[:7]}".encode()
                yield f"{chunk[7:]}\n\n".encode()
                if request_id == "r4":
                    yield b'data: {"error": {"message": "replica lost"}}\n\n'
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": body["max_tokens"],
                                              "prompt_tokens_details": {"cached_tokens": 10}}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-llmfleet-instance": instance})


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeServer, str]]:
    server = FakeServer()
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port,
                                         log_level="warning", lifespan="off"))
    task = asyncio.create_task(http.serve())
    while not http.started:
        await asyncio.sleep(0.01)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5.0)


async def test_live_runner_measures_latency_usage_and_errors(
        fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    config = RunConfig(url=url, slo_ttft_s=0.5, max_requests=6, request_timeout_s=1.0)
    summary = await run_live(config, requests=_requests(8, 0.01))
    # r3: HTTP 500; r4: error event; r5: stalls past the 1 s timeout.
    assert summary["requests"] == 6 and summary["completed"] == 3 and summary["errors"] == 3
    assert summary["model"] == "fake-model"
    assert summary["slo_attainment"] == pytest.approx(3 / 6)
    assert FIRST_TOKEN_DELAY_S <= summary["ttft_p50"] < FIRST_TOKEN_DELAY_S + 0.2
    assert TOKEN_GAP_S * 0.8 <= summary["tpot_p50"] < TOKEN_GAP_S + 0.1
    assert summary["cache_hit_rate"] == pytest.approx(10 / 40)
    assert summary["output_tokens_per_s"] > 0
    assert {p["instance_id"] for p in summary["per_instance"]} == {"inst-a", "inst-b"}
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and len(body["prompt"]) == 40
    assert all(isinstance(t, int) and 0 <= t < 256 for t in body["prompt"])


async def test_send_one_fills_outcome_fields_and_reports_errors(
        fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    client = client_pool(url, 4)
    try:
        requests = _requests(6, 0.0)
        outcomes = [RequestOutcome(r.request_id, 0.0, r.prompt_len, r.output_len)
                    for r in requests]
        for index in (0, 1):  # one after the other: the second reuses the connection
            await send_one(client, requests[index], outcomes[index], "m")
        ok = outcomes[1]
        assert ok.error is None and ok.output_tokens == 4 and ok.cached_tokens == 10
        assert ok.instance_id == "inst-a" and len(ok.inter_token_s) == 3
        assert ok.ttft_s is not None and ok.e2e_s is not None and ok.e2e_s > ok.ttft_s
        assert len(server.connections) == 1
        await send_one(client, requests[3], outcomes[3], "m")
        assert outcomes[3].error is not None and outcomes[3].error.startswith("HTTP 500: ")
        assert "boom" in outcomes[3].error
        await send_one(client, requests[4], outcomes[4], "m")
        assert outcomes[4].error == "stream error: {'message': 'replica lost'}"
        await send_one(client, requests[5], outcomes[5], "m", timeout_s=0.3)
        assert outcomes[5].error is not None and outcomes[5].error.startswith("TimeoutError")
        assert outcomes[5].ttft_s is not None and outcomes[5].e2e_s is None
        # The timed-out request's connection was dropped; the next request still works.
        await send_one(client, requests[2], outcomes[2], "m")
        assert outcomes[2].error is None and outcomes[2].output_tokens == 4
    finally:
        client.close()


async def test_live_runner_stops_sending_after_max_seconds(
        fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    config = RunConfig(url=url, model="m", max_seconds=0.25, drain_timeout_s=5.0)
    summary = await run_live(config, requests=_requests(100, 0.1))
    assert summary["requests"] == 3  # arrivals at 0.0, 0.1, 0.2
    assert len(server.bodies) == 3 and server.bodies[0]["model"] == "m"


async def test_live_runner_reports_connection_errors() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    summary = await run_live(RunConfig(url=url, model="m"), requests=_requests(2, 0.0))
    assert summary["errors"] == 2 and summary["completed"] == 0
    assert summary["slo_attainment"] == 0.0
