"""Engine-level LAPS mode: short prefills first, batched within a wait window, longs not
starved."""

from __future__ import annotations

import numpy as np

from instances.engine.core import EngineCore
from instances.engine.factory import build_engine_core
from tests.engine.drive import DriveLog, make_request, record_events


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _short_ttft_behind_a_long_prefill(core: EngineCore) -> DriveLog:
    log = DriveLog()
    core.add_request(make_request("long", _prompt(0, 16_000), max_tokens=4))
    now = core.step(0.0).duration_s  # the long prefill is under way (2048 of 16000)
    arrival = now
    for i in range(4):
        core.add_request(make_request(f"s{i}", _prompt(10 + i, 100), max_tokens=4))
    while core.has_unfinished_requests():
        result = core.step(now)
        now += result.duration_s
        record_events(log, result.events, now)
    log.first_token_time = {k: v - arrival for k, v in log.first_token_time.items()}
    return log


def test_short_requests_overtake_a_long_prefill() -> None:
    fcfs = _short_ttft_behind_a_long_prefill(build_engine_core(max_num_batched_tokens=2048))
    laps = _short_ttft_behind_a_long_prefill(
        build_engine_core(max_num_batched_tokens=2048, long_prefill_token_threshold=256)
    )
    short_ids = [f"s{i}" for i in range(4)]
    # FCFS: the running long prefill eats every step's budget; shorts wait for it.
    assert all(fcfs.first_token_time[s] >= fcfs.first_token_time["long"] for s in short_ids)
    # LAPS: shorts get the next iteration, long after that.
    assert all(laps.first_token_time[s] < laps.first_token_time["long"] for s in short_ids)
    assert max(laps.first_token_time[s] for s in short_ids) < 0.25 * min(
        fcfs.first_token_time[s] for s in short_ids
    )
    # The long request pays only for the few short prefills it let through.
    assert laps.first_token_time["long"] < 1.1 * fcfs.first_token_time["long"]
    assert laps.outputs == fcfs.outputs


def test_short_requests_wait_in_a_window_to_share_an_iteration() -> None:
    core = build_engine_core(long_prefill_token_threshold=256, laps_short_wait_s=0.02)
    core.add_request(make_request("a", _prompt(1, 100), max_tokens=2))
    held = core.step(0.0)
    assert held.events == () and held.duration_s == np.float64(0.02)
    assert core.has_unfinished_requests()
    core.add_request(make_request("b", _prompt(2, 100), max_tokens=2))
    still_held = core.step(0.005)
    assert still_held.events == ()
    assert abs(still_held.duration_s - 0.015) < 1e-9  # until a's window closes
    batched = core.step(0.005 + still_held.duration_s)
    assert batched.num_prefill_tokens == 200
    assert sorted(e.request_id for e in batched.events) == ["a", "b"]
    # Without a window the first short runs at once, alone.
    eager = build_engine_core(long_prefill_token_threshold=256)
    eager.add_request(make_request("a", _prompt(1, 100), max_tokens=2))
    assert eager.step(0.0).num_prefill_tokens == 100


def test_a_full_short_batch_is_released_before_the_window_ends() -> None:
    core = build_engine_core(
        long_prefill_token_threshold=256, laps_short_wait_s=10.0, max_num_seqs=2
    )
    core.add_request(make_request("a", _prompt(1, 100), max_tokens=2))
    core.add_request(make_request("b", _prompt(2, 100), max_tokens=2))
    result = core.step(0.0)
    assert sorted(e.request_id for e in result.events) == ["a", "b"]


def test_long_request_is_not_starved_by_a_stream_of_shorts() -> None:
    max_skipped = 3
    core = build_engine_core(
        max_num_batched_tokens=256,
        long_prefill_token_threshold=64,
        laps_long_max_skipped_steps=max_skipped,
    )
    core.add_request(make_request("long", _prompt(0, 2000), max_tokens=1))
    now = 0.0
    progress = []
    step = 0
    first_token_step = None
    while first_token_step is None:
        # Every step, enough new short work to fill the whole budget.
        for i in range(4):
            core.add_request(make_request(f"s{step}-{i}", _prompt(1000 + 4 * step + i, 64), 1))
        result = core.step(now)
        now += result.duration_s
        step += 1
        if any(e.request_id == "long" for e in result.events):
            first_token_step = step
        else:
            request = core.get_request("long")
            assert request is not None
            progress.append(request.num_computed_tokens)
        assert step < 1000
    # The long request computes a chunk at least once every max_skipped + 1 steps ...
    gaps = 0
    for before, after in zip([0, *progress], progress, strict=False):
        gaps = 0 if after > before else gaps + 1
        assert gaps <= max_skipped
    # ... so its prefill ends within that many steps per chunk of budget size.
    assert first_token_step <= (max_skipped + 1) * (-(-2000 // 256) + 1)


def test_two_long_prefills_short_of_blocks_do_not_deadlock() -> None:
    """Found by the property test: both longs hold half the blocks and need one more."""
    core = build_engine_core(
        block_size=4,
        num_gpu_blocks=4,
        max_num_batched_tokens=5,
        max_num_seqs=2,
        long_prefill_token_threshold=6,
    )
    core.add_request(make_request("a", [0] * 9, max_tokens=1))
    core.add_request(make_request("b", [0, 0, 0, 1, 0, 0, 0, 0, 0], max_tokens=1))
    log = DriveLog()
    now = 0.0
    for _ in range(50):
        if not core.has_unfinished_requests():
            break
        result = core.step(now)
        assert result.duration_s > 0, "a step with work pending scheduled nothing"
        now += result.duration_s
        record_events(log, result.events, now)
    assert log.finish_reason == {"a": "length", "b": "length"}
    assert core.stats().num_preemptions >= 1
