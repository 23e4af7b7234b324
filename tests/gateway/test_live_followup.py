"""Live: a short multi-turn workload through the gateway keeps each conversation's turns on
the replica of the turn before (issue 12), measured by the load generator's summary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from loadgen.config import RunConfig
from loadgen.runner import run_live
from loadgen.workloads import MultiTurnConfig, multi_turn
from tests.fleet import gateway_fleet


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[str]:
    with gateway_fleet(redis_url, namespace, 4, speedup=20.0, heartbeat_ttl_s=2.0,
                       policy="dualmap") as fleet:
        yield fleet["url"]


@pytest.mark.e2e
def test_short_conversations_keep_their_replica_live(fleet: str) -> None:
    # Short prompts (a 64-token system prompt, ~40-token messages): under DualMap's old
    # 512-token key most of these turns would have moved.
    requests = multi_turn(120, 6.0, seed=5, config=MultiTurnConfig(
        num_system_prompts=3, system_prompt_len=64, turns_min=3, turns_max=6,
        user_len_mean=40, output_len_mean=8, output_len_sigma=0.2, think_time_mean_s=1.0))
    config = RunConfig(url=fleet, rate=6.0, slo_ttft_s=3.0)
    summary: dict[str, Any] = asyncio.run(run_live(config, requests=requests))
    assert summary["errors"] == 0
    assert summary["followups"] >= 60
    assert summary["followup_colocation"] >= 0.9, summary
