"""Replicas on a Ray cluster: each one a Ray actor that runs and supervises one server.

A ``ReplicaActor`` is placed by Ray (``num_gpus`` per replica puts it on a GPU node and sets
``CUDA_VISIBLE_DEVICES`` for it), starts its server as a child process on a free port of its
node, and keeps it registered in the fleet's Redis registry:

- the reference engine (``kind="llmfleet"``) registers and heartbeats itself;
- ``vllm serve`` / SGLang command lines (``kind="vllm"`` / ``"sglang"``) get an
  ``ExternalReplicaAgent`` in the actor that health-checks them and heartbeats their load.

Supervision is Ray's: when the server process dies, the actor exits, and Ray restarts the
actor (``max_restarts``), which starts a fresh server that registers again. ``stop`` drains
first: the replica is put in the registry's draining set (gateways send it nothing new),
the actor waits for its requests to finish (or a timeout), then stops the server and
deregisters it.

    llmfleet replicas --ray-address auto --redis-url redis://head:6379 --count 4 \\
        --num-gpus 1 --kind vllm -- --model meta-llama/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from proto.defaults import DEFAULT_HEARTBEAT_TTL_S, DEFAULT_NAMESPACE

log = logging.getLogger("llmfleet.ray_replicas")

KINDS = ("llmfleet", "vllm", "sglang")


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica: what to run and how much of the cluster it takes."""

    name: str  # its instance id in the registry
    redis_url: str
    kind: str = "llmfleet"
    # vllm / sglang: the server's command line; ``{host}``, ``{port}`` and ``{kv_port}`` (a
    # second free port, for vLLM's KV events) are filled in (``vllm_command`` /
    # ``sglang_command`` build the usual ones).
    command: tuple[str, ...] = ()
    # llmfleet: extra ``llmfleet engine`` arguments (executor, profile, tokenizer, ...).
    engine_args: tuple[str, ...] = ()
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # The address the server listens on and advertises: "auto" is the Ray node's IP.
    host: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    namespace: str = DEFAULT_NAMESPACE
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    start_timeout_s: float = 900.0
    max_restarts: int = -1  # -1: restart whenever it dies

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown replica kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind != "llmfleet" and not self.command:
            raise ValueError(f"a {self.kind} replica needs its server's command line")


def vllm_command(model: str, *extra: str, python: str = sys.executable) -> tuple[str, ...]:
    """vLLM's OpenAI server for ``model`` (the module form works for every vLLM build)."""
    return (python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "{host}", "--port", "{port}", *extra)


def sglang_command(model: str, *extra: str, python: str = sys.executable) -> tuple[str, ...]:
    """SGLang's server for ``model``."""
    return (python, "-m", "sglang.launch_server", "--model-path", model,
            "--host", "{host}", "--port", "{port}", *extra)


