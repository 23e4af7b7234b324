"""Helpers for tests that start real fleets: processes, ports, readiness."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import httpx
import uvicorn


def read_events(stream: IO[str], sink: queue.Queue[dict[str, Any]],
                log: list[str]) -> None:
    """Forward JSON event lines of a child's stdout into ``sink``; keep all lines in ``log``."""
    for line in stream:
        log.append(line)
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                sink.put(json.loads(line))


class FleetProcess:
    """``llmfleet up`` as a child process, readable events, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "up", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.output: list[str] = []
        assert self.proc.stdout is not None
        threading.Thread(target=read_events, args=(self.proc.stdout, self.events, self.output),
                         daemon=True).start()

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmfleet up exited {self.proc.returncode}:\n"
                                   + "".join(self.output[-60:]))
            with contextlib.suppress(queue.Empty):
                event = self.events.get(timeout=0.2)
                if event.get("event") == name:
                    return event
        raise TimeoutError(f"no {name} event in {timeout_s}s:\n" + "".join(self.output[-60:]))

    def interrupt(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int) -> Iterator[str]:
    """Serve an ASGI app on 127.0.0.1:port with uvicorn in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took; raise on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s}s")


def engine_requests_served(url: str) -> float:
    """Finished requests an engine reports in its /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:request_success_total", "sglang:request_success_total")):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def gateway_fleet(redis_url: str, namespace: str, engines: int, *, speedup: float,
                  heartbeat_ttl_s: float = 1.5, ready_timeout_s: float = 20.0,
                  executor: str = "emulated", engine_args: tuple[str, ...] = (),
                  **gateway_params: Any) -> Iterator[dict[str, Any]]:
    """``engines`` engine processes (``engine-0``...; ``executor``: emulated or tiny;
    ``engine_args`` added to each command line) registered in Redis, and a
    gateway (``GatewayConfig`` with ``gateway_params``) in front of them under uvicorn;
    yields ``{"url", "gateway", "supervisor", "specs"}`` once the gateway sees every engine
    healthy with its migration agent."""
    from instances.launcher import EngineSpec, EngineSupervisor, free_port
    from router.gateway import Gateway, GatewayConfig, create_gateway_app

    specs = [EngineSpec(instance_id=f"engine-{i}", port=free_port(), speedup=speedup,
                        redis_url=redis_url, namespace=namespace,
                        heartbeat_ttl_s=heartbeat_ttl_s, executor=executor,
                        extra_args=list(engine_args))
             for i in range(engines)]
    supervisor = EngineSupervisor(specs, restart=False)
    supervisor.start()
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace,
                                    heartbeat_ttl_s=heartbeat_ttl_s, refresh_interval_s=0.1,
                                    **gateway_params))

    def ready() -> bool:
        records = gateway.records
        healthy = sum(1 for v in gateway.snapshot.instances if v.healthy)
        return (healthy == engines and len(records) == engines
                and all(r.migration for r in records.values()))

    try:
        with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
            wait_until(ready, timeout_s=ready_timeout_s)
            yield {"url": url, "gateway": gateway, "supervisor": supervisor, "specs": specs}
    finally:
        supervisor.stop()
