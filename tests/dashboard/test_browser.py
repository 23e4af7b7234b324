"""The dashboard in a real browser (headless Chromium) in front of a live fleet.

Screenshots go to ``$LLMFLEET_SCREENSHOT_DIR`` when set (``docs/images`` regenerates the
README's), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from router.auth import KeyStore
from router.dashboard.bench import open_browser
from router.gateway import Gateway
from tests.dashboard.fleet import LiveFleet, background_load, live_fleet
from tests.fleet import engine_requests_served, wait_until

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[LiveFleet]:
    # The gateway's own auth (router.auth): the page is open, its data and actions need
    # the admin token, and requests need an API key.
    api_key = asyncio.run(_api_key(redis_url, namespace))  # before the gateway reads keys
    with live_fleet(redis_url, namespace, engines=3, admin_token=ADMIN_TOKEN) as f:
        f.api_key = api_key
        yield f


async def _api_key(redis_url: str, namespace: str) -> str:
    async with KeyStore(redis_url, namespace) as keys:
        _, secret = await keys.create("dashboard-test")
    return secret


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver = open_browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("LLMFLEET_SCREENSHOT_DIR", tmp_path))
    target.mkdir(parents=True, exist_ok=True)
    return target


def _js(driver: webdriver.Chrome, script: str) -> Any:
    return driver.execute_script(script)


def _row_states(driver: webdriver.Chrome) -> dict[str, str]:
    # Read in one script: the page re-renders the table every second, so elements found
    # by one call may be gone by the next.
    return dict(_js(driver, "return [...document.querySelectorAll('#instances tbody tr')]"
                            ".map(r => [r.dataset.instance, r.dataset.state])"))


def _ring_owners(driver: webdriver.Chrome) -> set[str]:
    return set(_js(driver, "return [...document.querySelectorAll('#ring-arcs path')]"
                           ".map(p => p.dataset.owner)"))


def test_dashboard_shows_the_fleet_live_and_drains_from_the_page(
        fleet: LiveFleet, browser: webdriver.Chrome, shots: Path) -> None:
    ids = {"engine-0", "engine-1", "engine-2"}
    with background_load(fleet):
        # Without the token the page says so instead of showing stale or empty data.
        browser.get(fleet.url + "/dashboard")
        wait_until(lambda: "admin token needed" in
                   browser.find_element(By.ID, "live-text").text, timeout_s=10)
        # The login field: the token goes into the Authorization header from then on.
        browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_until(lambda: browser.find_element(By.ID, "live-text").text == "live",
                   timeout_s=10)

        # The instances and both rings appear.
        wait_until(lambda: set(_row_states(browser)) == ids, timeout_s=10)
        assert set(_row_states(browser).values()) == {"healthy"}
        wait_until(lambda: int(browser.find_element(By.ID, "rings")
                               .get_attribute("data-arcs") or 0) > 0, timeout_s=10)
        assert _ring_owners(browser) == ids
        legend = _js(browser, "return [...document.querySelectorAll("
                              "'#rings-legend tr[data-member]')].map(r => r.dataset.member)")
        assert set(legend) == ids

        # A live-updating chart: the request-rate line is redrawn with new points, and
        # updates arrive about once a second.
        wait_until(lambda: float(browser.find_element(By.ID, "kpi-rps").text or 0) > 0,
                   timeout_s=15)
        chart = "#chart-reasons path[data-series='all requests']"
        read_chart = (f"return [document.querySelector(\"{chart}\").getAttribute('d'), "
                      "Number(document.body.dataset.messages)]")
        first_path, first_count = _js(browser, read_chart)
        time.sleep(3.2)
        path, count = _js(browser, read_chart)
        assert path != first_path
        assert count >= first_count + 2
        # Decisions by reason come from the gateway's own counters (DualMap: affinity).
        assert _js(browser, "return document.querySelectorAll("
                            "\"#chart-reasons path[data-series='affinity']\").length") == 1
        assert _js(browser, "return document.querySelectorAll('#recent tbody tr').length") > 0
        wait_until(lambda: "hidden" in (browser.find_element(By.ID, "banner")
                                        .get_attribute("class") or ""), timeout_s=10)
        browser.save_screenshot(str(shots / "dashboard.png"))

        # Drain, from the page, the instance that served the most requests just now (so
        # that its getting none afterwards is the drain's doing, not the workload's).
        before = {i: engine_requests_served(fleet.engine_url(i)) for i in ids}
        sent_before = fleet.sent
        wait_until(lambda: fleet.sent >= sent_before + 16, timeout_s=60)
        served = {i: engine_requests_served(fleet.engine_url(i)) - before[i] for i in ids}
        victim = max(served, key=lambda i: served[i])
        assert served[victim] > 0
        others = ids - {victim}
        browser.find_element(By.CSS_SELECTOR, f"button[data-drain='{victim}']").click()
        wait_until(lambda: _row_states(browser).get(victim) == "draining", timeout_s=10)
        wait_until(lambda: victim not in _ring_owners(browser), timeout_s=5)
        assert _ring_owners(browser) == others
        events = browser.find_element(By.ID, "events").text
        assert f"operator drained {victim}" in events and f"{victim} is draining" in events

        # Routing stops sending it requests, while the others keep serving.
        time.sleep(0.5)  # requests already sent to it finish
        before = {i: engine_requests_served(fleet.engine_url(i)) for i in ids}
        sent_before = fleet.sent
        wait_until(lambda: fleet.sent >= sent_before + 16, timeout_s=60)
        time.sleep(0.3)
        after = {i: engine_requests_served(fleet.engine_url(i)) for i in ids}
        assert after[victim] == before[victim]
        assert sum(after[i] - before[i] for i in others) >= 16
        browser.save_screenshot(str(shots / "dashboard-drained.png"))

        # The other admin actions from the page: admission mode, routing policy, migrate.
        Select(browser.find_element(By.ID, "admission-select")).select_by_visible_text("laps")
        browser.find_element(By.ID, "admission-apply").click()
        wait_until(lambda: browser.find_element(By.ID, "kpi-admission").text == "laps",
                   timeout_s=10)
        wait_until(lambda: "admission laps" in browser.find_element(By.ID, "instances-note")
                   .text, timeout_s=5)
        Select(browser.find_element(By.ID, "policy-select")).select_by_visible_text("least_loaded")
        browser.find_element(By.ID, "policy-apply").click()
        wait_until(lambda: browser.find_element(By.ID, "kpi-policy").text == "least_loaded",
                   timeout_s=10)
        wait_until(lambda: browser.find_element(By.ID, "rings").get_attribute("data-arcs")
                   == "0", timeout_s=5)
        browser.find_element(By.ID, "migrate-request").send_keys("some-request")
        browser.find_element(By.CSS_SELECTOR, "#migrate-form button").click()
        wait_until(lambda: "No running request" in browser.find_element(By.ID, "banner").text,
                   timeout_s=5)
        sent_before = fleet.sent  # requests still flow under the new policy and admission
        wait_until(lambda: fleet.sent >= sent_before + 5, timeout_s=30)
    assert fleet.failed == []
    # The drain lives in Redis, so every gateway replica (not just this page's) applies it.
    gateway: Gateway = fleet.gateway
    assert {v.instance_id for v in gateway.snapshot.instances if v.draining} == {victim}
    assert gateway.policy.name == "least_loaded" and gateway.gate.admission.mode == "laps"
