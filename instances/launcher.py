"""Starts and supervises reference-engine replicas as child processes.

Each replica is a ``llmfleet engine`` process. Children are tied to the launcher's life
(``PR_SET_PDEATHSIG``), so even a launcher killed with SIGKILL leaves no replica behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE

log = logging.getLogger("llmfleet.launcher")

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free now (for tests and launchers; never hard-code ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM us when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class EngineSpec:
    """How to start one replica."""

    instance_id: str
    port: int
    executor: str = "emulated"
    profile: str | None = None
    speedup: float = 1.0
    redis_url: str | None = None
    model: str = "llmfleet-emulated"
    api: str = "vllm"
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    namespace: str = DEFAULT_NAMESPACE
    tokenizer: str | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "router.cli", "engine",
               "--executor", self.executor, "--port", str(self.port),
               "--instance-id", self.instance_id, "--speedup", repr(self.speedup),
               "--model", self.model, "--api", self.api,
               "--heartbeat-ttl", repr(self.heartbeat_ttl_s), "--namespace", self.namespace]
        if self.profile:
            cmd += ["--profile", self.profile]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.tokenizer:
            cmd += ["--tokenizer", self.tokenizer]
        return cmd + self.extra_args


class EngineProcess:
    """One supervised replica process."""

    def __init__(self, spec: EngineSpec, log_dir: str | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        stderr_target: int | object = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            stderr_target = open(  # noqa: SIM115 - owned by the child for its whole life
                os.path.join(self.log_dir, f"{self.spec.instance_id}.log"), "ab")
        self.proc = subprocess.Popen(
            self.spec.command(), stdout=subprocess.DEVNULL, stderr=stderr_target,  # type: ignore[arg-type]
            preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Own session: a terminal's Ctrl-C reaches only the launcher, which then stops
            # replicas in order instead of racing its supervisor restarting them.
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"engine {self.spec.instance_id} exited during start-up "
                                   f"(code {self.proc.returncode if self.proc else None})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.spec.url + "/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"engine {self.spec.instance_id} not healthy after {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout_s)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout_s: float = 5.0) -> None:
    """Ask ``proc`` to stop with ``sig``; kill it if it has not exited within
    ``timeout_s``. Nothing if it already exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EngineSupervisor:
    """Starts replicas, restarts ones that die (with a back-off), stops them all."""

    def __init__(self, specs: list[EngineSpec], log_dir: str | None = None,
                 restart: bool = True) -> None:
        self.engines = [EngineProcess(s, log_dir) for s in specs]
        self.restart = restart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        for engine in self.engines:
            engine.start()
        for engine in self.engines:
            engine.wait_healthy(timeout_s)
        if self.restart:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="engine-supervisor")
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for engine in self.engines:
                if not engine.alive() and not self._stop.is_set():
                    engine.restarts += 1
                    log.warning("engine %s exited (code %s); restarting (#%d)",
                                engine.spec.instance_id,
                                engine.proc.returncode if engine.proc else None,
                                engine.restarts)
                    engine.start()

    def pids(self) -> list[int]:
        return [e.proc.pid for e in self.engines if e.proc is not None]

    def describe(self) -> list[dict[str, object]]:
        return [{"instance_id": e.spec.instance_id, "url": e.spec.url,
                 "pid": e.proc.pid if e.proc else None} for e in self.engines]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        for engine in self.engines:
            engine.stop()


def print_event(event: str, **fields: object) -> None:
    """One JSON line on stdout: launchers and tests read these."""
    print(json.dumps({"event": event, **fields}), flush=True)


def backend_specs(urls: list[str] | None, fleet_file: str | None = None) -> list[Any]:
    """``BackendSpec``s (``instances.adapters``) for ``--backend URL``s (kind detected) and
    the backends a fleet file lists; ValueError for a bad URL or file."""
    from instances.adapters import BackendSpec, load_fleet_file

    specs: list[Any] = [BackendSpec(u) for u in urls or []]
    if fleet_file:
        specs += load_fleet_file(fleet_file)
    return specs


def watch_external_backends(urls: list[Any], redis_url: str, namespace: str,
                            ttl: float, tokenizer: str | None = None) -> threading.Thread | None:
    """Register servers llmfleet did not start (vLLM, SGLang, any OpenAI server): a thread
    of ``ExternalReplicaAgent``s health-checks each (URL strings or ``BackendSpec``s) and
    heartbeats its load; ``tokenizer`` (the gateway's) is checked against ``/tokenize``."""
    if not urls:
        return None
    from instances.adapters import BackendSpec, agents_for
    from proto.registry import RegistryWriter
    from proto.tokenize import load_tokenizer

    specs = [u if isinstance(u, BackendSpec) else BackendSpec(u) for u in urls]
    tok = load_tokenizer(tokenizer) if tokenizer else None

    async def main() -> None:
        store = RegistryWriter.from_url(redis_url, namespace, ttl)
        agents = agents_for(specs, store, poll_s=ttl / 3, tokenizer=tok)
        await asyncio.gather(*(a.run() for a in agents))

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True,
                              name="external-agents")
    thread.start()
    return thread


class BackendWatcher:
    """Watches a changing set of servers the fleet did not start, in the caller's loop.

    ``sync({instance_id: {"url", "kind", ...}})`` starts an ``ExternalReplicaAgent`` for
    each new entry and stops (and deregisters) the ones no longer listed, so backends added
    or removed through the gateway's admin API join and leave the rings.
    """

    def __init__(self, redis_url: str, namespace: str, ttl: float,
                 tokenizer: str | None = None) -> None:
        from proto.registry import RegistryWriter

        self.store = RegistryWriter.from_url(redis_url, namespace, ttl)
        self.poll_s = ttl / 3
        self.tokenizer = tokenizer
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def sync(self, wanted: dict[str, dict[str, Any]]) -> None:
        from instances.adapters import BackendSpec, agents_for
        from proto.tokenize import load_tokenizer

        for instance_id in list(self._tasks):
            key, task = self._tasks[instance_id]
            if instance_id not in wanted or json.dumps(wanted[instance_id],
                                                       sort_keys=True) != key:
                task.cancel()  # the agent deregisters on its way out
                del self._tasks[instance_id]
        tok = load_tokenizer(self.tokenizer) if self.tokenizer else None
        loop = asyncio.get_running_loop()
        for instance_id, fields in wanted.items():
            if instance_id in self._tasks:
                continue
            spec = BackendSpec(**{**fields, "instance_id": instance_id})
            agent = agents_for([spec], self.store, poll_s=self.poll_s, tokenizer=tok)[0]
            self._tasks[instance_id] = (json.dumps(fields, sort_keys=True),
                                        loop.create_task(agent.run()))

    @property
    def watching(self) -> list[str]:
        return sorted(self._tasks)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.store.close()
