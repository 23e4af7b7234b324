"""Live migration of running requests in the simulator (``RunConfig.migration``): a memory
hotspot on one of two reference engine cores, relieved by moving decoding requests."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen.config import RunConfig
from loadgen.request import Segment, TraceRequest, segment_key
from loadgen.sim import InstanceAccount, Simulator, summarize_sim
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingRequest
from tests.loadgen.fakes import RoundRobin

PROMPT, OUTPUT, COUNT = 400, 600, 6


class FirstInstance(RoundRobin):
    """Sends every request to the first instance: a hotspot the router made."""

    name = "test_first_instance"

    def route(self, request: RoutingRequest, snapshot: ClusterSnapshot, now: float) -> Decision:
        return Decision(snapshot.instances[0].instance_id, "first")


def _requests() -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", 0.01 * i, PROMPT, OUTPUT,
                         segments=(Segment(segment_key("mig", i), PROMPT),))
            for i in range(COUNT)]


def _run(migration: bool, **overrides: Any) -> tuple[Simulator, dict[str, Any]]:
    # 200 blocks of 16 tokens: six requests of 400 + 600 tokens need 378 at the end, so on
    # one instance they outgrow its KV memory and preempt each other; the second instance
    # has all of its own free.
    config = RunConfig(instances=2, engine_params={"num_gpu_blocks": 200}, slo_ttft_s=5.0,
                       migration=migration, migration_params={"period_s": 0.2}, **overrides)
    policy = FirstInstance()
    simulator = Simulator(config, _requests(), policy_factory=lambda c: policy)
    result = simulator.run()
    return simulator, summarize_sim(config, result)


def _preemptions(summary: dict[str, Any]) -> int:
    return sum(i["preemptions"] for i in summary["per_instance"])


def test_migration_relieves_a_memory_hotspot_without_losing_tokens() -> None:
    _, without = _run(migration=False)
    simulator, with_migration = _run(migration=True)
    assert "migration" not in without
    counters = with_migration["migration"]
    assert counters["committed"] >= 1
    assert counters["blocks"] > 0 and counters["gbytes"] > 0
    # Every request produced exactly its output, finished once, none lost.
    outcomes = {o.request_id: o for o in simulator.outcomes.values()}
    assert len(outcomes) == COUNT
    for outcome in outcomes.values():
        assert outcome.error is None
        assert outcome.output_tokens == OUTPUT
        assert outcome.e2e_s is not None
    assert with_migration["completed"] == COUNT
    # The second instance decoded what moved there; the hotspot preempted less.
    second = with_migration["per_instance"][1]
    assert second["decode_tokens"] > 0
    assert without["per_instance"][1]["decode_tokens"] == 0
    assert _preemptions(with_migration) < _preemptions(without)
    # Nothing stays pinned, reserved or suspended once everything finished.
    for account in simulator.accounts:
        core = simulator._core(account)
        assert core.num_pinned_blocks == 0
        assert core.num_reserved_blocks() == 0
        assert not core.has_unfinished_requests()
        assert core.block_manager.num_free_blocks == core.num_blocks


def test_moved_request_is_not_recomputed_on_its_target() -> None:
    # The target admits the request with its copied blocks cached: it prefills at most the
    # last sampled token per move, not the context (a recompute would prefill >= PROMPT).
    _, summary = _run(migration=True)
    moved = summary["migration"]["committed"]
    assert moved >= 1
    assert summary["per_instance"][1]["prefill_tokens"] <= moved
    assert summary["migration"]["downtime_max_s"] < 0.05


class Recording(Simulator):
    """Records, per request, the instance of each token event the simulator delivers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sources: dict[str, list[str]] = {}

    def _on_step_done(self, account: InstanceAccount, now: float) -> None:
        assert account.pending is not None
        for event in account.pending.events:
            for _ in event.new_token_ids:
                self.sources.setdefault(event.request_id, []).append(account.instance_id)
        super()._on_step_done(account, now)


def test_a_moved_request_streams_from_one_instance_at_a_time() -> None:
    # Its tokens come from the source, then (after the handoff) only from the target: the
    # stop-and-copy starts at a step boundary of the source, so no token of the source is
    # still in flight when the target takes over.
    config = RunConfig(instances=2, engine_params={"num_gpu_blocks": 200}, slo_ttft_s=5.0,
                       migration=True, migration_params={"period_s": 0.2})
    simulator = Recording(config, _requests(), policy_factory=lambda c: FirstInstance())
    simulator.run()
    moved = 0
    for request_id, sources in simulator.sources.items():
        assert len(sources) == OUTPUT, request_id
        switches = [k for k in range(1, len(sources)) if sources[k] != sources[k - 1]]
        assert len(switches) <= 1, request_id
        moved += len(switches)
    assert moved >= 1


def test_a_move_that_cannot_finish_changes_nothing() -> None:
    # At 0.001 GB/s the pre-copy of a request's blocks takes a minute: the hotspot preempts
    # the request meanwhile, so the move fails (not_migratable). The target gives back its
    # reservation and pinned blocks, the request finishes on its source, nothing is lost.
    simulator, summary = _run(migration=True, migration_gbytes_per_s=0.001)
    counters = summary["migration"]
    assert counters["committed"] == 0
    assert counters["failed"] == {"not_migratable": counters["started"]}
    assert counters["started"] >= 1
    assert summary["per_instance"][1]["decode_tokens"] == 0
    for outcome in simulator.outcomes.values():
        assert outcome.output_tokens == OUTPUT and outcome.error is None
    target = simulator._core(simulator.accounts[1])
    assert target.num_pinned_blocks == 0 and target.num_reserved_blocks() == 0


def test_bad_bandwidth_is_refused() -> None:
    with pytest.raises(ValueError, match="migration_gbytes_per_s"):
        Simulator(RunConfig(instances=2, migration=True, migration_gbytes_per_s=0.0),
                  _requests(), policy_factory=lambda c: FirstInstance())
