"""``serve deploy`` of deploy/serve-config.yaml on a Ray cluster started with ``ray start``.

The cluster is a real head node (``ray start --head --block`` in its own session and temp
dir, so no other Ray on the machine finds or joins it); the config is the repository's own,
with only what differs per machine filled in (Redis URL, HTTP port, replica count). A
reference engine registers in the same Redis; a request through Serve's HTTP proxy reaches it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from instances.launcher import EngineSpec, EngineSupervisor, free_port
from tests.fleet import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """``ray start --head`` on loopback with the dashboard (``serve deploy`` talks to its
    REST API); yields the dashboard address. Everything it started is stopped after."""
    # A short temp dir: Ray's unix socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    dashboard_port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
         "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()),
         "--ray-client-server-port", str(free_port()), "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_until(lambda: _ok(address + "/api/version"), timeout_s=180, interval_s=0.5)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_key(url: str, key: str, body: dict[str, object]) -> httpx.Response:
    """The answer to ``body`` once the gateway has read the new key (within a poll)."""
    headers = {"authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        if r.status_code != 401 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def _ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def test_serve_deploy_of_the_config_serves_requests(redis_url: str, namespace: str,
                                                    tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(redis_url=redis_url, namespace=namespace, num_replicas=1)
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))

    engine = EngineSupervisor([EngineSpec("serve-engine", free_port(), redis_url=redis_url,
                                          namespace=namespace, speedup=20.0)], restart=False)
    engine.start()
    try:
        with ray_head() as dashboard:
            env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
            deploy = subprocess.run(
                [str(BIN / "serve"), "deploy", str(path), "--address", dashboard],
                capture_output=True, text=True, timeout=180, env=env)
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ok(url + "/health"), timeout_s=240, interval_s=1.0)
            # The config turns auth on (it listens beyond loopback): a key is needed.
            body = {"prompt": "hello through ray serve", "max_tokens": 4}
            assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 401
            key = json.loads(subprocess.run(
                [sys.executable, "-m", "router.cli", "keys", "create", "--name", "serve-test",
                 "--redis-url", redis_url, "--namespace", namespace, "--json"],
                capture_output=True, text=True, check=True, timeout=60).stdout)["secret"]
            r = wait_for_key(url, key, body)
            assert r.status_code == 200, r.text
            assert r.headers["x-llmfleet-instance"] == "serve-engine"
            assert r.json()["usage"]["completion_tokens"] == 4
            status = subprocess.run([str(BIN / "serve"), "status", "--address", dashboard],
                                    capture_output=True, text=True, timeout=60, env=env)
            assert "RUNNING" in status.stdout, status.stdout + status.stderr
    finally:
        engine.stop()
