"""Draining a replica under steady streaming load, through the real gateway (issue 11).

Four engine processes with migration agents behind a gateway. While streams run, one
replica is drained with the admin API: the gateway moves the streams it relays off it by
live migration, no client sees an error or a missing token, it leaves the rings, and the
admin API migrates a single request by hand as well.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.state import ClusterStateStore
from tests.fleet import gateway_fleet, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PROMPT = "A long answer, please, about fleets of replicas and their caches. "
MAX_TOKENS = 250  # ~2 s of modelled decode at speedup 1


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    with gateway_fleet(redis_url, namespace, 4, speedup=1.0,
                       policy="round_robin") as fleet:
        yield fleet


def _text(raw: bytes) -> tuple[str, int, bool]:
    text, done, error = "", 0, False
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = json.loads(event[6:])
            error = error or "error" in chunk
            text += "".join(c.get("text", "") for c in chunk.get("choices", []))
        done += event == b"data: [DONE]"
    return text, done, error


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, str, bytes]:
    body = {"prompt": f"{i}: {PROMPT}", "max_tokens": MAX_TOKENS, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        serving = response.headers["x-llmfleet-instance"]
        raw = b"".join([data async for data in response.aiter_raw()])
    return serving, response.headers["x-request-id"], raw


def test_drain_moves_streams_off_with_no_client_error(fleet: dict[str, Any]) -> None:
    url, gateway = fleet["url"], fleet["gateway"]
    victim = "engine-1"

    async def main() -> list[tuple[str, str, bytes]]:
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.ensure_future(_stream(client, url, i)) for i in range(8)]
            # Wait until the victim relays streams, then drain it.
            for _ in range(200):
                if any(c.instance_id == victim for c in gateway.streams.values()):
                    break
                await asyncio.sleep(0.02)
            r = await client.post(url + f"/admin/instances/{victim}/drain",
                                  json={"draining": True})
            assert r.status_code == 200
            return list(await asyncio.gather(*streams))

    results = asyncio.run(main())
    moved_off = [r for r in gateway.migrations.recent() if r.source == victim]
    assert moved_off and all(r.state == "committed" for r in moved_off), moved_off
    assert all(r.target != victim for r in moved_off)
    for _, _, raw in results:
        text, done, error = _text(raw)
        assert done == 1 and not error and len(text) > 0
    # Every stream was whole: the same lengths as the un-migrated ones (byte-level tokens).
    assert len({len(_text(raw)[0]) for _, _, raw in results}) == 1
    # It left the rings: the published membership no longer has it.
    wait_until(lambda: victim not in {v.instance_id for v in gateway.snapshot.instances
                                      if not v.draining}, timeout_s=10)
    async def ring_members() -> list[str]:
        store = ClusterStateStore(gateway.config.redis_url, gateway.config.namespace)
        try:
            return [m for m, _ in (await store.ring())[1]]
        finally:
            await store.close()

    assert victim not in asyncio.run(ring_members())
    assert {r.target for r in moved_off} <= {"engine-0", "engine-2", "engine-3"}


def test_admin_api_migrates_one_request_by_hand(fleet: dict[str, Any]) -> None:
    url, gateway = fleet["url"], fleet["gateway"]

    async def main() -> tuple[dict[str, Any], bytes, str]:
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.ensure_future(_stream(client, url, 99))
            for _ in range(200):
                if gateway.streams:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            request_id = next(iter(gateway.streams))
            source = gateway.streams[request_id].instance_id
            target = next(i for i in ("engine-0", "engine-2", "engine-3") if i != source)
            r = await client.post(url + f"/admin/requests/{request_id}/migrate",
                                  json={"target": target})
            assert r.status_code == 200, r.text
            _, _, raw = await task
            return r.json(), raw, target

    answer, raw, target = asyncio.run(main())
    assert answer["result"]["state"] == "committed" and answer["result"]["target"] == target
    text, done, error = _text(raw)
    assert done == 1 and not error and len(text) > 0
    unknown = httpx.post(url + "/admin/requests/nope/migrate", json={})
    assert unknown.status_code == 404
