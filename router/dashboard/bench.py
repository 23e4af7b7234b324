"""``llmfleet bench dashboard``: the dashboard at 64 instances, and what it costs the gateway.

One run starts an embedded Redis, ``--instances`` fake replicas in one light process
(``router.dashboard.stubfleet``: real HTTP ports and real registry heartbeats, no model),
``llmfleet gateway`` (uvicorn, its own process, DualMap) and headless Chromium. Then, in
``--rounds`` rounds, two phases each in alternating order: the same load (non-streamed
completions at ``--concurrency`` for ``--seconds``, prompts from 256 conversations so keys
spread over the rings) with the dashboard **closed** (the browser on ``about:blank``) and
**open** (the browser showing ``/dashboard``, its live stream connected).

Measured per phase: the gateway process's CPU (``/proc/<pid>/task/*/schedstat``, ns) per
request; in open phases also the page's own count of updates received and rendered, the
longest gap between two updates and the page's render time. Numbers are medians over
rounds; the verdicts: the page updates at least once a second (rate >= 0.95/s and no gap
over 1.5 s) and the gateway's CPU per request with the page open is within 10 % of closed.
Writes ``docs/results/dashboard.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from instances.launcher import free_port
from router.embedded_redis import embedded_redis
from router.gateway_bench import Endpoint, cpu_ns, run_batch

DEFAULT_OUT = Path("docs/results/dashboard.json")
MIN_UPDATES_PER_S = 0.95
MAX_GAP_MS = 1500.0
MAX_CPU_RATIO = 1.10


def _bodies(conversations: int = 256) -> list[bytes]:
    return [json.dumps({"model": "stub", "max_tokens": 6,
                        "prompt": f"conversation {k}: " + "tell me more about it. " * 60}
                       ).encode() for k in range(conversations)]


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen[str]]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


def open_browser(width: int = 1600, height: int = 1400) -> Any:
    """Headless Chromium under selenium: the system's browser and driver (Debian packages
    ``chromium`` and ``chromium-driver``, which ``make install`` gets), nothing downloaded."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        raise RuntimeError("Chromium and chromedriver are needed: "
                           "apt-get install -y chromium chromium-driver (make install does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    # The page competes for the CPU with the load; a reading may wait for its renderer.
    browser.set_script_timeout(120)
    return browser


def _viewers(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("llmfleet_dashboard_viewers "):
            return float(line.split()[1])
    return 0.0


def run_bench(instances: int, seconds: float, concurrency: int, rounds: int,
              out: Path | None, chunk: int = 1000, screenshot: Path | None = None
              ) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="llmfleet-dashbench-"))
    bodies = _bodies()
    phases: list[dict[str, Any]] = []
    with embedded_redis(str(workdir)) as redis_url, \
            _process([sys.executable, "-m", "router.dashboard.stubfleet", "--instances",
                      str(instances), "--redis-url", redis_url],
                     workdir / "stubfleet.log") as stubs:
        assert stubs.stdout is not None
        ready = json.loads(stubs.stdout.readline())
        assert ready["event"] == "stubfleet_ready", ready
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with _process([sys.executable, "-m", "router.cli", "gateway", "--redis-url", redis_url,
                       "--port", str(port), "--policy", "dualmap"],
                      workdir / "gateway.log") as gateway:
            _wait(lambda: httpx.get(url + "/health", timeout=2).json()["healthy_instances"]
                  == instances, "gateway")
            endpoint = Endpoint("127.0.0.1", port)
            asyncio.run(run_batch([endpoint], bodies, chunk, concurrency))  # warm up
            browser = open_browser()
            try:
                for r in range(rounds):
                    order = ("closed", "open") if r % 2 == 0 else ("open", "closed")
                    for mode in order:
                        phases.append(_phase(mode, browser, url, endpoint, bodies, seconds,
                                             chunk, concurrency, gateway.pid))
                if screenshot is not None:
                    _screenshot(browser, url, endpoint, concurrency, screenshot)
            finally:
                browser.quit()
    result = _summarise(phases, instances, seconds, concurrency, rounds)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _screenshot(browser: Any, url: str, endpoint: Endpoint, concurrency: int,
                path: Path) -> None:
    """The whole page under load (half the requests streamed, so TTFTs show)."""
    streamed = [json.dumps({**json.loads(b), "stream": True}).encode() for b in _bodies(64)]
    bodies = [b for pair in zip(_bodies(64), streamed, strict=True) for b in pair]
    load = threading.Thread(target=lambda: asyncio.run(
        run_batch([endpoint], bodies, 6000, concurrency)), daemon=True)
    load.start()
    browser.get(url + "/dashboard")
    _wait(lambda: browser.execute_script("return window.llmfleetDashboard.messages") >= 2,
          "dashboard page", 20)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1600, min(int(height) + 40, 4000))
    time.sleep(6)
    browser.save_screenshot(str(path))
    load.join()


