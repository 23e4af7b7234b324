"""A small live fleet for the dashboard tests: real Redis, emulated engine processes, the
gateway in-process (uvicorn in a thread), and a background client sending requests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from router.auth import KeyStore
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.fleet import serve_in_thread, wait_until

TTL_S = 1.5
MODEL = "llmfleet-emulated"


@dataclass
class LiveFleet:
    url: str
    gateway: Gateway
    supervisor: EngineSupervisor
    api_key: str | None = None  # for /v1/* when auth is on
    sent: int = 0
    failed: list[str] = field(default_factory=list)

    def engine_url(self, instance_id: str) -> str:
        return next(e.spec.url for e in self.supervisor.engines
                    if e.spec.instance_id == instance_id)


def send(url: str, i: int, stream: bool, api_key: str | None = None) -> httpx.Response:
    """One request of a multi-turn workload: 16 conversations, each with its own opening
    (so their ring keys, and their homes, differ), growing turn by turn."""
    conversation = i % 16
    opening = f"conversation {conversation * 7919 % 1000:03d} about topic {conversation}: "
    prompt = opening * 24 + " ".join(f"turn {t}" for t in range(i // 16 + 1))
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.post(url + "/v1/completions", timeout=30, headers=headers,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": stream})


@contextlib.contextmanager
def live_fleet(redis_url: str, namespace: str, engines: int = 3, policy: str = "dualmap",
               admin_token: str | None = None) -> Iterator[LiveFleet]:
    """``engines`` emulated replicas and a gateway; with ``admin_token``, the gateway's auth
    is on (``router.auth``) and that is its admin token."""
    if admin_token is not None:
        asyncio.run(_set_admin_token(redis_url, namespace, admin_token))
    specs = [EngineSpec(instance_id=f"engine-{i}", port=free_port(), speedup=20.0,
                        redis_url=redis_url, namespace=namespace, heartbeat_ttl_s=TTL_S)
             for i in range(engines)]
    supervisor = EngineSupervisor(specs, restart=False)
    supervisor.start()
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace, policy=policy,
                                    heartbeat_ttl_s=TTL_S, refresh_interval_s=0.1,
                                    auth=admin_token is not None))
    try:
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            wait_until(lambda: httpx.get(url + "/health").json().get("healthy_instances")
                       == engines, timeout_s=30)
            yield LiveFleet(url, gateway, supervisor)
    finally:
        supervisor.stop()


async def _set_admin_token(redis_url: str, namespace: str, token: str) -> None:
    async with KeyStore(redis_url, namespace) as keys:
        await keys.set_admin_token(token)


@contextlib.contextmanager
def background_load(fleet: LiveFleet, interval_s: float = 0.05) -> Iterator[None]:
    """Requests one after another (every other one streamed) until the block ends."""
    stop = threading.Event()

    def run() -> None:
        i = 0
        while not stop.is_set():
            try:
                response = send(fleet.url, i, stream=i % 2 == 0, api_key=fleet.api_key)
                if response.status_code != 200:
                    fleet.failed.append(response.text)
            except httpx.HTTPError as exc:
                fleet.failed.append(repr(exc))
            fleet.sent += 1
            i += 1
            stop.wait(interval_s)

    thread = threading.Thread(target=run, daemon=True, name="dashboard-load")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
