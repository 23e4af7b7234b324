"""Property tests of scheduler + block manager under random workloads (emulated executor).

Invariants checked after every step: under FCFS, running and waiting requests stay in
arrival order (nobody overtakes, preempted requests resume first); block bookkeeping is
consistent (no leaked or doubly freed block: the reference counts add up to exactly the
blocks in running requests' block tables); KV usage never exceeds capacity; waiting
requests hold no blocks; every running request has blocks for its computed tokens.
At the end: every block is free; every request that was not aborted produced exactly
``max_tokens`` tokens, identical to an unconstrained run; under FCFS each finished within
its starvation bound (see ``_fcfs_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instances.engine.core import EngineCore
from instances.engine.factory import build_engine_core
from instances.engine.types import RequestStatus
from tests.engine.drive import make_request


@dataclass(frozen=True)
class Arrival:
    step: int
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    block_size: int
    num_blocks: int
    budget: int
    max_num_seqs: int
    laps_threshold: int
    arrivals: tuple[Arrival, ...]
    aborts: tuple[tuple[int, int], ...]  # (step, arrival index)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    block_size = draw(st.sampled_from([2, 4, 8]))
    num_blocks = draw(st.integers(4, 24))
    capacity = block_size * num_blocks
    # A few shared prefixes over a tiny alphabet, so prefix-cache hits are frequent.
    prefixes = draw(
        st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=32), min_size=1, max_size=3)
    )
    arrivals = []
    step = 0
    for _ in range(draw(st.integers(1, 14))):
        step += draw(st.integers(0, 2))
        prefix = draw(st.sampled_from(prefixes))
        suffix = draw(st.lists(st.integers(0, 255), min_size=0, max_size=20))
        prompt = (prefix + suffix) or [7]
        prompt = prompt[: capacity - 1]
        max_tokens = draw(st.integers(1, max(1, min(24, capacity - len(prompt)))))
        arrivals.append(Arrival(step, tuple(prompt), max_tokens))
    aborts = draw(
        st.lists(
            st.tuples(st.integers(0, step + 20), st.integers(0, len(arrivals) - 1)), max_size=3
        )
    )
    return Workload(
        block_size=block_size,
        num_blocks=num_blocks,
        budget=draw(st.integers(1, 48)),
        max_num_seqs=draw(st.integers(1, 6)),
        laps_threshold=draw(st.sampled_from([0, 0, 6])),
        arrivals=tuple(arrivals),
        aborts=tuple(aborts),
    )


def _core(workload: Workload, num_blocks: int | None = None) -> EngineCore:
    return build_engine_core(
        "emulated",
        block_size=workload.block_size,
        num_gpu_blocks=num_blocks or workload.num_blocks,
        max_num_batched_tokens=workload.budget,
        max_num_seqs=workload.max_num_seqs,
        long_prefill_token_threshold=workload.laps_threshold,
        laps_long_max_skipped_steps=3,
    )


def _check_invariants(core: EngineCore) -> None:
    manager = core.block_manager
    manager.check_invariants()
    running = core.scheduler.running
    references = sum(manager.ref_count(b) for b in range(manager.num_blocks))
    assert references == sum(len(r.block_table) for r in running), "leaked block reference"
    assert manager.num_used_blocks <= manager.num_blocks
    assert 0.0 <= core.stats().kv_usage <= 1.0
    block_size = core.block_size
    for request in running:
        assert request.status is RequestStatus.RUNNING
        assert len(request.block_table) * block_size >= request.num_computed_tokens
        assert len(set(request.block_table)) == len(request.block_table)
    waiting = [
        request
        for queue in (core.scheduler._resumed, core.scheduler._waiting, core.scheduler._long)
        for request in queue
    ]
    for request in waiting:
        assert request.block_table == [], "a waiting request holds blocks"
        assert request.num_computed_tokens == 0
    if not core.config.laps_enabled:
        # FCFS: running requests are the oldest unfinished ones, in arrival order, and the
        # waiting queue (resumed first) is in arrival order too: nobody overtakes.
        order = [int(r.request_id[1:]) for r in [*running, *waiting]]
        assert order == sorted(order), f"FCFS order broken: {order}"


def _fcfs_bound(workload: Workload, index: int) -> int:
    """Steps within which arrival ``index`` finishes under FCFS: the oldest unfinished request
    is always scheduled first with the full budget and never preempted, so each older request
    holds the head for at most ceil(tokens / budget) + max_tokens steps."""
    total = 0
    for arrival in workload.arrivals[: index + 1]:
        tokens = len(arrival.prompt) + arrival.max_tokens
        total += -(-tokens // workload.budget) + arrival.max_tokens
    return total


def _run(workload: Workload, core: EngineCore, with_aborts: bool) -> dict[str, object]:
    outputs: dict[str, list[int]] = {}
    finish_step: dict[str, int] = {}
    finish_reason: dict[str, str | None] = {}
    pending = list(enumerate(workload.arrivals))
    aborts = sorted(workload.aborts) if with_aborts else []
    now = 0.0
    step = 0
    limit = 50 * (_fcfs_bound(workload, len(workload.arrivals) - 1) + pending[-1][1].step + 5)
    while pending or core.has_unfinished_requests():
        while pending and pending[0][1].step <= step:
            index, arrival = pending.pop(0)
            rid = f"r{index}"
            outputs[rid] = []
            core.add_request(make_request(rid, list(arrival.prompt), arrival.max_tokens))
        while aborts and aborts[0][0] <= step:
            _, index = aborts.pop(0)
            core.abort_request(f"r{index}")
        result = core.step(now)
        now += result.duration_s
        for event in result.events:
            assert event.request_id not in finish_step, "event after the request finished"
            outputs[event.request_id].extend(event.new_token_ids)
            if event.finished:
                finish_step[event.request_id] = step
                finish_reason[event.request_id] = event.finish_reason
        _check_invariants(core)
        step += 1
        assert step < limit, "the engine stopped making progress"
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    return {"outputs": outputs, "finish_step": finish_step, "finish_reason": finish_reason}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_blocks_consistent_and_finish(workload: Workload) -> None:
    run = _run(workload, _core(workload), with_aborts=True)
    reference = _run(workload, _core(workload, num_blocks=4096), with_aborts=False)
    outputs, finish_step, reasons = run["outputs"], run["finish_step"], run["finish_reason"]
    assert isinstance(outputs, dict) and isinstance(finish_step, dict)
    assert isinstance(reasons, dict)
    for index, arrival in enumerate(workload.arrivals):
        rid = f"r{index}"
        assert rid in finish_step, f"{rid} never finished"
        if reasons[rid] == "abort":
            continue
        assert reasons[rid] == "length"
        assert outputs[rid] == reference["outputs"][rid]  # type: ignore[index]
        assert len(outputs[rid]) == arrival.max_tokens
        if workload.laps_threshold == 0:
            waited = finish_step[rid] - arrival.step
            assert waited <= _fcfs_bound(workload, index), f"{rid} starved"
