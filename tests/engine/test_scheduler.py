"""Scheduler behaviour through EngineCore: chunking, batching limits, preemption, aborts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from instances.engine.factory import build_engine_core
from instances.engine.types import EngineRequest, SamplingParams
from tests.engine.drive import DriveLog, make_request, record_events, run_until_idle


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def test_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    core = build_engine_core(max_num_batched_tokens=8192)
    core.add_request(make_request("a", _prompt(0, 20_000), max_tokens=3))
    chunks = []
    now = 0.0
    while True:
        result = core.step(now)
        now += result.duration_s
        chunks.append(result.num_prefill_tokens)
        if result.events:
            break
    assert chunks == [8192, 8192, 20_000 - 2 * 8192]
    assert core.stats().waiting_prefill_tokens == 0


def test_decodes_go_first_and_prefill_uses_the_leftover_budget() -> None:
    core = build_engine_core(max_num_batched_tokens=1000)
    for i in range(4):
        core.add_request(make_request(f"d{i}", _prompt(i, 100), max_tokens=50))
    first = core.step(0.0)
    assert first.num_prefill_tokens == 400 and len(first.events) == 4
    core.add_request(make_request("long", _prompt(9, 5000), max_tokens=2))
    second = core.step(first.duration_s)
    assert second.num_decode_seqs == 4
    assert second.num_prefill_tokens == 1000 - 4


def test_max_num_seqs_caps_the_running_batch() -> None:
    core = build_engine_core(max_num_seqs=3)
    for i in range(5):
        core.add_request(make_request(f"r{i}", _prompt(i, 50), max_tokens=10))
    core.step(0.0)
    stats = core.stats()
    assert stats.num_running == 3 and stats.num_waiting == 2
    log = run_until_idle(core)
    assert set(log.finish_reason) == {f"r{i}" for i in range(5)}


def test_preemption_recomputes_and_requests_still_finish_in_fcfs_order() -> None:
    # 16 blocks x 4 tokens = 64 KV slots; three 20-token prompts growing to 40 tokens.
    core = build_engine_core(num_gpu_blocks=16, block_size=4)
    reference = {}
    for i in range(3):
        alone = build_engine_core(num_gpu_blocks=16, block_size=4)
        request = make_request(f"r{i}", _prompt(i, 20), max_tokens=20)
        reference[f"r{i}"] = run_until_idle(alone, [request]).outputs[f"r{i}"]
    log = run_until_idle(
        core, [make_request(f"r{i}", _prompt(i, 20), max_tokens=20) for i in range(3)]
    )
    assert core.stats().num_preemptions > 0
    assert log.outputs == reference
    assert all(reason == "length" for reason in log.finish_reason.values())
    # The oldest request is never the victim, so it finishes first.
    assert min(log.finish_time, key=log.finish_time.__getitem__) == "r0"
    assert core.block_manager.num_free_blocks == 16
    core.block_manager.check_invariants()


def test_abort_frees_blocks_and_reports_once() -> None:
    core = build_engine_core(num_gpu_blocks=64, block_size=16, max_num_seqs=1)
    core.add_request(make_request("running", _prompt(0, 100), max_tokens=100))
    core.add_request(make_request("waiting", _prompt(1, 100), max_tokens=100))
    now = core.step(0.0).duration_s
    assert core.stats().free_blocks < 64
    core.abort_request("running")
    core.abort_request("waiting")
    core.abort_request("never-existed")  # unknown ids are a no-op
    assert core.stats().free_blocks == 64 and core.stats().waiting_prefill_tokens == 0
    assert core.has_unfinished_requests()  # the abort events are still to be reported
    result = core.step(now)
    assert result.duration_s == 0.0
    assert sorted((e.request_id, e.finish_reason, e.finished) for e in result.events) == [
        ("running", "abort", True),
        ("waiting", "abort", True),
    ]
    assert not core.has_unfinished_requests()
    assert core.step(now).events == ()
    core.abort_request("running")  # aborting twice: no second event
    assert core.step(now).events == ()


def test_idle_step_takes_no_time() -> None:
    core = build_engine_core()
    result = core.step(3.0)
    assert result.duration_s == 0.0 and result.events == ()
    assert not core.has_unfinished_requests()


def test_stop_token_ends_the_request() -> None:
    core = build_engine_core()
    probe = run_until_idle(core, [make_request("probe", _prompt(0, 30), max_tokens=10)])
    third = probe.outputs["probe"][2]
    request = EngineRequest(
        "stopper", _prompt(0, 30), SamplingParams(max_tokens=10, stop_token_ids=(third,))
    )
    log = run_until_idle(build_engine_core(), [request])
    stop_at = probe.outputs["probe"].index(third)
    assert log.outputs["stopper"] == probe.outputs["probe"][: stop_at + 1]
    assert log.finish_reason["stopper"] == "stop"


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ([], 4, "empty"),
        ([1, 2, 300], 4, "out of range"),
        ([1, -1], 4, "out of range"),
        ([1, 2**40], 4, "integers"),
        ([1, 2.5], 4, "integers"),
        ([1, 2], 0, "max_tokens"),
        (list(range(10)), 60, "capacity"),
    ],
)
def test_requests_that_can_never_run_are_rejected(
    prompt: list[Any], max_tokens: int, message: str
) -> None:
    core = build_engine_core(num_gpu_blocks=4, block_size=16)  # 64 tokens of KV
    with pytest.raises(ValueError, match=message):
        core.add_request(make_request("bad", prompt, max_tokens=max_tokens))
    assert not core.has_unfinished_requests()


def test_duplicate_request_id_is_rejected() -> None:
    core = build_engine_core()
    core.add_request(make_request("same", [1, 2, 3]))
    with pytest.raises(ValueError, match="already"):
        core.add_request(make_request("same", [1, 2, 3]))


def test_stats_track_waiting_prefill_work() -> None:
    core = build_engine_core(max_num_batched_tokens=1000)
    core.add_request(make_request("a", _prompt(0, 3000), max_tokens=2))
    assert core.stats().waiting_prefill_tokens == 3000 and core.stats().num_waiting == 1
    now = core.step(0.0).duration_s
    assert core.stats().waiting_prefill_tokens == 2000 and core.stats().num_running == 1
    log = DriveLog()
    while core.has_unfinished_requests():
        result = core.step(now)
        now += result.duration_s
        record_events(log, result.events, now)
    stats = core.stats()
    assert stats.waiting_prefill_tokens == 0 and stats.kv_usage == 0.0
    assert stats.total_blocks == stats.free_blocks


def test_kv_events_through_the_core() -> None:
    core = build_engine_core(enable_kv_events=True, num_gpu_blocks=8, block_size=16)
    prompt = _prompt(0, 40)
    run_until_idle(core, [make_request("a", prompt, max_tokens=30)])
    events = core.drain_kv_events()
    stored = [h for e in events if e.kind == "BlockStored" for h in e.block_hashes]
    # 40 prompt + 29 computed output tokens = 69 computed tokens -> 4 full blocks cached.
    assert len(stored) == 4
    first = next(e for e in events if e.kind == "BlockStored")
    assert list(first.token_ids[:16]) == prompt[:16]
    assert core.num_cached_prefix_tokens(prompt) == 32
    assert core.drain_kv_events() == []
    # Filling the cache with another request evicts them: BlockRemoved.
    run_until_idle(core, [make_request("b", _prompt(1, 100), max_tokens=20)])
    removed = [
        h for e in core.drain_kv_events() if e.kind == "BlockRemoved" for h in e.block_hashes
    ]
    assert set(removed) <= set(stored) and removed
    assert build_engine_core().drain_kv_events() == []
