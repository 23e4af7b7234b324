"""``llmfleet up --engines 0 --fleet FILE --backend URL``: the gateway in front of servers it
did not start, which join the fleet when healthy and leave it when they stop answering."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from instances.launcher import free_port
from tests.fleet import FleetProcess, wait_until

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def _engine(port: int, api: str, model: str) -> Iterator[str]:
    """A reference engine on ``port`` started as a user would, not registered anywhere."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "engine", "--port", str(port), "--api", api,
         "--model", model, "--speedup", "20", "--num-gpu-blocks", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), timeout_s=60, interval_s=0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=1).status_code == 200
    return False


def _instances(gateway: str) -> int:
    return int(httpx.get(gateway + "/health", timeout=2).json().get("healthy_instances", 0))


def _complete(gateway: str) -> str:
    r = httpx.post(gateway + "/v1/completions", timeout=30,
                   json={"model": "m", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.headers["x-llmfleet-instance"]


def test_fleet_file_and_backend_flag_put_the_gateway_in_front(tmp_path: Path) -> None:
    sglang_port, vllm_port = free_port(), free_port()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"backends:\n  - url: http://127.0.0.1:{sglang_port}\n"
                          "    kind: sglang\n    id: sg-a\n")
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    with _engine(sglang_port, "sglang", "m"):
        fleet: FleetProcess | None = None
        try:
            with _engine(vllm_port, "vllm", "m"):
                fleet = FleetProcess(["--no-ray", "--engines", "0", "--port", "0",
                                      "--heartbeat-ttl", "1.5", "--policy", "round_robin",
                                      "--fleet", str(fleet_file), "--backend", vllm_url])
                gateway = fleet.wait_event("fleet_ready", timeout_s=120)["url"]
                assert {_complete(gateway) for _ in range(6)} == {"sg-a", "external-0"}
            # The --backend server stops: it leaves the fleet; requests go to the other.
            wait_until(lambda: _instances(gateway) == 1, timeout_s=15, interval_s=0.2)
            assert {_complete(gateway) for _ in range(3)} == {"sg-a"}
            # It comes back on the same address: it joins again.
            with _engine(vllm_port, "vllm", "m"):
                wait_until(lambda: _instances(gateway) == 2, timeout_s=15, interval_s=0.2)
                assert {_complete(gateway) for _ in range(6)} == {"sg-a", "external-0"}
            assert fleet.interrupt() == 0
        finally:
            if fleet is not None:
                fleet.kill()
