"""The gateway's /metrics and the Grafana dashboard that reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import GatewayMetrics
from tests.dashboard.fleet import LiveFleet, live_fleet, send

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(llmfleet_[a-zA-Z0-9_]+)")


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(GRAFANA.read_text()))


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_is_a_valid_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((grid["x"], grid["y"], grid["w"], grid["h"], panel["title"]))
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert METRIC.search(expr), f"{expr!r} reads no llmfleet metric"
    for a, b in combinations(boxes, 2):  # panels do not overlap on the grid
        overlap_x = a[0] < b[0] + b[2] and b[0] < a[0] + a[2]
        overlap_y = a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
        assert not (overlap_x and overlap_y), f"{a[4]!r} overlaps {b[4]!r}"
    # Quantiles are taken over histogram buckets, rates over counters.
    for expr in _queries(dashboard):
        if "histogram_quantile" in expr:
            assert "_seconds_bucket" in expr, expr
        if "rate(" in expr and "_bucket" not in expr:
            assert "_total[" in expr, expr


def test_metric_names_carry_their_units() -> None:
    """Histograms of time end in ``_seconds``, counters are exposed with ``_total``."""
    for family in GatewayMetrics().registry.collect():
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "counter":
            assert any(s.name == family.name + "_total" for s in family.samples) or \
                not family.samples, family.name


@pytest.fixture
def one_engine_fleet(redis_url: str, namespace: str) -> Iterator[LiveFleet]:
    with live_fleet(redis_url, namespace, engines=1) as fleet:
        yield fleet


@pytest.mark.e2e
def test_every_metric_the_grafana_dashboard_queries_is_on_live_metrics(
        one_engine_fleet: LiveFleet) -> None:
    url = one_engine_fleet.url
    for i in range(4):  # streamed and not: both request-duration series exist
        assert send(url, i, stream=i % 2 == 0).status_code == 200
    text = httpx.get(url + "/metrics", timeout=10).text
    exposed = {sample.name for family in text_string_to_metric_families(text)
               for sample in family.samples}
    wanted = {name for expr in _queries(_dashboard()) for name in METRIC.findall(expr)}
    assert wanted, "the dashboard queries nothing"
    missing = sorted(wanted - exposed)
    assert not missing, f"queried by deploy/grafana-dashboard.json, absent from /metrics: " \
                        f"{missing}"
    # The traffic above shows up where the dashboard looks for it.
    ttft_count = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "llmfleet_time_to_first_token_seconds_count")
    assert ttft_count == 2
