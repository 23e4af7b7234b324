"""Many light fake replicas in one process, for dashboard and gateway scale checks.

``python -m router.dashboard.stubfleet --instances 64 --redis-url URL`` listens on one
port per instance and registers each in Redis with a heartbeat and a load report (its own
in-flight count as ``num_running``, a KV usage that follows it, cumulative prefix-cache
counts), as a reference-engine replica would. Each port answers ``/v1/completions`` and
``/v1/chat/completions`` like an OpenAI server after a short fixed delay (streamed or not);
there is no model, so 64 of them cost one process and almost no CPU. Prints one JSON line,
``{"event": "stubfleet_ready", "instances": [...]}``, when all are registered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import time
import zlib
from typing import Any

import redis.asyncio as aioredis

from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE
from proto.registry import InstanceRecord, RegistryWriter

TOTAL_BLOCKS = 27_500
TOKENS = ("Hello", " from", " a", " stub", " replica", ".")


class StubReplica(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection to a fake replica."""

    def __init__(self, stats: dict[str, float], delay_s: float) -> None:
        self.stats = stats
        self.delay_s = delay_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            asyncio.get_running_loop().create_task(self.answer(method, path, body))

    async def answer(self, method: str, path: str, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if method != "POST":
            self._send(transport, 200, b'{"status":"ok"}')
            return
        try:
            request: dict[str, Any] = json.loads(body or b"{}")
        except ValueError:
            self._send(transport, 400, b'{"error":{"message":"bad json"}}')
            return
        prompt = json.dumps(request.get("prompt") or request.get("messages") or "")
        stats = self.stats
        stats["running"] += 1
        stats["queries"] += len(prompt)
        stats["hits"] += len(prompt) * 0.6
        try:
            await asyncio.sleep(self.delay_s)
            chat = path.endswith("/chat/completions")
            if request.get("stream"):
                await self._stream(transport, chat)
            else:
                text = "".join(TOKENS)
                choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant",
                                                                    "content": text},
                                           "finish_reason": "length"} if chat else
                                          {"index": 0, "text": text, "finish_reason": "length"})
                self._send(transport, 200, json.dumps({
                    "id": "cmpl-stub", "object": "chat.completion" if chat else
                    "text_completion", "created": int(time.time()), "model": "stub",
                    "choices": [choice], "usage": {"prompt_tokens": len(prompt),
                                                   "completion_tokens": len(TOKENS),
                                                   "total_tokens": len(prompt) + 6}}).encode())
        finally:
            stats["running"] -= 1
            stats["served"] += 1

    async def _stream(self, transport: asyncio.Transport, chat: bool) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
        for token in TOKENS:
            delta = ({"index": 0, "delta": {"content": token}, "finish_reason": None} if chat
                     else {"index": 0, "text": token, "finish_reason": None})
            event = b"data: " + json.dumps({"id": "cmpl-stub", "choices": [delta]}).encode() \
                + b"\n\n"
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(0.002)
        done = b"data: [DONE]\n\n"
        transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    @staticmethod
    def _send(transport: asyncio.Transport, status: int, payload: bytes) -> None:
        reason = b"OK" if status == 200 else b"Bad Request"
        transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (status, reason, len(payload),
                                                            payload))


async def run_stub_fleet(instances: int, redis_url: str, namespace: str, ttl_s: float,
                         delay_s: float, host: str = "127.0.0.1") -> None:
    """Serve and heartbeat ``instances`` fake replicas until cancelled (or SIGTERM)."""
    loop = asyncio.get_running_loop()
    writer = RegistryWriter(aioredis.Redis.from_url(redis_url, decode_responses=True),
                            namespace, ttl_s)
    replicas: list[tuple[str, str, dict[str, float]]] = []
    servers = []
    for i in range(instances):
        stats = {"running": 0.0, "served": 0.0, "queries": 0.0, "hits": 0.0}
        server = await loop.create_server(functools.partial(StubReplica, stats, delay_s),
                                          host, 0)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        replicas.append((f"stub-{i:03d}", f"http://{host}:{port}", stats))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def heartbeat() -> None:
        now = time.time()
        for instance_id, url, stats in replicas:
            # A steady per-instance KV baseline (so the page has something to show) plus
            # what its in-flight requests would hold.
            base = (zlib.crc32(instance_id.encode()) % 50) / 100
            kv = min(1.0, base + stats["running"] * 0.02)
            load = {"num_running": stats["running"], "num_waiting": 0.0,
                    "waiting_prefill_tokens": 0.0, "kv_usage": kv,
                    "free_blocks": TOTAL_BLOCKS * (1 - kv), "total_blocks": float(TOTAL_BLOCKS),
                    "report_time": now, "draining": 0.0,
                    "prefix_cache_queries": stats["queries"], "prefix_cache_hits": stats["hits"]}
            await writer.heartbeat(InstanceRecord(instance_id, url, "stub", api="openai",
                                                  load=load))

    await heartbeat()
    print(json.dumps({"event": "stubfleet_ready",
                      "instances": [{"instance_id": i, "url": u} for i, u, _ in replicas]}),
          flush=True)
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), ttl_s / 3)
            await heartbeat()
    finally:
        for instance_id, _, _ in replicas:
            with contextlib.suppress(Exception):
                await writer.deregister(instance_id)
        await writer.close()
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL_S)
    parser.add_argument("--delay", type=float, default=0.01,
                        help="seconds before a replica answers (default 0.01)")
    args = parser.parse_args(argv)
    asyncio.run(run_stub_fleet(args.instances, args.redis_url, args.namespace,
                               args.heartbeat_ttl, args.delay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
