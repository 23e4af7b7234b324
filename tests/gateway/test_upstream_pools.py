"""The gateway's upstream pools when a replica leaves the registry: its idle connections
close, and answers in flight go on to their end (a missed heartbeat is not a death)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from instances.launcher import free_port
from router.upstream import UpstreamClient
from tests.fleet import serve_in_thread


def test_a_replica_leaving_the_registry_keeps_its_answers_in_flight() -> None:
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events():  # type: ignore[no-untyped-def]
            for n in range(10):
                yield f"data: {n}\n\n".encode()
                await asyncio.sleep(0.05)
        return StreamingResponse(events(), media_type="text/event-stream")

    async def scenario(url: str) -> tuple[bytes, bool, bool]:
        client = UpstreamClient()
        idle = await client.pool(url).request(b"GET", "/stream", [])
        await idle.read()  # its connection is now idle, kept alive
        pool = client.pool(url)
        idle_connection = pool._idle[0]
        busy = await pool.request(b"GET", "/stream", [])
        received = b""
        async for chunk in busy.chunks():
            received += chunk
            if b"data: 2" in received and not pool.retired:
                client.forget(set())  # the replica left the registry mid-answer
        busy.close()
        client.close()
        return received, idle_connection.closed or idle_connection.transport is None \
            or idle_connection.transport.is_closing(), url not in client._pools

    with serve_in_thread(app, free_port()) as url:
        received, idle_closed, forgotten = asyncio.run(scenario(url))
    assert received == b"".join(f"data: {n}\n\n".encode() for n in range(10))
    assert idle_closed and forgotten