def _die_with_parent() -> None:
    # The server must not outlive its actor (a killed actor would leave a GPU taken).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ReplicaActor:
    """Runs one replica's server on this Ray node and keeps it registered (see module)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.stopping = False
        if spec.host == "auto":
            import ray

            self.host = ray.util.get_node_ip_address()
        else:
            self.host = spec.host
        self.port = _free_port(self.host)
        self.kv_port = _free_port(self.host)  # for {kv_port}: vLLM's KV-event publisher
        self.url = f"http://{self.host}:{self.port}"
        self.restarted = self._was_restarted()
        self.proc = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=None,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **spec.env},
            preexec_fn=_die_with_parent, start_new_session=True)
        self._agent_loop: asyncio.AbstractEventLoop | None = None
        self._agent_task: concurrent.futures.Future[None] | None = None
        self._wait_healthy()
        if spec.kind != "llmfleet":
            self._start_agent()
        threading.Thread(target=self._watch, daemon=True, name="replica-watch").start()

    @staticmethod
    def _was_restarted() -> bool:
        with contextlib.suppress(Exception):
            import ray

            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        return False

    def _command(self) -> list[str]:
        spec = self.spec
        if spec.kind == "llmfleet":
            return [sys.executable, "-m", "router.cli", "engine", "--host", self.host,
                    "--port", str(self.port), "--advertise-url", self.url,
                    "--instance-id", spec.name, "--redis-url", spec.redis_url,
                    "--namespace", spec.namespace,
                    "--heartbeat-ttl", repr(spec.heartbeat_ttl_s), *spec.engine_args]
        # Plain replacement, not str.format: arguments carry JSON braces of their own.
        fields = {"{host}": self.host, "{port}": str(self.port), "{kv_port}": str(self.kv_port)}
        out = []
        for part in spec.command:
            for placeholder, value in fields.items():
                part = part.replace(placeholder, value)
            out.append(part)
        return out

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.spec.name} exited during start-up "
                                   f"(code {self.proc.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        self.proc.kill()
        raise TimeoutError(f"replica {self.spec.name} not healthy after "
                           f"{self.spec.start_timeout_s}s")

    def _start_agent(self) -> None:
        from instances.adapters import ExternalReplicaAgent
        from proto.registry import RegistryWriter

        loop = asyncio.new_event_loop()
        self._agent_loop = loop
        threading.Thread(target=loop.run_forever, daemon=True, name="replica-agent").start()

        async def run() -> None:
            store = RegistryWriter.from_url(self.spec.redis_url, self.spec.namespace,
                                            self.spec.heartbeat_ttl_s)
            agent = ExternalReplicaAgent(self.url, store, self.spec.name, kind=self.spec.kind,
                                         poll_s=self.spec.heartbeat_ttl_s / 3)
            try:
                await agent.run()  # deregisters when cancelled
            finally:
                await store.close()

        self._agent_task = asyncio.run_coroutine_threadsafe(run(), loop)

    def _watch(self) -> None:
        """The server died on its own: end the actor, so Ray restarts it with a new one."""
        code = self.proc.wait()
        if not self.stopping:
            log.error("replica %s: server exited with %s; restarting the actor",
                      self.spec.name, code)
            os._exit(1)

    # -- remote methods ----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where the replica serves, its server's pid, and whether Ray restarted it."""
        return {"instance_id": self.spec.name, "url": self.url, "pid": self.proc.pid,
                "kind": self.spec.kind, "restarted": self.restarted,
                "actor_pid": os.getpid()}

    def in_flight(self) -> int:
        """Requests the server is running or queueing now (-1 if it cannot be read)."""
        try:
            if self.spec.kind == "llmfleet":
                load = httpx.get(self.url + "/load", timeout=2.0).json()
                return int(load["num_running"]) + int(load["num_waiting"])
            from instances.adapters import LoadReader
            from proto.backends import backend

            page = httpx.get(self.url + "/metrics", timeout=2.0).text
            read = LoadReader(backend(self.spec.kind), self.url).read(page)
            return int(read.get("num_running", 0) + read.get("num_waiting", 0))
        except (httpx.HTTPError, ValueError, KeyError):
            return -1

    def _set_draining(self, draining: bool) -> None:
        import redis

        from proto.registry import draining_key

        client = redis.Redis.from_url(self.spec.redis_url)
        try:
            key = draining_key(self.spec.namespace)
            if draining:
                client.sadd(key, self.spec.name)
            else:
                client.srem(key, self.spec.name)
        finally:
            client.close()

    def drain(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Take no new requests (registry draining set) and wait for the running ones."""
        self._set_draining(True)
        started = time.monotonic()
        idle = False
        while time.monotonic() - started < timeout_s:
            if self.in_flight() == 0:
                idle = True
                break
            time.sleep(0.1)
        return {"drained": idle, "waited_s": time.monotonic() - started}

    def stop(self, drain_timeout_s: float = 30.0) -> dict[str, Any]:
        """Drain, stop the server, leave the registry; the actor can then be killed."""
        result = self.drain(drain_timeout_s)
        self.stopping = True
        if self._agent_task is not None:
            self._agent_task.cancel()
            with contextlib.suppress(Exception):
                self._agent_task.result(timeout=5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        from proto.registry import RegistryWriter

        async def deregister() -> None:
            store = RegistryWriter.from_url(self.spec.redis_url, self.spec.namespace)
            try:
                await store.deregister(self.spec.name)
            finally:
                await store.close()

        asyncio.run(deregister())
        self._set_draining(False)
        return result


def start_replicas(specs: list[ReplicaSpec], detached: bool = False) -> list[Any]:
    """One ``ReplicaActor`` per spec on the connected Ray cluster; returns the handles once
    every replica is healthy (raises what a replica's start-up raised)."""
    import ray

    actor = ray.remote(ReplicaActor)
    handles = []
    for spec in specs:
        options: dict[str, Any] = {
            "name": f"llmfleet-replica-{spec.name}", "num_gpus": spec.num_gpus,
            "num_cpus": spec.num_cpus, "max_restarts": spec.max_restarts,
            # A replica's calls are not retried on another incarnation: drain/stop of a
            # restarted replica are new calls from the supervisor.
            # One call at a time, on the actor's main thread: the server's parent-death
            # signal is tied to the thread that started it, which must live as the actor.
            "max_task_retries": 0}
        if detached:
            options["lifetime"] = "detached"
        handles.append(actor.options(**options).remote(spec))
    ray.get([h.info.remote() for h in handles])  # type: ignore[attr-defined]
    return handles


def stop_replicas(handles: list[Any], drain_timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Drain and stop every replica (in parallel), then end their actors for good."""
    import ray

    results = ray.get([h.stop.remote(drain_timeout_s) for h in handles])
    for handle in handles:
        ray.kill(handle, no_restart=True)
    return list(results)


def run_replicas(args: argparse.Namespace) -> int:
    """``llmfleet replicas``: start replicas on a Ray cluster and keep them until Ctrl-C."""
    import json

    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init: dict[str, Any] = {"address": args.ray_address, "namespace": "llmfleet",
                            "log_to_driver": False}
    if args.node_ip_address:
        init["_node_ip_address"] = args.node_ip_address
    ray.init(**init)
    server_args = tuple(a for a in args.server_args if a != "--")
    specs = []
    for i in range(args.count):
        if args.kind == "llmfleet":
            command: tuple[str, ...] = ()
            engine_args = server_args
        else:
            if not args.model:
                raise SystemExit(f"--kind {args.kind} needs --model")
            build = vllm_command if args.kind == "vllm" else sglang_command
            command, engine_args = build(args.model, *server_args), ()
        specs.append(ReplicaSpec(name=f"{args.name_prefix}-{i}", redis_url=args.redis_url,
                                 kind=args.kind, command=command, engine_args=engine_args,
                                 num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                 host=args.host, namespace=args.namespace,
                                 heartbeat_ttl_s=args.heartbeat_ttl))
    handles = start_replicas(specs)
    infos = ray.get([h.info.remote() for h in handles])  # type: ignore[attr-defined]
    print(json.dumps({"event": "replicas_ready", "replicas": infos}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print(json.dumps({"event": "replicas_stopping"}), flush=True)
    stop_replicas(handles, args.drain_timeout)
    print(json.dumps({"event": "replicas_stopped"}), flush=True)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("replicas", help="run replicas as Ray actors on a Ray cluster")
    p.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join (auto: the one `ray start` started here; "
                        "local: a new one in this process; ray://HEAD:10001: Ray Client)")
    p.add_argument("--node-ip-address", default=None,
                   help="this node's address for a --ray-address local cluster")
    p.add_argument("--redis-url", required=True, help="the fleet's registry")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--kind", choices=KINDS, default="llmfleet")
    p.add_argument("--model", default=None, help="model for --kind vllm/sglang")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--host", default="auto", help="listen/advertise address (auto: node IP)")
    p.add_argument("--name-prefix", default="replica")
    p.add_argument("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL_S)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for the server (llmfleet engine, vllm, sglang)")
    p.set_defaults(func=run_replicas)
