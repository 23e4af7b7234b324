"""``llmfleet bench gateway``: what a gateway adds to a request, against direct calls.

One run starts an embedded Redis and two reference-engine replicas (emulated executor, fast
``--speedup`` so the backend's own time is small), then every target in front of the SAME
replicas, all at once:

- ``direct``: the client calls the replicas itself (round-robin); the baseline;
- ``uvicorn``: ``llmfleet gateway`` (plain uvicorn, its own process);
- ``ray-1`` / ``ray-2``: the gateway as a Ray Serve application with 1 and 2 replicas, behind
  Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, as ``llmfleet up`` runs it); both
  applications share one Ray instance and its proxy, under route prefixes ``/ray-1``, ``/ray-2``;
- ``vllm-router`` / ``sglang-router``: the Rust routers from the package index (round robin),
  when installed (``pip install 'llmfleet[bench]'``) and not skipped (``--skip-rust``).

Each round runs every phase for every target, phase after phase, targets in a rotating
order, so all targets see the same machine noise; numbers are medians over rounds. Phases:

- ``c1`` / ``c32``: non-streamed requests at concurrency 1 and 32. Added latency p50/p99 is
  the target's percentile minus direct's in the same round; ``requests_per_second`` at 32 is
  the max req/s reported;
- ``ttft``: streamed requests at concurrency 1; added time to the first body byte of the
  stream (the engine sends its first token as the first chunk);
- ``stream``: streamed requests with ``--stream-tokens`` (512) output tokens, for the CPU a
  gateway spends relaying a long stream.

CPU is read per thread from ``/proc/<pid>/task/*/schedstat`` (nanoseconds; the tick-based
``utime`` is too coarse for the Rust routers' ~0.1 ms) and summed over every process of the
target: the uvicorn process; for Ray the proxy actor, HAProxy and the application's replica
actors; the Rust router process and its children. The load generator is a raw asyncio
HTTP/1.1 keep-alive client (httptools' C parser, uvloop when installed, TCP_NODELAY) whose
own CPU per request is measured and reported, next to the engines' and the whole machine's,
so the JSON says what bounds the throughput on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools
import httpx
import numpy as np
import psutil
from tqdm import tqdm

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from router.embedded_redis import embedded_redis

DEFAULT_OUT = Path("docs/results/gateway.json")
TARGETS = ("direct", "uvicorn", "ray-1", "ray-2", "vllm-router", "sglang-router")
RAY_TARGETS = ("ray-1", "ray-2")
# target -> (module to import, ``python -m`` entry point, log-level flag value)
RUST_ROUTERS = {
    "vllm-router": ("vllm_router", "vllm_router.launch_router", "warning"),
    "sglang-router": ("sglang_router", "sglang_router.launch_router", "warn"),
}
MODEL = "llmfleet-emulated"
# Goals from issue 9 ("Must show"), checked for the llmfleet targets in the JSON.
GOALS = {"cpu_ms_per_request": 0.5, "added_latency_ms_p50_c1": 1.0, "added_ttft_ms_p50": 1.0}
CLIENT_TIMEOUT_S = 60.0


@dataclass
class BenchOptions:
    """What one ``bench gateway`` run measures (CLI flags map one to one)."""

    rounds: int = 5
    requests_c1: int = 300
    requests_c32: int = 1000
    high_concurrency: int = 32
    ttft_requests: int = 150
    stream_requests: int = 24
    stream_concurrency: int = 8
    stream_tokens: int = 512
    max_tokens: int = 4
    prompt_tokens: int = 1024
    distinct_prompts: int = 256
    engines: int = 2
    speedup: float = 100.0
    policy: str = "dualmap"
    rust_policy: str = "round_robin"
    skip_ray: bool = False
    skip_rust: bool = False
    progress: bool = True
    nice: int = 0  # niceness for the bench and every process it starts (CLI only)


# -- load generator -------------------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time.

    Times are taken in the protocol callbacks, as the bytes arrive: ``first`` when the first
    body bytes of the response are parsed, ``done`` when the message is complete.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[float] | None = None
        self.status = 0
        self.first = 0.0
        self.events = 0
        self.error_body = b""
        self.lost: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # the client must not delay its own small writes either
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost = exc or ConnectionError("connection closed by the server")
        self._fail(self.lost)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        # SSE events are counted (cheap C scan) to check that streams carried their tokens.
        self.events += body.count(b"data: ")
        if self.status != 200 and len(self.error_body) < 2048:
            self.error_body += body

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(time.perf_counter())

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def request(self, payload: bytes) -> tuple[float, float, float]:
        """Send ``payload`` (a whole HTTP request); (sent, first body byte, complete) times."""
        if self.transport is None:
            raise ConnectionError(f"connection is closed: {self.lost!r}")
        self.status = 0
        self.first = 0.0
        self.events = 0
        self.error_body = b""
        self.waiter = asyncio.get_running_loop().create_future()
        sent = time.perf_counter()
        self.transport.write(payload)
        done = await asyncio.wait_for(self.waiter, CLIENT_TIMEOUT_S)
        if self.status != 200:
            raise RuntimeError(f"HTTP {self.status}: {self.error_body[:500]!r}")
        return sent, self.first, done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int) -> _Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return protocol


@dataclass(frozen=True)
class Endpoint:
    """Where a target listens: host, port and the path prefix of its OpenAI routes."""

    host: str
    port: int
    prefix: str = ""

    def request(self, body: bytes) -> bytes:
        head = (f"POST {self.prefix}/v1/completions HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return head + body


@dataclass
class BatchResult:
    sent: np.ndarray
    first: np.ndarray
    done: np.ndarray
    wall_s: float
    events: int

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.done - self.sent) * 1e3

    @property
    def ttft_ms(self) -> np.ndarray:
        return (self.first - self.sent) * 1e3


async def run_batch(endpoints: Sequence[Endpoint], bodies: Sequence[bytes], requests: int,
                    concurrency: int) -> BatchResult:
    """``requests`` requests by ``concurrency`` workers, each with one keep-alive connection
    per endpoint; request ``i`` goes to endpoint ``i % len(endpoints)`` with body ``i %
    len(bodies)``. Connections are opened (and used once, untimed) before the clock starts."""
    payloads = [[e.request(b) for b in bodies] for e in endpoints]
    workers = [[await _connect(e.host, e.port) for e in endpoints] for _ in range(concurrency)]
    try:
        for conns in workers:  # one untimed request per connection: warm the whole path
            await asyncio.gather(*(c.request(p[0]) for c, p in zip(conns, payloads,
                                                                     strict=True)))
        sent = np.zeros(requests)
        first = np.zeros(requests)
        done = np.zeros(requests)
        counter = iter(range(requests))
        events = 0
        num_endpoints = len(endpoints)
        num_bodies = len(bodies)

        async def worker(conns: list[_Connection]) -> None:
            nonlocal events
            for i in counter:
                e = i % num_endpoints
                conn = conns[e]
                sent[i], first[i], done[i] = await conn.request(payloads[e][i % num_bodies])
                events += conn.events

        start = time.perf_counter()
        await asyncio.gather(*(worker(conns) for conns in workers))
        wall = time.perf_counter() - start
        return BatchResult(sent, first, done, wall, events)
    finally:
        for conns in workers:
            for conn in conns:
                conn.close()


# -- CPU accounting -------------------------------------------------------------------------
def cpu_ns(pids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per process: (ns run on a CPU, ns runnable but waiting for one) so far, summed over
    its live threads.

    ``/proc/<pid>/task/<tid>/schedstat`` counts nanoseconds; ``/proc/<pid>/stat`` counts
    clock ticks (10 ms), too coarse for a router that spends 0.1 ms per request. The wait
    shows when other tenants of a shared machine, not the target, set its pace.
    """
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        run = wait = 0
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    fields = f.read().split()
                    run += int(fields[0])
                    wait += int(fields[1])
        out[pid] = (run, wait)
    return out


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has run (all tenants), summed over cores."""
    t = psutil.cpu_times()
    # guest time is already inside user; steal and iowait are not this machine's work
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0))


@dataclass
class Target:
    """A system under test: where to send requests and which processes are its."""

    name: str
    endpoints: list[Endpoint]
    pids: Callable[[], list[int]] = list
    description: str = ""

    def process_ids(self) -> list[int]:
        return self.pids()


@dataclass
class PhaseSample:
    """One phase of one target in one round (CPU figures in seconds)."""

    latency_ms: np.ndarray
    ttft_ms: np.ndarray
    wall_s: float
    requests: int
    events: int
    gateway_cpu_s: float
    busiest_cpu_s: float  # the gateway process that ran longest
    busiest_wait_s: float  # ... and how long it waited, runnable, for a CPU
    engines_cpu_s: float
    client_cpu_s: float
    machine_busy_s: float


async def measure_phase(target: Target, engine_pids: list[int], bodies: Sequence[bytes],
                        requests: int, concurrency: int) -> PhaseSample:
    pids = target.process_ids()
    gw0, en0 = cpu_ns(pids), cpu_ns(engine_pids)
    client0, busy0 = time.thread_time(), _machine_busy_s()
    batch = await run_batch(target.endpoints, bodies, requests, concurrency)
    client1, busy1 = time.thread_time(), _machine_busy_s()
    gw1, en1 = cpu_ns(pids), cpu_ns(engine_pids)
    used = {p: (gw1[p][0] - gw0.get(p, (0, 0))[0], gw1[p][1] - gw0.get(p, (0, 0))[1])
            for p in pids}
    busiest = max(used.values(), default=(0, 0))
    return PhaseSample(
        latency_ms=batch.latency_ms, ttft_ms=batch.ttft_ms, wall_s=batch.wall_s,
        requests=requests, events=batch.events,
        gateway_cpu_s=sum(run for run, _ in used.values()) / 1e9,
        busiest_cpu_s=busiest[0] / 1e9, busiest_wait_s=busiest[1] / 1e9,
        engines_cpu_s=sum(en1[p][0] - en0.get(p, (0, 0))[0] for p in engine_pids) / 1e9,
        client_cpu_s=client1 - client0, machine_busy_s=busy1 - busy0)


# -- the systems under test -----------------------------------------------------------------
def _wait_ready(check: Callable[[], bool], what: str, timeout_s: float = 90.0,
                proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


def _healthy(url: str, engines: int) -> bool:
    r = httpx.get(url + "/health", timeout=2)
    return r.status_code == 200 and r.json().get("healthy_instances") == engines


def _completes(url: str) -> bool:
    r = httpx.post(url + "/v1/completions", timeout=5,
                   json={"model": MODEL, "prompt": "ready?", "max_tokens": 1})
    return r.status_code == 200


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (a Rust router's launcher may fork workers)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    return [pid]


class _Child:
    """A target run as a child process in its own session; its stderr goes to a temp file,
    whose tail the error shows if it does not come up. Started at once, so several start
    side by side; ``wait_ready`` then waits for each."""

    def __init__(self, cmd: list[str], what: str, ready: Callable[[], bool]) -> None:
        self.what = what
        self.ready = ready
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        try:
            _wait_ready(self.ready, self.what, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.log.seek(0)
            tail = self.log.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"{exc}\n--- its stderr ---\n{tail}") from exc

    def pids(self) -> list[int]:
        return _tree(self.proc.pid)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # never leave a gateway behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def _uvicorn_gateway(redis_url: str, policy: str, engines: int) -> tuple[_Child, Target]:
    port = free_port()
    cmd = [sys.executable, "-m", "router.cli", "gateway", "--redis-url", redis_url,
           "--port", str(port), "--policy", policy]
    url = f"http://127.0.0.1:{port}"
    child = _Child(cmd, "llmfleet gateway", functools.partial(_healthy, url, engines))
    return child, Target("uvicorn", [Endpoint("127.0.0.1", port)], child.pids,
                         f"llmfleet gateway (uvicorn), policy {policy}")


def _rust_router(name: str, engine_urls: list[str], policy: str) -> tuple[_Child, Target]:
    _, entry, log_level = RUST_ROUTERS[name]
    port = free_port()
    cmd = [sys.executable, "-m", entry, "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *engine_urls, "--policy", policy, "--log-level", log_level,
           # Both default to metrics on 0.0.0.0:29000: two routers (or another tenant) clash.
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    child = _Child(cmd, name, functools.partial(_completes, f"http://127.0.0.1:{port}"))
    return child, Target(name, [Endpoint("127.0.0.1", port)], child.pids,
                         f"{name} {_package_version(name)}, policy {policy}")


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def _ray_gateways(redis_url: str, policy: str, engines: int) -> Iterator[list[Target]]:
    """Ray Serve with HAProxy ingress; applications ``ray-1`` (1 replica) and ``ray-2`` (2)."""
    # Local, single-user cluster (as llmfleet up): no token auth, no usage report.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # Ray starts its workers (Serve replicas and proxy included) 15 nice levels below the
    # driver; on a busy machine they would then yield to every other target and tenant.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    from router.gateway import GatewayConfig
    from router.serve_app import build_gateway_application

    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="llmfleet-bench")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING"})
        for name in RAY_TARGETS:
            config = GatewayConfig(redis_url=redis_url, policy=policy)
            app = build_gateway_application(config, num_replicas=int(name.split("-")[1]))
            # The same deployment (options from build_gateway_application), mounted under
            # a route prefix: both applications share Serve's one proxy.
            deployment = app._bound_deployment
            mounted = deployment.options(func_or_class=_mounted(deployment.func_or_class))
            serve.run(mounted.bind(asdict(config)), name=name, route_prefix=f"/{name}")
        for name in RAY_TARGETS:
            url = f"http://127.0.0.1:{port}/{name}"
            _wait_ready(functools.partial(_healthy, url, engines), f"Ray Serve app {name}")

        def pids_of(app: str) -> list[int]:
            # Ray names its worker processes after the actor they host ("ray::ProxyActor",
            # "ray::ServeReplica:<app>:<deployment>"); HAProxy is a process of its own.
            # Only descendants of this process: other tenants may run Ray too.
            pids = []
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    title = " ".join(proc.cmdline())
                    if (f"ServeReplica:{app}:" in title or "ProxyActor" in title
                            or "haproxy" in proc.name().lower()):
                        pids.append(proc.pid)
            return pids

        targets = []
        for name in RAY_TARGETS:
            pids = pids_of(name)  # fixed for the run: no replica restarts while measuring
            targets.append(Target(name, [Endpoint("127.0.0.1", port, f"/{name}")],
                                  functools.partial(list, pids),
                                  f"llmfleet under Ray Serve {ray.__version__}, HAProxy "
                                  f"ingress, {name.split('-')[1]} gateway replica(s), "
                                  f"policy {policy}"))
        yield targets
    finally:
        # No serve.shutdown(): its graceful HAProxy drain takes ~30 s; ray.shutdown() ends
        # every actor and process Serve started.
        ray.shutdown()


def _mounted(deployment_class: Any) -> Any:
    """``deployment_class`` whose ASGI app sees paths without the route prefix.

    Serve passes an application mounted at ``/ray-1`` the full path (``/ray-1/v1/...``)
    and the prefix as ``root_path``. Starlette routes strip it; a raw ASGI handler that
    matches ``scope["path"]`` exactly does not, so the bench strips it before the app.
    """
    class Mounted(deployment_class):  # type: ignore[misc,valid-type]
        def __serve_build_asgi_app__(self) -> Any:
            app = super().__serve_build_asgi_app__()

            async def strip_root_path(scope: Any, receive: Any, send: Any) -> None:
                root = scope.get("root_path", "")
                path = scope.get("path", "")
                if root and path.startswith(root + "/"):
                    scope = {**scope, "path": path[len(root):]}
                await app(scope, receive, send)

            return strip_root_path

    return Mounted


# -- the run --------------------------------------------------------------------------------
def _bodies(options: BenchOptions, stream: bool, max_tokens: int) -> list[bytes]:
    """``distinct_prompts`` text prompts of ``prompt_tokens`` ASCII characters (one token
    each for the byte-level reference engine; distinct keys, so a cache-affine policy spreads
    them), the same list for every target. Text, not token ids: sglang-router 0.3.2 refuses
    a token-id ``prompt`` (422)."""
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    bodies = []
    for _ in range(options.distinct_prompts):
        prompt = rng.choice(alphabet, options.prompt_tokens).tobytes().decode()
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        if stream:
            body["stream"] = True
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


@dataclass
class _Phase:
    name: str
    concurrency: int
    requests: int
    bodies: list[bytes] = field(repr=False)


def _phases(options: BenchOptions) -> list[_Phase]:
    plain = _bodies(options, False, options.max_tokens)
    return [
        _Phase("c1", 1, options.requests_c1, plain),
        _Phase(f"c{options.high_concurrency}", options.high_concurrency, options.requests_c32,
               plain),
        _Phase("ttft", 1, options.ttft_requests, _bodies(options, True, options.max_tokens)),
        _Phase("stream", options.stream_concurrency, options.stream_requests,
               _bodies(options, True, options.stream_tokens)),
    ]


def _available_targets(options: BenchOptions) -> tuple[list[str], dict[str, str]]:
    wanted: list[str] = []
    skipped: dict[str, str] = {}
    for name in TARGETS:
        if name in RAY_TARGETS and options.skip_ray:
            skipped[name] = "skipped (--skip-ray)"
        elif name in RUST_ROUTERS and options.skip_rust:
            skipped[name] = "skipped (--skip-rust)"
        elif name in RUST_ROUTERS and importlib.util.find_spec(RUST_ROUTERS[name][0]) is None:
            skipped[name] = f"not installed (pip install {name}, or 'llmfleet[bench]')"
        else:
            wanted.append(name)
    return wanted, skipped


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Start the replicas and every available target, measure (see the module docstring)."""
    wanted, skipped = _available_targets(options)
    load0 = os.getloadavg()[0]
    if options.nice:
        # Children (replicas, gateways, Ray, routers) inherit it: on a shared machine the
        # targets then compete less with other tenants, all alike.
        os.setpriority(os.PRIO_PROCESS, 0, options.nice)
    with embedded_redis() as redis_url, contextlib.ExitStack() as stack:
        specs = [EngineSpec(instance_id=f"bench-{i}", port=free_port(), speedup=options.speedup,
                            redis_url=redis_url, model=MODEL) for i in range(options.engines)]
        supervisor = EngineSupervisor(specs, restart=False)
        stack.callback(supervisor.stop)
        supervisor.start()
        engine_pids = supervisor.pids()
        engine_urls = [s.url for s in specs]
        targets: dict[str, Target] = {"direct": Target(
            "direct", [Endpoint("127.0.0.1", s.port) for s in specs],
            description=f"client round-robin over the {options.engines} replicas")}
        children = []
        if "uvicorn" in wanted:
            children.append(_uvicorn_gateway(redis_url, options.policy, options.engines))
        children += [_rust_router(name, engine_urls, options.rust_policy)
                     for name in RUST_ROUTERS if name in wanted]
        for child, target in children:
            stack.callback(child.stop)
            targets[target.name] = target
        for child, _ in children:
            child.wait_ready()
        if any(n in wanted for n in RAY_TARGETS):
            for target in stack.enter_context(
                    _ray_gateways(redis_url, options.policy, options.engines)):
                targets[target.name] = target
        order = [n for n in TARGETS if n in targets]
        if options.nice:
            own_group = _read("/proc/self/autogroup")
            _prioritise([os.getpid(), *engine_pids,
                         *(p for t in targets.values() for p in t.process_ids())],
                        options.nice)
            if own_group is not None:  # this session outlives the bench: give it back
                stack.callback(_set_autogroup_nice, os.getpid(),
                               int(own_group.rsplit(" ", 1)[-1]))
        samples = _measure_rounds(options, targets, order, engine_pids)
    result = _summarise(options, targets, order, samples)
    result["skipped"] = skipped
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "cpu_count": os.cpu_count(), "load_average_1m_at_start": round(load0, 2),
                         "niceness": os.getpriority(os.PRIO_PROCESS, 0),
                         "sched_autogroup": _read("/proc/sys/kernel/sched_autogroup_enabled")
                         == "1"}
    return result


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _prioritise(pids: Sequence[int], nice: int) -> None:
    """Give the processes under test ``nice`` and, where the kernel groups processes by
    session for scheduling (``sched_autogroup``), give their sessions' groups the same nice.

    With autogroups, a process's own nice only ranks it inside its session; between
    sessions (each replica and gateway runs in its own, and so does every other tenant's
    job) the kernel shares the CPU by group, so only the group's nice keeps other tenants
    from setting the pace.
    """
    for pid in pids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        _set_autogroup_nice(pid, nice)


