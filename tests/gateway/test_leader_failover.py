"""Leader failover: kill the gateway replica that runs the control loop's leader jobs.

Two gateway processes (`llmfleet gateway`, LAPS admission) share one Redis and two real
engine processes. The leader is SIGKILLed while requests stream through the other: that
one takes the lease within the lease time and publishes the next ring epoch (a replica that
joins afterwards is routed to), and every request sent to it is served exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from router.state import ClusterStateStore
from tests.fleet import engine_requests_served, wait_until

LEASE_S = 1.0


def _gateway(redis_url: str, namespace: str, gateway_id: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "gateway", "--redis-url", redis_url,
         "--port", str(port), "--namespace", namespace, "--gateway-id", gateway_id,
         "--leader-lease", str(LEASE_S), "--admission", "laps", "--heartbeat-ttl", "2"],
        text=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


@pytest.fixture
def engines(redis_url: str, namespace: str
            ) -> Iterator[tuple[EngineSupervisor, list[EngineSpec]]]:
    specs = [EngineSpec(instance_id=f"fo-engine-{i}", port=free_port(), speedup=20.0,
                        redis_url=redis_url, namespace=namespace, heartbeat_ttl_s=2.0)
             for i in range(3)]
    supervisor = EngineSupervisor(specs[:2], restart=False)
    supervisor.start()
    try:
        yield supervisor, specs
    finally:
        supervisor.stop()


async def _leader(redis_url: str, namespace: str) -> str | None:
    store = ClusterStateStore(redis_url, namespace)
    try:
        return await store.leader()
    finally:
        await store.close()


async def _ring(redis_url: str, namespace: str) -> tuple[int, list[str]]:
    store = ClusterStateStore(redis_url, namespace)
    try:
        epoch, members = await store.ring()
        return epoch, [m for m, _ in members]
    finally:
        await store.close()


@pytest.mark.e2e
def test_killing_the_leader_moves_the_loop_and_loses_no_request(
        redis_url: str, namespace: str,
        engines: tuple[EngineSupervisor, list[EngineSpec]]) -> None:
    _, specs = engines
    ports = {"gw-one": free_port(), "gw-two": free_port()}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["gw-one"] = _gateway(redis_url, namespace, "gw-one", ports["gw-one"])
        wait_until(lambda: asyncio.run(_leader(redis_url, namespace)) == "gw-one", 30)
        procs["gw-two"] = _gateway(redis_url, namespace, "gw-two", ports["gw-two"])
        survivor = f"http://127.0.0.1:{ports['gw-two']}"
        wait_until(lambda: _healthy(survivor) == 2, 30)
        served_before = sum(engine_requests_served(f"http://127.0.0.1:{s.port}")
                            for s in specs[:2])

        async def load() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i: int) -> int:
                    await asyncio.sleep(i * 0.05)
                    r = await client.post(survivor + "/v1/completions", json={
                        "prompt": f"request {i} " + "y" * (200 + 40 * i), "max_tokens": 4})
                    return r.status_code

                async def kill_leader() -> float:
                    await asyncio.sleep(0.5)
                    os.killpg(procs["gw-one"].pid, signal.SIGKILL)
                    return time.monotonic()

                killer = asyncio.ensure_future(kill_leader())
                statuses = await asyncio.gather(*(one(i) for i in range(60)))
                killed_at = await killer
                # The survivor runs the loop within the lease (plus one refresh).
                deadline = killed_at + LEASE_S + 2.0
                while await _leader(redis_url, namespace) != "gw-two":
                    assert time.monotonic() < deadline, "no takeover within the lease"
                    await asyncio.sleep(0.05)
                return list(statuses)

        statuses = asyncio.run(load())
        assert statuses == [200] * 60
        served_after = sum(engine_requests_served(f"http://127.0.0.1:{s.port}")
                           for s in specs[:2])
        assert served_after - served_before == 60  # each served once, none lost
        # The new leader publishes ring epochs: a replica that joins now enters the ring.
        epoch_before, _ = asyncio.run(_ring(redis_url, namespace))
        joiner = EngineSupervisor(specs[2:], restart=False)
        joiner.start()
        try:
            wait_until(lambda: specs[2].instance_id
                       in asyncio.run(_ring(redis_url, namespace))[1], 15)
            assert asyncio.run(_ring(redis_url, namespace))[0] > epoch_before
        finally:
            joiner.stop()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _healthy(url: str) -> int:
    try:
        return int(httpx.get(url + "/health", timeout=2).json().get("healthy_instances", 0))
    except (httpx.HTTPError, ValueError):
        return 0