def _phase(mode: str, browser: Any, url: str, endpoint: Endpoint, bodies: list[bytes],
           seconds: float, chunk: int, concurrency: int, gateway_pid: int) -> dict[str, Any]:
    if mode == "open":
        browser.get(url + "/dashboard")
        _wait(lambda: browser.execute_script(
            "return window.llmfleetDashboard && window.llmfleetDashboard.messages") >= 2,
            "dashboard page", 20)
        browser.execute_script("window.llmfleetDashboard.resetStats()")
    else:
        browser.get("about:blank")
        _wait(lambda: _viewers(url) == 0, "dashboard stream closed", 10)
    viewers = _viewers(url)
    before = cpu_ns([gateway_pid])[gateway_pid][0]
    sent = timed = 0
    wall = 0.0
    while wall < seconds:  # batches of ``chunk`` requests until the phase has lasted long
        batch = asyncio.run(run_batch([endpoint], bodies, chunk, concurrency))
        timed += chunk
        sent += chunk + concurrency  # each batch warms each connection with one request
        wall += batch.wall_s
    after = cpu_ns([gateway_pid])[gateway_pid][0]
    row: dict[str, Any] = {
        "mode": mode, "viewers": viewers, "requests": sent,
        "wall_s": round(wall, 3),
        "requests_per_second": round(timed / wall, 1),
        "cpu_ms_per_request": round((after - before) / 1e6 / sent, 4),
    }
    if mode == "open":
        stats = browser.execute_script("return window.llmfleetDashboard.stats()")
        row.update({
            "page_updates": stats["messages"],
            # Between the first and the last update of the phase (no fencepost error).
            "page_updates_per_second": round(
                (stats["messages"] - 1) / max(1e-3, (stats["last"] - stats["first"]) / 1e3), 3),
            "server_publish_ms_max": stats["maxPublishMs"],
            "page_max_gap_ms": round(stats["maxGapMs"], 1),
            "page_render_ms_max": round(stats["maxRenderMs"], 2),
            "page_render_ms_mean": round(stats["renderMs"] / max(1, stats["messages"]), 2),
            "page_instances_shown": browser.execute_script(
                "return document.querySelectorAll('#instances tbody tr').length"),
            "page_ring_arcs": int(browser.execute_script(
                "return document.getElementById('rings').dataset.arcs || 0")),
        })
    return row


def _summarise(phases: list[dict[str, Any]], instances: int, seconds: float,
               concurrency: int, rounds: int) -> dict[str, Any]:
    def median(mode: str, key: str) -> float:
        return statistics.median(p[key] for p in phases if p["mode"] == mode)

    closed_cpu = median("closed", "cpu_ms_per_request")
    open_cpu = median("open", "cpu_ms_per_request")
    ratio = open_cpu / closed_cpu if closed_cpu else float("inf")
    opened = [p for p in phases if p["mode"] == "open"]
    min_rate = min(p["page_updates_per_second"] for p in opened)
    max_gap = max(p["page_max_gap_ms"] for p in opened)
    return {
        "bench": "dashboard",
        "instances": instances,
        "phase_seconds": seconds,
        "concurrency": concurrency,
        "rounds": rounds,
        "closed": {"cpu_ms_per_request": closed_cpu,
                   "requests_per_second": median("closed", "requests_per_second")},
        "open": {"cpu_ms_per_request": open_cpu,
                 "requests_per_second": median("open", "requests_per_second"),
                 "page_updates_per_second_min": min_rate,
                 "page_max_gap_ms": max_gap,
                 "page_render_ms_max": max(p["page_render_ms_max"] for p in opened),
                 "server_publish_ms_max": max(p["server_publish_ms_max"] for p in opened),
                 "page_instances_shown": min(p["page_instances_shown"] for p in opened),
                 "page_ring_arcs": min(p["page_ring_arcs"] for p in opened)},
        "cpu_ratio_open_to_closed": round(ratio, 4),
        "page_updates_every_second": min_rate >= MIN_UPDATES_PER_S and max_gap <= MAX_GAP_MS,
        "cpu_within_10_percent": ratio <= MAX_CPU_RATIO,
        "phases": phases,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared machine; phases alternate closed/open so both see the "
                            "same noise; medians over rounds"},
    }


def register_bench(bench_subparsers: Any) -> None:
    parser = bench_subparsers.add_parser(
        "dashboard", help="the dashboard at 64 instances and its CPU cost to the gateway",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="length of each phase (load runs in batches of 1000 requests)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of (closed, open) phases; numbers are medians")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", action="store_true", help="print the result JSON")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save a screenshot of the page at the end (PNG)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    result = run_bench(args.instances, args.seconds, args.concurrency, args.rounds, args.out,
                       screenshot=args.screenshot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        summary = {k: v for k, v in result.items() if k not in ("phases",)}
        print(json.dumps(summary, indent=2))
    return 0 if result["page_updates_every_second"] and result["cpu_within_10_percent"] else 1
