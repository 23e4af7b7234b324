"""The engine core's migration primitives: reservations, suspend/resume, release."""

from __future__ import annotations

import pytest

from instances.engine.core import EngineCore, InsufficientKVBlocks
from instances.engine.factory import build_engine_core
from instances.engine.types import EngineRequest, SamplingParams
from tests.engine.drive import make_request, run_until_idle


def _decode(core: EngineCore, request_id: str, outputs: int) -> None:
    now = 0.0
    while True:
        now += core.step(now).duration_s
        state = core.get_request(request_id)
        assert state is not None
        if len(state.output_token_ids) >= outputs:
            return


def test_reserved_blocks_are_out_of_circulation_and_feed_the_import() -> None:
    source = build_engine_core()
    source.add_request(make_request("r", list(range(1, 161)), 8))
    _decode(source, "r", 1)
    copies = source.export_request_blocks("r")
    assert len(copies) == 10
    destination = build_engine_core(num_gpu_blocks=12)
    assert destination.reserve_blocks("m", 10)
    assert destination.num_reserved_blocks("m") == 10
    assert destination.stats().free_blocks == 2
    assert not destination.reserve_blocks("other", 3)  # nothing taken on refusal
    assert destination.num_reserved_blocks() == 10
    # A request arriving meanwhile cannot take the reserved blocks.
    destination.add_request(make_request("busy", list(range(1, 60)), 4))
    destination.step(0.0)
    assert destination.get_request("busy") is not None
    assert destination.get_request("busy").block_table == []  # type: ignore[union-attr]
    assert destination.import_blocks(copies[:6], reservation="m") == 6
    assert destination.num_reserved_blocks("m") == 4
    assert destination.import_blocks(copies[6:], reservation="m") == 4
    assert destination.num_reserved_blocks("m") == 0
    destination.release_reservation("m")
    destination.unpin_blocks([c.block_hash for c in copies])
    destination.block_manager.check_invariants()


def test_import_beyond_the_reservation_uses_free_blocks_or_refuses() -> None:
    source = build_engine_core()
    source.add_request(make_request("r", list(range(1, 161)), 8))
    _decode(source, "r", 1)
    copies = source.export_request_blocks("r")
    destination = build_engine_core(num_gpu_blocks=12)
    assert destination.reserve_blocks("m", 4)
    assert destination.reserve_blocks("hog", 6)
    with pytest.raises(InsufficientKVBlocks):
        destination.import_blocks(copies, reservation="m")  # 10 > 4 reserved + 2 free
    assert destination.num_reserved_blocks("m") == 4 and destination.num_pinned_blocks == 0
    assert destination.import_blocks(copies[:6], reservation="m") == 6
    assert destination.stats().free_blocks == 0
    destination.release_reservation("hog")
    destination.release_reservation("m")
    destination.unpin_blocks([c.block_hash for c in copies])
    assert destination.stats().free_blocks == 12
    destination.block_manager.check_invariants()


