"""KV block export/import between two cores (the primitives live migration builds on)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instances.engine.core import EngineCore, InsufficientKVBlocks
from instances.engine.emulated import verify_block_payload
from instances.engine.factory import build_engine_core
from instances.engine.types import EngineRequest, SamplingParams
from tests.engine.drive import make_request, run_until_idle


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _run_until_outputs(core: EngineCore, request_id: str, count: int) -> float:
    now = 0.0
    while True:
        now += core.step(now).duration_s
        state = core.get_request(request_id)
        assert state is not None
        if len(state.output_token_ids) >= count:
            return now


@pytest.mark.parametrize("executor", ["emulated", "tiny"])
def test_migrated_request_continues_with_the_same_tokens(executor: str) -> None:
    prompt = _prompt(1, 100) if executor == "emulated" else list(range(40, 100))
    total = 30
    reference = run_until_idle(build_engine_core(executor), [make_request("r", prompt, total)])
    expected = reference.outputs["r"]
    assert len(expected) == total or reference.finish_reason["r"] == "stop"

    source = build_engine_core(executor)
    request = make_request("r", prompt, total)
    source.add_request(request)
    _run_until_outputs(source, "r", 12)
    generated = list(request.output_token_ids)
    copies = source.export_request_blocks("r")
    state = source.get_request("r")
    assert state is not None
    assert len(copies) == state.num_computed_tokens // source.block_size > 0
    if executor == "emulated":
        assert all(
            verify_block_payload(c.token_ids, c.parent_block_hash, c.payload) for c in copies
        )

    destination = build_engine_core(executor)
    assert destination.import_blocks(copies) == len(copies)
    assert destination.num_pinned_blocks == len(copies)
    assert destination.import_blocks(copies) == 0  # idempotent
    source.abort_request("r")
    resumed = EngineRequest(
        "r", prompt + generated, SamplingParams(max_tokens=total - len(generated))
    )
    log = run_until_idle(destination, [resumed])
    assert log.cached_tokens["r"] == len(copies) * destination.block_size
    assert generated + log.outputs["r"] == expected
    destination.unpin_blocks([c.block_hash for c in copies])
    assert destination.num_pinned_blocks == 0
    assert destination.stats().free_blocks == destination.stats().total_blocks
    destination.block_manager.check_invariants()


def test_tiny_kv_bytes_arrive_unchanged() -> None:
    source = build_engine_core("tiny")
    source.add_request(make_request("r", list(range(50, 90)), 20))
    _run_until_outputs(source, "r", 3)
    copies = source.export_request_blocks("r")
    destination = build_engine_core("tiny")
    destination.import_blocks(copies)
    for copy in copies:
        block_id = destination.block_manager.cached_block(copy.block_hash)
        assert block_id is not None
        assert destination.executor.read_block(block_id, copy.token_ids, None) == copy.payload


def test_corrupt_copies_are_refused_and_nothing_is_pinned() -> None:
    source = build_engine_core()
    source.add_request(make_request("r", _prompt(2, 64), 10))
    _run_until_outputs(source, "r", 2)
    copies = source.export_request_blocks("r")
    destination = build_engine_core(enable_kv_events=True)
    bad_payload = [*copies[:-1], dataclasses.replace(copies[-1], payload=b"x" * 4096)]
    with pytest.raises(ValueError, match="does not match"):
        destination.import_blocks(bad_payload)
    bad_tokens = [dataclasses.replace(copies[0], token_ids=(1,) * 16)]
    with pytest.raises(ValueError, match="hash"):
        destination.import_blocks(bad_tokens)
    assert destination.num_pinned_blocks == 0
    assert destination.stats().free_blocks == destination.stats().total_blocks
    # The bad block is not left in the cache (the verified ones before it may stay cached).
    assert destination.block_manager.cached_block(copies[-1].block_hash) is None
    destination.block_manager.check_invariants()


def test_import_refuses_when_blocks_do_not_fit() -> None:
    source = build_engine_core()
    source.add_request(make_request("r", _prompt(3, 160), 4))
    _run_until_outputs(source, "r", 1)
    copies = source.export_request_blocks("r")
    assert len(copies) == 10
    destination = build_engine_core(num_gpu_blocks=12)
    destination.add_request(make_request("busy", _prompt(4, 100), 50))
    destination.step(0.0)  # 7 blocks in use, 5 free
    with pytest.raises(InsufficientKVBlocks):
        destination.import_blocks(copies)
    assert destination.num_pinned_blocks == 0 and destination.stats().free_blocks == 5
    assert destination.import_blocks(copies[:5]) == 5
    assert destination.stats().free_blocks == 0