def _set_autogroup_nice(pid: int, nice: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop()


Samples = dict[str, dict[str, list[PhaseSample]]]  # target -> phase -> one per round


def _measure_rounds(options: BenchOptions, targets: dict[str, Target], order: list[str],
                    engine_pids: list[int]) -> Samples:
    phases = _phases(options)
    samples: Samples = {t: {p.name: [] for p in phases} for t in order}
    bar = tqdm(total=(options.rounds + 1) * len(phases) * len(order), desc="bench gateway",
               unit="batch", disable=not options.progress, file=sys.stderr)
    loop = _new_event_loop()
    try:
        # Every prompt into every replica's prefix cache first: whichever replica a target
        # picks, a request costs the same (a miss would be charged to whoever came first).
        for endpoint in targets["direct"].endpoints:
            loop.run_until_complete(run_batch([endpoint], phases[0].bodies,
                                              len(phases[0].bodies), 8))
        for round_index in range(-1, options.rounds):  # round -1 warms every path, unrecorded
            for phase in phases:
                shift = round_index % len(order)
                for name in order[shift:] + order[:shift]:
                    bar.set_postfix_str(f"round {round_index + 1} {phase.name} {name}")
                    requests = phase.requests if round_index >= 0 else \
                        max(phase.concurrency * 2, phase.requests // 4)
                    try:
                        sample = loop.run_until_complete(measure_phase(
                            targets[name], engine_pids, phase.bodies, requests,
                            phase.concurrency))
                    except Exception as exc:
                        raise RuntimeError(f"{name}, phase {phase.name}: {exc!r}") from exc
                    if round_index >= 0:
                        samples[name][phase.name].append(sample)
                    bar.update()
    finally:
        loop.close()
        bar.close()
    return samples


def _median(values: Sequence[float]) -> float:
    return round(float(np.median(values)), 3)


def _summarise(options: BenchOptions, targets: dict[str, Target], order: list[str],
               samples: Samples) -> dict[str, Any]:
    high = f"c{options.high_concurrency}"
    direct = samples["direct"]
    results: dict[str, Any] = {}
    for name in order:
        mine = samples[name]
        by_concurrency: dict[str, Any] = {}
        for phase, concurrency in (("c1", 1), (high, options.high_concurrency)):
            rows = mine[phase]
            base = direct[phase]
            p50 = [float(np.percentile(s.latency_ms, 50)) for s in rows]
            p99 = [float(np.percentile(s.latency_ms, 99)) for s in rows]
            d50 = [float(np.percentile(s.latency_ms, 50)) for s in base]
            d99 = [float(np.percentile(s.latency_ms, 99)) for s in base]
            by_concurrency[str(concurrency)] = {
                "latency_ms_p50": _median(p50),
                "latency_ms_p99": _median(p99),
                "added_latency_ms_p50": _median([a - b for a, b in zip(p50, d50, strict=True)]),
                "added_latency_ms_p99": _median([a - b for a, b in zip(p99, d99, strict=True)]),
                "cpu_ms_per_request": _median([s.gateway_cpu_s * 1e3 / s.requests
                                               for s in rows]),
                "requests_per_second": _median([s.requests / s.wall_s for s in rows]),
                "per_round_added_latency_ms_p50": [round(a - b, 3) for a, b in
                                                   zip(p50, d50, strict=True)],
            }
        ttft = [float(np.percentile(s.ttft_ms, 50)) for s in mine["ttft"]]
        ttft_direct = [float(np.percentile(s.ttft_ms, 50)) for s in direct["ttft"]]
        stream = mine["stream"]
        top = by_concurrency["1"]
        peak = by_concurrency[str(options.high_concurrency)]
        row: dict[str, Any] = {
            "description": targets[name].description,
            # The headline latency is at concurrency 1 (the "concurrency" field); CPU per
            # request and max req/s at the high concurrency (see "definitions").
            "added_latency_ms_p50": top["added_latency_ms_p50"],
            "added_latency_ms_p99": top["added_latency_ms_p99"],
            "added_ttft_ms_p50": _median([a - b for a, b in zip(ttft, ttft_direct,
                                                                strict=True)]),
            "cpu_ms_per_request": peak["cpu_ms_per_request"],
            "requests_per_second": peak["requests_per_second"],
            "concurrency": 1,
            "max_rps_concurrency": options.high_concurrency,
            "ttft_ms_p50": _median(ttft),
            "cpu_ms_per_streamed_request": _median([s.gateway_cpu_s * 1e3 / s.requests
                                                    for s in stream]),
            "streamed_output_tokens": options.stream_tokens,
            "sse_events_per_stream": _median([s.events / s.requests for s in stream]),
            "by_concurrency": by_concurrency,
            "limits": _limits(mine[high], options),
            "pids": len(targets[name].process_ids()),
        }
        if name in ("uvicorn", *RAY_TARGETS):
            row["goals_met"] = {
                "cpu_ms_per_request": row["cpu_ms_per_request"] <= GOALS["cpu_ms_per_request"],
                "added_latency_ms_p50_c1":
                    row["added_latency_ms_p50"] <= GOALS["added_latency_ms_p50_c1"],
                "added_ttft_ms_p50": row["added_ttft_ms_p50"] <= GOALS["added_ttft_ms_p50"],
            }
        results[name] = row
    client_cpu = [s.client_cpu_s * 1e3 / s.requests for t in order for s in samples[t][high]]
    rust = [results[n]["cpu_ms_per_streamed_request"] for n in RUST_ROUTERS if n in results]
    for name in ("uvicorn", *RAY_TARGETS):
        if name in results and rust:
            results[name]["goals_met"]["cpu_ms_per_streamed_request_vs_rust"] = \
                results[name]["cpu_ms_per_streamed_request"] <= min(rust)
    return {
        "benchmark": "gateway",
        "results": results,
        "client": {
            "kind": "raw asyncio HTTP/1.1 keep-alive client (httptools parser, "
                    f"{'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'} loop, "
                    "TCP_NODELAY), one connection per worker and endpoint",
            "cpu_ms_per_request_median": _median(client_cpu),
        },
        "goals": GOALS,
        "definitions": {
            "added_latency_ms_p50/p99": "target's latency percentile minus direct's, same "
                                        "round, concurrency 1; median over rounds "
                                        "(by_concurrency has 1 and the high concurrency)",
            "added_ttft_ms_p50": "p50 time to the first body bytes of a streamed request, "
                                 "minus direct's, concurrency 1",
            "cpu_ms_per_request": "CPU of all the target's processes during the high-"
                                  "concurrency phase / requests (includes idle background "
                                  "work such as the registry refresh)",
            "requests_per_second": "throughput at the high concurrency (max req/s); "
                                   "'limits' says what bounded it",
            "cpu_ms_per_streamed_request": f"gateway CPU per streamed request with "
                                           f"{options.stream_tokens} output tokens, at "
                                           f"concurrency {options.stream_concurrency}",
        },
        "settings": {**asdict(options), "rust_router_versions": {
            n: _package_version(n) for n in RUST_ROUTERS}},
    }


def _limits(rows: list[PhaseSample], options: BenchOptions) -> dict[str, Any]:
    """Where the cores went during the max-throughput phase, and what bounded it."""
    def cores(attr: str) -> float:
        return round(_median([getattr(s, attr) / s.wall_s for s in rows]), 3)

    limits: dict[str, Any] = {
        "gateway_cores": cores("gateway_cpu_s"),
        "busiest_gateway_process_cores": cores("busiest_cpu_s"),
        "busiest_gateway_process_waiting_for_cpu": cores("busiest_wait_s"),
        "engines_cores": cores("engines_cpu_s"),
        "client_cores": cores("client_cpu_s"),
        "machine_busy_cores": cores("machine_busy_s"),
        "machine_cores": os.cpu_count() or 1,
    }
    limits["other_cores"] = round(max(0.0, limits["machine_busy_cores"] - limits["gateway_cores"]
                                      - limits["engines_cores"] - limits["client_cores"]), 3)
    limits["bound"] = bound(limits, options.engines, options.high_concurrency)
    return limits


def bound(limits: dict[str, Any], engines: int, concurrency: int) -> str:
    """What held the throughput, in words, from the figures ``_limits`` collects (shares
    of the phase's wall time; "other" is Redis, Ray's own processes, idle targets'
    background work and other tenants of the machine)."""
    facts = []
    ran = limits["busiest_gateway_process_cores"]
    waited = limits["busiest_gateway_process_waiting_for_cpu"]
    if ran + waited >= 0.85:
        facts.append(f"one gateway process never idle: ran {ran:.2f} of the time and waited "
                     f"{waited:.2f}, runnable, for a CPU (one event loop wants a whole core)")
    total = limits["machine_cores"]
    if limits["machine_busy_cores"] >= 0.85 * total:
        facts.append(f"all {total} cores busy ({limits['machine_busy_cores']:.2f}: gateway "
                     f"{limits['gateway_cores']:.2f}, engines {limits['engines_cores']:.2f}, "
                     f"load generator {limits['client_cores']:.2f}, other "
                     f"{limits['other_cores']:.2f})")
    if limits["engines_cores"] >= 0.85 * engines:
        facts.append("the engine replicas at a core each")
    return "; ".join(facts) or f"latency: {concurrency} requests in flight / latency"


# -- CLI ------------------------------------------------------------------------------------
def register_bench(bench_subparsers: Any) -> None:
    defaults = BenchOptions()
    parser = bench_subparsers.add_parser(
        "gateway", help="latency and CPU a gateway adds, against direct calls",
        description="llmfleet (uvicorn, Ray Serve x1/x2) and the Rust routers in front of "
                    "the same emulated replicas, against direct calls, in one run.")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="interleaved rounds; numbers are medians over rounds")
    parser.add_argument("--requests-c1", type=int, default=defaults.requests_c1)
    parser.add_argument("--requests-c32", type=int, default=defaults.requests_c32,
                        help="requests per round at the high concurrency")
    parser.add_argument("--concurrency", type=int, default=defaults.high_concurrency,
                        help="the high concurrency (max req/s)")
    parser.add_argument("--ttft-requests", type=int, default=defaults.ttft_requests)
    parser.add_argument("--stream-requests", type=int, default=defaults.stream_requests)
    parser.add_argument("--stream-concurrency", type=int, default=defaults.stream_concurrency)
    parser.add_argument("--stream-tokens", type=int, default=defaults.stream_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="output tokens of the non-streamed requests")
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--engines", type=int, default=defaults.engines)
    parser.add_argument("--speedup", type=float, default=defaults.speedup)
    parser.add_argument("--policy", default=defaults.policy, help="llmfleet's routing policy")
    parser.add_argument("--rust-policy", default=defaults.rust_policy)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-rust", action="store_true",
                        help="leave out vllm-router and sglang-router")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the bench, all it starts and their scheduling "
                             "groups (negative needs root): on a shared machine, less noise "
                             "from other tenants")
    parser.add_argument("--json", action="store_true", help="print JSON (else a table)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="'-' for nowhere")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    options = BenchOptions(
        rounds=args.rounds, requests_c1=args.requests_c1, requests_c32=args.requests_c32,
        high_concurrency=args.concurrency, ttft_requests=args.ttft_requests,
        stream_requests=args.stream_requests, stream_concurrency=args.stream_concurrency,
        stream_tokens=args.stream_tokens, max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens, engines=args.engines, speedup=args.speedup,
        policy=args.policy, rust_policy=args.rust_policy, skip_ray=args.skip_ray,
        skip_rust=args.skip_rust, nice=args.nice)
    result = run_bench(options)
    result["command"] = " ".join(["llmfleet", *sys.argv[1:]])
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'target':15s} {'+p50 c1':>8s} {'+p99 c1':>8s} {'+ttft':>7s} "
              f"{'cpu/req':>8s} {'req/s':>7s} {'cpu/stream':>10s}  bound")
        for name, row in result["results"].items():
            print(f"{name:15s} {row['added_latency_ms_p50']:8.3f} "
                  f"{row['added_latency_ms_p99']:8.3f} {row['added_ttft_ms_p50']:7.3f} "
                  f"{row['cpu_ms_per_request']:8.3f} {row['requests_per_second']:7.0f} "
                  f"{row['cpu_ms_per_streamed_request']:10.2f}  {row['limits']['bound']}")
        for name, why in result["skipped"].items():
            print(f"{name:15s} {why}")
    return 0
