"""Stream continuity over real HTTP and gRPC: two engine servers (tiny executor), a client
streaming through ``migration.stitch`` while the request moves back and forth; the
stitched stream equals the unmigrated one (text, usage, one [DONE], no migration event)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from instances.engine.factory import build_engine_core
from instances.launcher import free_port
from instances.server import EngineServerConfig, create_engine_app
from migration.agent import MigrationAgent
from migration.coordinator import MigrationConfig, MigrationCoordinator, MigrationResult
from migration.stitch import MIGRATED_EVENT, Resume, StreamStitcher, stitch
from migration.transport import ChannelPool
from proto.headers import REQUEST_ID_HEADER
from proto.tokenize import BYTE_TOKENIZER
from tests.migration.fleet import reference_tokens

pytestmark = [pytest.mark.timeout(90), pytest.mark.e2e]

PROMPT = list(range(28, 100))  # greedy output runs 200+ tokens


@dataclass
class HttpReplica:
    name: str
    url: str
    migration: str
    server: uvicorn.Server
    task: asyncio.Task[None]
    agent: MigrationAgent


async def start_http_replica(name: str, speedup: float = 0.03) -> HttpReplica:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = EngineServerConfig(model="tiny", instance_id=name, advertise_url=url,
                                migration_port=0)
    app = create_engine_app(build_engine_core("tiny"), config, speedup=speedup)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return HttpReplica(name, url, app.state.migration_address, server, task,
                       app.state.migration_agent)


@pytest.fixture
async def replicas() -> AsyncIterator[dict[str, HttpReplica]]:
    started = {name: await start_http_replica(name) for name in ("a", "b")}
    for replica in started.values():
        await replica.agent.connect([r.migration for r in started.values() if r is not replica])
    yield started
    for replica in started.values():
        replica.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(replica.task, 5)


async def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in response.aiter_raw():
            yield data
    finally:
        await response.aclose()


async def _stream_with_moves(
    replicas: dict[str, HttpReplica], body: dict[str, Any], moves: list[tuple[int, str]],
) -> tuple[bytes, list[MigrationResult]]:
    pool = ChannelPool()
    coordinator = MigrationCoordinator(MigrationConfig(last_stage_max_blocks=2), pool)
    stitcher = StreamStitcher()
    results: list[MigrationResult] = []
    async with httpx.AsyncClient(timeout=30) as client:

        async def open_continuation(resume: Resume) -> AsyncIterator[bytes]:
            request = client.build_request("GET", resume.continuation_url)
            response = await client.send(request, stream=True)
            assert response.status_code == 200
            return _raw(response)

        async def mover() -> None:
            location = "a"
            for after, destination in moves:
                while stitcher.chunks < after and not stitcher.done:
                    await asyncio.sleep(0.002)
                if stitcher.done:
                    return
                result = await coordinator.migrate(
                    "req-1", replicas[location].migration, replicas[destination].migration)
                results.append(result)
                if result.committed:
                    location = destination

        request = client.build_request("POST", f"{replicas['a'].url}/v1/completions",
                                       json=body, headers={REQUEST_ID_HEADER: "req-1"})
        response = await client.send(request, stream=True)
        moving = asyncio.create_task(mover())
        out = b"".join([data async for data in stitch(_raw(response), open_continuation,
                                                      stitcher=stitcher)])
        await moving
    await coordinator.close()
    await pool.close()
    return out, results


def _parse(stream: bytes) -> tuple[str, list[dict[str, Any]], int]:
    events = [e for e in stream.split(b"\n\n") if e]
    chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return text, chunks, sum(1 for e in events if e == b"data: [DONE]")


@pytest.mark.parametrize("stop", [None, ["never-seen-stop-string"]])
async def test_stitched_stream_equals_the_unmigrated_stream(
    replicas: dict[str, HttpReplica], stop: list[str] | None,
) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 160, "stream": True,
                            "stream_options": {"include_usage": True}}
    if stop:
        body["stop"] = stop
    decoder = BYTE_TOKENIZER.decoder()
    expected_text = "".join(decoder.step(t) for t in reference_tokens(PROMPT, 160, 0.0, "x"))
    out, results = await _stream_with_moves(replicas, body, [(5, "b"), (40, "a"), (80, "b")])
    assert [r.status for r in results] == ["committed"] * 3, [
        (r.reason, r.stage_blocks, r.total_s) for r in results]
    assert MIGRATED_EVENT.encode() not in out
    text, chunks, done = _parse(out)
    assert text == expected_text and done == 1
    assert len({c["id"] for c in chunks}) == 1  # one response id across three replicas
    assert chunks[-1]["usage"]["completion_tokens"] == 160
    assert chunks[-1]["usage"]["prompt_tokens"] == len(PROMPT)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


async def test_source_stream_ends_with_the_migration_event(
    replicas: dict[str, HttpReplica],
) -> None:
    pool = ChannelPool()
    coordinator = MigrationCoordinator(pool=pool)
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"prompt": PROMPT, "max_tokens": 100, "stream": True}
        async with client.stream("POST", f"{replicas['a'].url}/v1/completions", json=body,
                                 headers={REQUEST_ID_HEADER: "r2"}) as response:
            seen = b""
            moved: MigrationResult | None = None
            async for data in response.aiter_raw():
                seen += data
                if moved is None and seen.count(b"data: {") >= 3:
                    moved = await coordinator.migrate("r2", replicas["a"].migration,
                                                      replicas["b"].migration)
                    assert moved.committed
        tail = seen.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert tail.startswith(f"event: {MIGRATED_EVENT}\n".encode())
        info = json.loads(tail.split(b"data: ", 1)[1])
        sent_text, _, done = _parse(seen)
        assert done == 0
        assert info["instance_id"] == "b" and info["url"] == replicas["b"].url
        assert info["request_id"] == "r2" and info["text_offset"] == len(sent_text)
        assert moved is not None and info["tokens"] == moved.num_output_tokens
        rest = await client.get(f"{replicas['b'].url}/v1/llmfleet/streams/r2",
                                params={"text_offset": info["text_offset"]})
        assert rest.status_code == 200
        text, _, done = _parse(rest.content)
        assert done == 1 and len(sent_text) + len(text.encode()) >= 100 - 1
        again = await client.get(f"{replicas['b'].url}/v1/llmfleet/streams/r2")
        assert again.status_code == 404  # a continuation is served once
    await coordinator.close()
    await pool.close()
