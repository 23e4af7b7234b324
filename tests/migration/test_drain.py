"""Draining a replica under steady load (tiny executor, real gRPC): the plan from
``migration.policy.drain`` executed with the coordinator moves every running request off
it; every client still gets exactly its unmigrated tokens; nothing leaks anywhere."""

from __future__ import annotations

import asyncio

import pytest

from instances.engine.types import SamplingParams
from migration.coordinator import MigrationCoordinator
from migration.policy import InstanceLoad, RunningRequest, drain
from migration.transport import ChannelPool
from proto import migration_pb2 as pb
from tests.migration.fleet import (
    ClientLog,
    Replica,
    follow,
    reference_tokens,
    start_replicas_named,
    stop_replicas,
)

pytestmark = pytest.mark.timeout(120)

PROMPT = list(range(28, 100))  # greedy output runs 200+ tokens
MAX_TOKENS = 150


def _loads(replicas: dict[str, Replica]) -> list[InstanceLoad]:
    loads = []
    for name, replica in replicas.items():
        stats = replica.engine.core.stats()
        loads.append(InstanceLoad(name, stats.free_blocks, stats.num_running))
    return loads


def _running(replica: Replica, request_ids: list[str], name: str) -> list[RunningRequest]:
    out = []
    for index, request_id in enumerate(request_ids):
        state = replica.handle.request_state(request_id)
        if state.phase in (pb.REQUEST_PHASE_DECODING, pb.REQUEST_PHASE_PREFILL,
                           pb.REQUEST_PHASE_WAITING):
            out.append(RunningRequest(request_id, name, state.num_full_blocks, float(index),
                                      migratable=True))
    return out


async def test_drain_moves_every_request_off_under_load() -> None:
    replicas = await start_replicas_named(["a", "b", "c", "d"], speedup=0.05)
    pool = ChannelPool()
    coordinator = MigrationCoordinator(pool=pool)
    try:
        expected = reference_tokens(PROMPT, MAX_TOKENS, 0.0, "x")
        params = SamplingParams(max_tokens=MAX_TOKENS)
        names = list(replicas)
        ids = [f"load-{i}" for i in range(12)]
        clients: dict[str, asyncio.Task[ClientLog]] = {
            request_id: asyncio.create_task(
                follow(replicas, names[i % 4], request_id, PROMPT, params, pool))
            for i, request_id in enumerate(ids)}
        await asyncio.sleep(0.3)  # everybody decoding
        on_d = [r for i, r in enumerate(ids) if i % 4 == 3]
        moved: set[str] = set()
        # The control loop's drain: plan, move, re-plan what is left (a request still in
        # its prefill, or one that was just moved elsewhere, waits for the next round).
        for _ in range(40):
            plan, stuck = drain(["d"], _loads(replicas), _running(replicas["d"], on_d, "d"))
            assert stuck == []
            if not plan:
                break
            results = await asyncio.gather(*(
                coordinator.migrate(m.request_id, replicas["d"].address,
                                    replicas[m.destination].address) for m in plan))
            moved |= {m.request_id for m, r in zip(plan, results, strict=True) if r.committed}
            await asyncio.sleep(0.01)
        assert replicas["d"].engine.core.stats().num_running == 0
        assert moved == set(on_d)  # all of them were still running: every one moved
        logs = {request_id: await task for request_id, task in clients.items()}
        for request_id, log in logs.items():
            assert log.tokens == expected, request_id
        assert all(logs[r].hops[0] == "d" and logs[r].hops[-1] != "d" for r in on_d)
        await asyncio.sleep(0.05)
        for replica in replicas.values():
            replica.assert_no_leaks()
    finally:
        await coordinator.close()
        await pool.close()
        await stop_replicas(list(replicas.values()))
