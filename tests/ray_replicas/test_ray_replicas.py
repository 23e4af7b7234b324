"""Replicas as Ray actors on a local Ray cluster: register, serve, restart after a kill, drain.

Two replicas: a reference engine (``kind="llmfleet"``, it registers itself) and a server
given as a command line with ``kind="vllm"`` (the reference engine again, speaking vLLM's
API and metrics: the actor's agent registers it), so both supervision paths run here
without a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from instances.ray_replicas import ReplicaSpec, start_replicas, stop_replicas
from proto.registry import InstanceRecord
from router.state import ClusterStateStore
from tests.fleet import read_events, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="llmfleet-test-replicas", _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


def _live(redis_url: str, namespace: str) -> dict[str, InstanceRecord]:
    async def read() -> dict[str, InstanceRecord]:
        store = ClusterStateStore(redis_url, namespace, 1.0)
        try:
            return {r.instance_id: r for r in await store.live_instances()}
        finally:
            await store.close()

    return asyncio.run(read())


def _info(handle: Any) -> dict[str, Any] | None:
    import ray

    try:
        return dict(ray.get(handle.info.remote(), timeout=5))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # restarting


def test_replica_actors_register_serve_restart_and_drain(
        ray_cluster: None, redis_url: str, namespace: str) -> None:
    common: dict[str, Any] = {"redis_url": redis_url, "namespace": namespace,
                              "host": "127.0.0.1", "heartbeat_ttl_s": 1.0, "num_cpus": 0.5}
    engine = ReplicaSpec("ray-engine", engine_args=("--num-gpu-blocks", "4096"), **common)
    command_line = ReplicaSpec(
        "ray-vllm", kind="vllm", command=(
            sys.executable, "-m", "router.cli", "engine", "--host", "{host}",
            "--port", "{port}", "--model", "served-by-command", "--num-gpu-blocks", "4096"),
        **common)
    handles = start_replicas([engine, command_line])
    try:
        infos = {i["instance_id"]: i for i in (_info(h) for h in handles) if i}
        assert set(infos) == {"ray-engine", "ray-vllm"}
        assert not any(i["restarted"] for i in infos.values())
        wait_until(lambda: {k: r.url for k, r in _live(redis_url, namespace).items()}
                   == {k: i["url"] for k, i in infos.items()}, timeout_s=20)
        live = _live(redis_url, namespace)
        assert live["ray-vllm"].api == "vllm" and live["ray-vllm"].model == "served-by-command"
        for info in infos.values():
            r = httpx.post(info["url"] + "/v1/completions", timeout=30,
                           json={"prompt": "hello from ray", "max_tokens": 4})
            assert r.status_code == 200

        # A crash of either server: its actor ends, Ray restarts it, it registers again.
        for handle, name in zip(handles, ("ray-engine", "ray-vllm"), strict=True):
            os.kill(infos[name]["pid"], signal.SIGKILL)
            started = time.monotonic()
            wait_until(lambda h=handle: (_info(h) or {}).get("restarted") is True,
                       timeout_s=120, interval_s=0.5)
            new = _info(handle)
            assert new is not None and new["pid"] != infos[name]["pid"]
            wait_until(lambda n=name, u=new["url"]: (
                _live(redis_url, namespace).get(n) is not None
                and _live(redis_url, namespace)[n].url == u), timeout_s=30)
            r = httpx.post(new["url"] + "/v1/completions", timeout=30,
                           json={"prompt": "hello again", "max_tokens": 4})
            assert r.status_code == 200
            infos[name] = new
            assert time.monotonic() - started < 120

        # Drain with a request in flight: it finishes; the replica is marked draining.
        import ray

        engine_url = infos["ray-engine"]["url"]
        result: dict[str, int] = {}

        def long_request() -> None:
            r = httpx.post(engine_url + "/v1/completions", timeout=60,
                           json={"prompt": "a long answer please", "max_tokens": 300})
            result["status"] = r.status_code
            result["tokens"] = r.json()["usage"]["completion_tokens"]

        thread = threading.Thread(target=long_request)
        thread.start()
        wait_until(lambda: ray.get(handles[0].in_flight.remote()) == 1, timeout_s=10)
        drained = ray.get(handles[0].drain.remote(30.0))
        thread.join(30)
        assert drained["drained"] and drained["waited_s"] > 0.2
        assert result == {"status": 200, "tokens": 300}
        assert _live(redis_url, namespace)["ray-engine"].load["draining"] == 1.0  # type: ignore[index]
    finally:
        results = stop_replicas(handles, drain_timeout_s=10.0)
    assert all(r["drained"] for r in results)
    assert _live(redis_url, namespace) == {}


def test_command_lines_get_host_ports_and_keep_their_json() -> None:
    from instances.ray_replicas import ReplicaActor, vllm_command

    spec = ReplicaSpec("r", "redis://x", kind="vllm", command=vllm_command(
        "/models/m", "--kv-events-config",
        '{"enable_kv_cache_events": true, "endpoint": "tcp://*:{kv_port}"}', python="py"))
    actor = ReplicaActor.__new__(ReplicaActor)
    actor.spec, actor.host, actor.port, actor.kv_port = spec, "10.0.0.9", 8001, 5557
    assert actor._command() == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m",
        "--host", "10.0.0.9", "--port", "8001", "--kv-events-config",
        '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}']
    with pytest.raises(ValueError, match="command line"):
        ReplicaSpec("r", "redis://x", kind="sglang")
    with pytest.raises(ValueError, match="unknown replica kind"):
        ReplicaSpec("r", "redis://x", kind="tgi")


def test_llmfleet_replicas_cli_starts_serves_and_drains_on_ctrl_c(
        redis_url: str, namespace: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "replicas", "--ray-address", "local",
         "--node-ip-address", "127.0.0.1", "--redis-url", redis_url, "--namespace", namespace,
         "--count", "2", "--num-cpus", "0.5", "--host", "127.0.0.1", "--heartbeat-ttl", "1",
         "--name-prefix", "cli", "--", "--num-gpu-blocks", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    output: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=read_events, args=(proc.stdout, events, output),
                     daemon=True).start()

    def wait_event(name: str) -> dict[str, Any]:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None or name == "replicas_stopped", "".join(output[-40:])
            with contextlib.suppress(queue.Empty):
                event = events.get(timeout=0.5)
                if event["event"] == name:
                    return event
        raise TimeoutError(f"no {name}:\n" + "".join(output[-40:]))

    try:
        ready = wait_event("replicas_ready")
        urls = {r["instance_id"]: r["url"] for r in ready["replicas"]}
        assert set(urls) == {"cli-0", "cli-1"}
        wait_until(lambda: {k: r.url for k, r in _live(redis_url, namespace).items()} == urls,
                   timeout_s=20)
        for url in urls.values():
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"prompt": "hello", "max_tokens": 2})
            assert r.status_code == 200
        os.killpg(proc.pid, signal.SIGINT)
        wait_event("replicas_stopped")
        assert proc.wait(60) == 0
        assert _live(redis_url, namespace) == {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
