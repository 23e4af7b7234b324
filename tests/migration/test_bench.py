"""``llmfleet bench migration`` end to end on a small context: contract fields, a plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from migration import bench

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CONTRACT = {"context_tokens", "mode", "kv", "downtime_ms", "total_ms", "bytes", "stages"}


def test_bench_writes_the_contract_fields_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "migration.json"
    parser = argparse.ArgumentParser()
    bench._add_arguments(parser)
    args = parser.parse_args(["--contexts", "512", "--tiny-contexts", "", "--links", "1.25",
                              "--repeat", "1", "--loopback-rounds", "1", "--out", str(out)])
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["mode"], r["kv"]) for r in rows] == [
        ("live", "real"), ("live", "modelled"), ("replay", "modelled")]
    for row in rows:
        assert set(row) >= CONTRACT and row["committed"] == 1 and row["context_tokens"] == 512
    live, modelled, replay = rows
    assert live["bytes"] >= 32 * 4096 and live["stages"] >= 1
    assert modelled["link_gbytes_per_s"] == 1.25
    # Modelled bytes: 512 tokens' full blocks at 2 MiB each (more blocks fill meanwhile).
    assert modelled["bytes"] >= 32 * 2 * 1024 * 1024
    assert replay["stages"] == 0 and replay["bytes"] > 0
    assert result["grpc_loopback_gbytes_per_s"] > 0 and result["tcp_loopback_gbytes_per_s"] > 0
    assert result["grpc_loopback_protobuf_gbytes_per_s"] > 0
    assert result["loopback"]["bytes_per_round"] >= 1 << 29
    assert out.with_suffix(".png").stat().st_size > 10_000
