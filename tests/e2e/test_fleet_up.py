"""The whole fleet as a user runs it: `llmfleet up` (real Redis, Ray Serve, engine processes),
called with the official openai client, then stopped with Ctrl-C leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import psutil
import pytest

from instances.launcher import free_port
from tests.fleet import FleetProcess, engine_requests_served

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, Any]]:
    port = free_port()
    proc = FleetProcess(["--engines", "2", "--port", str(port), "--speedup", "20",
                         "--policy", "round_robin", "--heartbeat-ttl", "2"])
    try:
        ready = proc.wait_event("fleet_ready", timeout_s=180)
        engine_event = next(e for e in _all_events(proc) if e["event"] == "engines_ready")
        children = psutil.Process(proc.proc.pid).children(recursive=True)
        yield {"proc": proc, "url": ready["url"], "engines": engine_event["engines"],
               "children": children}
    finally:
        proc.kill()


def _all_events(proc: FleetProcess) -> list[dict[str, Any]]:
    events = []
    for line in proc.output:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def test_openai_client_completion_and_streamed_chat(fleet: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=fleet["url"] + "/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="llmfleet-emulated", prompt="Hello, fleet",
                                           max_tokens=8)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model="llmfleet-emulated", messages=[{"role": "user", "content": "Stream to me"}],
        max_tokens=12, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12

    for i in range(6):
        client.completions.create(model="llmfleet-emulated", prompt=f"spread {i}", max_tokens=2)
    served = [engine_requests_served(e["url"]) for e in fleet["engines"]]
    assert all(n > 0 for n in served), served


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", b'{"model": "llmfleet-emulated"}', 400),
        ("/v1/chat/completions", b'{"messages": "hello"}', 400),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
        ("/v1/completions", b'{"prompt": 17}', 400),
        ("/v1/completions", b'{"prompt": "x", "model": "no-such-model"}', 404),
    ],
)
def test_bad_input_gets_openai_error(fleet: dict[str, Any], path: str, body: bytes,
                                     status: int) -> None:
    response = httpx.post(fleet["url"] + path, content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert "code" in error


def test_ctrl_c_stops_everything(fleet: dict[str, Any]) -> None:
    children: list[psutil.Process] = fleet["children"]
    assert len(children) >= 3  # two engines, Redis, Ray's own processes
    assert fleet["proc"].interrupt(timeout_s=90) == 0
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
    output = "".join(fleet["proc"].output)
    assert "restarting" not in output  # replicas were stopped, not seen as crashed
    assert '"event": "stopped"' in output