@pytest.mark.parametrize("executor", ["emulated", "tiny"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_suspend_export_adopt_continues_exactly(executor: str, temperature: float) -> None:
    prompt = list(range(30, 100))
    reference = run_until_idle(build_engine_core(executor, seed=7),
                               [make_request("r", prompt, 40, temperature)])
    # Engine seeds differ: the resolved seed travels with the request.
    source = build_engine_core(executor, seed=7)
    source.add_request(make_request("r", prompt, 40, temperature))
    _decode(source, "r", 9)
    assert source.is_decoding("r")
    state = source.suspend_request("r")
    assert not source.is_decoding("r") and source.is_suspended("r")
    steps_before = source.num_steps
    source.step(0.0)  # a suspended request does not step
    assert source.num_steps == steps_before and len(state.output_token_ids) == 9
    copies = source.export_request_blocks("r")
    seed = source.resolved_sampling_seed("r")
    destination = build_engine_core(executor, seed=99)
    destination.import_blocks(copies)
    moved = EngineRequest("r", prompt, SamplingParams(max_tokens=40, temperature=temperature,
                                                      seed=seed),
                          output_token_ids=list(state.output_token_ids))
    log = run_until_idle(destination, [moved])
    assert state.output_token_ids[:9] + log.outputs["r"] == reference.outputs["r"]
    source.abort_request("r", "migrated")
    events = source.step(0.0).events
    assert [(e.request_id, e.finish_reason, e.finished) for e in events] == [
        ("r", "migrated", True)]
    assert source.stats().free_blocks == source.stats().total_blocks
    source.block_manager.check_invariants()


def test_resume_puts_the_request_back() -> None:
    core = build_engine_core("tiny")
    prompt = list(range(30, 100))
    reference = run_until_idle(build_engine_core("tiny"), [make_request("r", prompt, 30)])
    request = make_request("r", prompt, 30)
    core.add_request(request)
    _decode(core, "r", 5)
    core.suspend_request("r")
    with pytest.raises(ValueError):
        core.suspend_request("r")
    core.resume_request("r")
    run_until_idle(core)
    assert request.output_token_ids == reference.outputs["r"]


def test_aborting_a_suspended_request_frees_its_blocks() -> None:
    core = build_engine_core()
    core.add_request(make_request("r", list(range(1, 100)), 30))
    _decode(core, "r", 2)
    core.suspend_request("r")
    core.abort_request("r")
    assert not core.is_suspended("r")
    assert core.stats().free_blocks == core.stats().total_blocks
    core.block_manager.check_invariants()


@pytest.mark.parametrize("executor", ["emulated", "tiny"])
def test_a_copied_partial_block_leaves_only_the_last_token_to_compute(executor: str) -> None:
    prompt = list(range(30, 100))  # 70 tokens: 4 full blocks + 6
    reference = run_until_idle(build_engine_core(executor),
                               [make_request("r", prompt, 30, 0.8, seed=5)])
    source = build_engine_core(executor)
    source.add_request(make_request("r", prompt, 30, 0.8, seed=5))
    _decode(source, "r", 3)  # 72 computed tokens: 4 full blocks + 8
    state = source.suspend_request("r")
    partial = source.export_partial_block("r")
    assert partial is not None and len(partial[0]) == state.num_computed_tokens % 16
    destination = build_engine_core(executor)
    destination.import_blocks(source.export_request_blocks("r"))
    moved = EngineRequest("r", prompt, SamplingParams(max_tokens=30, temperature=0.8, seed=5),
                          output_token_ids=list(state.output_token_ids))
    destination.add_request(moved)
    assert destination.preload_partial_block("r", *partial)
    first = destination.step(0.0)
    assert first.num_prefill_tokens == 0 and first.num_decode_seqs == 1
    log = run_until_idle(destination)
    assert [*state.output_token_ids[:3], *first.events[0].new_token_ids,
            *log.outputs["r"]] == reference.outputs["r"]
    destination.unpin_blocks(list(destination._pinned))
    assert destination.stats().free_blocks == destination.stats().total_blocks
    destination.block_manager.check_invariants()


def test_an_unused_preload_is_given_back() -> None:
    core = build_engine_core()
    core.add_request(make_request("r", list(range(1, 40)), 8))
    payload = core.executor.read_block(0, list(range(1, 8)), None)
    assert core.preload_partial_block("r", list(range(1, 8)), None, payload)
    assert core.stats().free_blocks == core.stats().total_blocks - 1
    core.abort_request("r")  # before admission
    assert core.stats().free_blocks == core.stats().total_blocks
    core.add_request(make_request("s", list(range(1, 40)), 4))
    assert core.preload_partial_block("s", list(range(1, 8)), None, payload)
    run_until_idle(core)  # its full blocks are not cached here: the preload is dropped
    assert core.stats().free_blocks == core.stats().total_blocks
    core.block_manager.check_invariants()
