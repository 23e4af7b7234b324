"""Migration policy: Llumnix freeness rebalancing and draining (pure functions)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from migration.policy import (
    InstanceLoad,
    RunningRequest,
    drain,
    freeness,
    pick_request,
    rebalance,
)


def _requests(instance: str, blocks: list[int]) -> list[RunningRequest]:
    return [RunningRequest(f"{instance}-{i}", instance, b, float(i)) for i, b in enumerate(blocks)]


def test_freeness() -> None:
    assert freeness(30, 10) == 3.0 and freeness(5, 0) == math.inf
    assert InstanceLoad("a", 40, 10, queued_blocks=10).freeness == 3.0


def test_rebalance_moves_from_crowded_to_roomy_and_not_into_a_new_hotspot() -> None:
    loads = [InstanceLoad("hot", 8, 8), InstanceLoad("cold", 400, 2),
             InstanceLoad("warm", 30, 10), InstanceLoad("off", 900, 0, accepts_migrations=False)]
    requests = _requests("hot", [50, 20, 30, 5, 5, 5, 5, 40]) + _requests("cold", [10, 10])
    moves = rebalance(loads, requests)
    assert [(m.request_id, m.source, m.destination) for m in moves] == [("hot-7", "hot", "cold")]
    # "fewest_blocks" takes the cheapest request instead.
    assert rebalance(loads, requests, selection="fewest_blocks")[0].request_id == "hot-6"
    # A destination that would fall below the threshold is not used.
    assert rebalance([InstanceLoad("hot", 0, 4), InstanceLoad("b", 12, 2)],
                     _requests("hot", [10, 10, 10, 10])) == []
    # Requests already migrating are left alone.
    assert rebalance(loads, requests, busy=frozenset({"hot-7"}))[0].request_id == "hot-6"


def test_pick_request_skips_unmovable() -> None:
    reqs = [RunningRequest("a", "x", 5, 1.0), RunningRequest("b", "x", 3, 2.0, migratable=False)]
    assert pick_request(reqs) == reqs[0]
    assert pick_request(reqs[1:]) is None


def test_drain_places_every_movable_request_and_reports_the_rest() -> None:
    loads = [InstanceLoad("d", 10, 4), InstanceLoad("a", 100, 4), InstanceLoad("b", 60, 1)]
    pinned = RunningRequest("pinned", "d", 5, 9.0, migratable=False)
    requests = [*_requests("d", [40, 30, 20]), pinned]
    moves, stuck = drain(["d"], loads, requests)
    placed = {m.request_id: m.destination for m in moves}
    assert set(placed) == {"d-0", "d-1", "d-2"} and all(m.source == "d" for m in moves)
    assert [r.request_id for r in stuck] == ["pinned"]
    for instance in ("a", "b"):  # nobody takes more blocks than it has free
        taken = sum(m.num_blocks for m in moves if m.destination == instance)
        assert taken <= next(load.free_blocks for load in loads if load.instance_id == instance)
    too_big = drain(["d"], loads, _requests("d", [500]))
    assert too_big[0] == [] and [r.request_id for r in too_big[1]] == ["d-0"]


@given(
    frees=st.lists(st.integers(0, 200), min_size=2, max_size=6),
    blocks=st.lists(st.integers(1, 60), max_size=20),
)
def test_rebalance_never_overfills_and_improves_the_minimum(
    frees: list[int], blocks: list[int],
) -> None:
    names = [f"i{k}" for k in range(len(frees))]
    requests = [RunningRequest(f"r{k}", names[k % len(names)], b, float(k))
                for k, b in enumerate(blocks)]
    loads = [InstanceLoad(n, f, sum(1 for r in requests if r.instance_id == n))
             for n, f in zip(names, frees, strict=True)]
    moves = rebalance(loads, requests, max_moves=10)
    free = {load.instance_id: load.free_blocks for load in loads}
    running = {load.instance_id: load.num_running for load in loads}
    sources = [m.source for m in moves]
    assert len(sources) == len(set(sources))
    for move in moves:
        assert free[move.source] < 3 * running[move.source]  # only crowded instances give
        free[move.source] += move.num_blocks
        free[move.destination] -= move.num_blocks
        running[move.source] -= 1
        running[move.destination] += 1
        assert free[move.destination] >= 0
        assert freeness(free[move.destination], running[move.destination]) > 3.0
