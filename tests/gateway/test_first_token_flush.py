"""The gateway relays a streamed first token at once: it neither waits for a second chunk
nor lets Nagle's algorithm (a socket without TCP_NODELAY) hold the small write back.

A raw asyncio backend, registered in Redis like an engine, answers a streamed completion
with its first SSE chunk at once and the rest only after a pause of ``PAUSE_S``. A raw
socket client (TCP_NODELAY, no buffering) reads through a real gateway served by uvicorn
and stamps the moment the first chunk's bytes arrive. Backend and client share a clock, so
the relay delay is measured directly: it must be far below the pause (a gateway waiting
for more data would hand the token over only after it) and below the 40 ms a delayed ACK
costs a socket with Nagle on (what sglang-router 0.3.2 adds to every first token here).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from instances.launcher import free_port
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.state import ClusterStateStore, InstanceRecord
from tests.fleet import serve_in_thread, wait_until

PAUSE_S = 0.5
MODEL = "first-token-model"
ATTEMPTS = 5
# Relay delay limits: every attempt well inside the pause; the median below a delayed ACK.
MAX_DELAY_S = 0.100
MEDIAN_DELAY_S = 0.025

pytestmark = pytest.mark.e2e


def _chunk(text: str) -> bytes:
    payload = {"id": "cmpl-x", "object": "text_completion", "model": MODEL,
               "choices": [{"index": 0, "text": text, "logprobs": None,
                            "finish_reason": None}]}
    event = f"data: {json.dumps(payload)}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)  # one HTTP/1.1 chunk


class PausingBackend:
    """A streaming OpenAI-style backend: first chunk at once, the rest after ``PAUSE_S``.

    Runs its own event loop in a thread; ``first_sent`` holds, per request, the
    ``perf_counter`` time at which the first chunk was handed to the kernel.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.first_sent: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PausingBackend:
        self._thread.start()
        assert self._ready.wait(10), "backend did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the backend never delays
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if not head.startswith(b"POST /v1/completions"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                 b"content-length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                assert json.loads(body)["stream"] is True
                self.first_sent.append(time.perf_counter())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + _chunk("first"))
                await writer.drain()
                await asyncio.sleep(PAUSE_S)
                done = b"data: [DONE]\n\n"
                writer.write(_chunk(" second") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _register(redis_url: str, namespace: str, backend: PausingBackend) -> None:
    store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=60.0)
    try:  # registered as an engine registers itself, for longer than the test lasts
        await store.heartbeat(InstanceRecord(instance_id="pausing-0", url=backend.url,
                                             model=MODEL))
    finally:
        await store.close()


@pytest.fixture
def gateway_url(redis_url: str, namespace: str) -> Iterator[tuple[str, PausingBackend]]:
    with PausingBackend() as backend:
        asyncio.run(_register(redis_url, namespace, backend))
        gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                        policy="round_robin", refresh_interval_s=0.1))
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            wait_until(lambda: httpx.get(url + "/health").json().get("healthy_instances") == 1,
                       timeout_s=10)
            yield url, backend


def _stream_once(sock: socket.socket, host: str) -> tuple[float, bytes]:
    """One streamed request on ``sock``: (time the first token's bytes arrived, all bytes)."""
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 8,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (host.encode(), len(body), body))
    received = b""
    first_at = 0.0
    while b"0\r\n\r\n" not in received[-16:] or b"[DONE]" not in received:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("gateway closed the connection")
        received += data
        if not first_at and b'"first"' in received:
            first_at = time.perf_counter()
    return first_at, received


def test_first_token_reaches_the_client_at_once(gateway_url: tuple[str, PausingBackend]
                                                ) -> None:
    url, backend = gateway_url
    host = url.removeprefix("http://")
    address = host.split(":")
    delays = []
    # Several requests on one keep-alive connection: Nagle bites a connection that has
    # unacknowledged bytes in flight, as it does from the second response on.
    with socket.create_connection((address[0], int(address[1])), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for attempt in range(ATTEMPTS):
            first_at, received = _stream_once(sock, host)
            assert received.startswith(b"HTTP/1.1 200"), received[:200]
            assert b'" second"' in received and b"data: [DONE]" in received
            sent_at = backend.first_sent[attempt]
            delays.append(first_at - sent_at)
    assert all(d >= 0 for d in delays), delays
    assert max(delays) < MAX_DELAY_S, f"first token held back: delays {delays}"
    assert statistics.median(delays) < MEDIAN_DELAY_S, f"first token delayed: {delays}"
