"""Fault injection in every phase of a live migration (real gRPC on 127.0.0.1, tiny
executor): whatever fails, the request completes exactly once with the tokens it would
have produced unmigrated, the client's stream is whole, and no KV block leaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from instances.engine.types import SamplingParams
from migration.agent import Faults
from migration.coordinator import LinkModel, MigrationConfig, MigrationCoordinator
from migration.transport import ChannelPool
from tests.migration.fleet import (
    ClientLog,
    Replica,
    connect_all,
    follow,
    reference_tokens,
    start_replica,
    stop_replicas,
)

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(28, 100))  # 4 full blocks; greedy output runs 200+ tokens
TINY_BLOCK_BYTES = 32 * 1024  # one tiny-executor block per gRPC message: many messages


class Fleet:
    def __init__(self, replicas: dict[str, Replica]) -> None:
        self.replicas = replicas
        self.pool = ChannelPool()

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    def start_client(self, request_id: str, max_tokens: int,
                     progress: asyncio.Queue[int] | None = None) -> asyncio.Task[ClientLog]:
        params = SamplingParams(max_tokens=max_tokens)
        return asyncio.create_task(follow(self.replicas, "a", request_id, PROMPT, params,
                                          self.pool, progress))

    async def wait_for_tokens(self, progress: asyncio.Queue[int], count: int) -> None:
        while await progress.get() < count:
            pass

    def coordinator(self, **config: object) -> MigrationCoordinator:
        return MigrationCoordinator(MigrationConfig(**config), self.pool)  # type: ignore[arg-type]


async def _fleet(ttl_s: float = 0.3, **faults: Faults) -> Fleet:
    replicas = {}
    for name in ("a", "b"):
        replicas[name] = await start_replica(name, ttl_s=ttl_s, faults=faults.get(name))
    fleet = Fleet(replicas)
    await connect_all(replicas.values(), fleet.pool)
    return fleet


@pytest.fixture
async def make_fleet() -> AsyncIterator[Callable[..., object]]:
    made: list[Fleet] = []

    async def make(ttl_s: float = 0.3, **faults: Faults) -> Fleet:
        fleet = await _fleet(ttl_s, **faults)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await stop_replicas(list(fleet.replicas.values()))
        await fleet.pool.close()


async def _settle(*replicas: Replica, seconds: float = 0.5) -> None:
    """Wait past the reservation leases (0.3 s), then check nothing leaked."""
    await asyncio.sleep(seconds)
    for replica in replicas:
        replica.assert_no_leaks()


async def test_destination_refuses_the_reservation(make_fleet: Callable[..., object]) -> None:
    fleet: Fleet = await make_fleet()  # type: ignore[misc]
    destination = fleet["b"].engine.core
    hog = destination.block_manager.num_free_blocks - 2
    assert destination.reserve_blocks("hog", hog)
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 2)
    result = await fleet.coordinator(last_stage_max_blocks=0).migrate(
        "r", fleet["a"].address, fleet["b"].address)
    assert result.status == "refused" and result.reason == "out_of_blocks"
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r") and log.hops == ["a"]
    destination.release_reservation("hog")
    await _settle(fleet["a"], fleet["b"])


async def test_destination_out_of_blocks_in_the_stop_and_copy(
    make_fleet: Callable[..., object],
) -> None:
    fleet: Fleet = await make_fleet()  # type: ignore[misc]
    destination = fleet["b"].engine.core
    assert destination.reserve_blocks("hog", destination.block_manager.num_free_blocks - 2)
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 2)
    result = await fleet.coordinator(max_stages=0).migrate(
        "r", fleet["a"].address, fleet["b"].address)
    assert result.status == "aborted" and result.reason == "out_of_blocks"
    assert result.stopped_s > 0  # it was stopped, and resumed on the source
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r") and log.hops == ["a"]
    destination.release_reservation("hog")
    await _settle(fleet["a"], fleet["b"])


@pytest.mark.parametrize("max_stages", [0, 2])
async def test_destination_dies_during_the_copy(
    make_fleet: Callable[..., object], max_stages: int,
) -> None:
    holder: dict[str, Fleet] = {}

    async def kill_destination(request_id: str, block: int) -> None:
        if block == 2:
            await holder["fleet"]["b"].kill()

    fleet: Fleet = await make_fleet(a=Faults(on_push_batch=kill_destination))  # type: ignore[misc]
    holder["fleet"] = fleet
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 2)
    result = await fleet.coordinator(
        max_stages=max_stages, last_stage_max_blocks=0, max_batch_bytes=TINY_BLOCK_BYTES,
        rpc_timeout_s=1.0,
    ).migrate("r", fleet["a"].address, fleet["b"].address)
    assert result.status == "aborted", (result.reason, result)
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r") and log.hops == ["a"]
    # The dead destination let go of everything it held for the migration.
    await _settle(fleet["a"], fleet["b"])


async def test_source_request_finishes_mid_migration(
    make_fleet: Callable[..., object],
) -> None:
    fleet: Fleet = await make_fleet()  # type: ignore[misc]
    client = fleet.start_client("r", 14)
    await asyncio.sleep(0.02)
    # A slow link (100 ms per block): the request finishes during the pre-copy stage.
    result = await fleet.coordinator(
        last_stage_max_blocks=0, max_batch_bytes=TINY_BLOCK_BYTES,
        link=LinkModel(gbytes_per_s=0.01, modelled_bytes_per_block=1_000_000),
    ).migrate("r", fleet["a"].address, fleet["b"].address)
    assert result.status == "not_migratable", result
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 14, 0.0, "r") and log.hops == ["a"]
    await _settle(fleet["a"], fleet["b"])


async def test_source_dies_after_the_commit(make_fleet: Callable[..., object]) -> None:
    holder: dict[str, Fleet] = {}

    async def kill_source(request_id: str) -> None:
        await holder["fleet"]["a"].kill()

    fleet: Fleet = await make_fleet(a=Faults(after_commit=kill_source))  # type: ignore[misc]
    holder["fleet"] = fleet
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 5)
    result = await fleet.coordinator(rpc_timeout_s=1.0).migrate(
        "r", fleet["a"].address, fleet["b"].address)
    # The coordinator lost the source mid-call; the destination has the request.
    assert result.status == "aborted" and result.reason.startswith("source"), result
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r")
    assert log.hops == ["a", "b"] and log.recovered == 1
    await _settle(fleet["a"], fleet["b"])


async def test_coordinator_dies_during_the_precopy(make_fleet: Callable[..., object]) -> None:
    pushing = asyncio.Event()

    async def on_batch(request_id: str, block: int) -> None:
        if block >= 2:
            pushing.set()

    # Leases long enough for a loaded machine to get from the push to the checks below.
    fleet: Fleet = await make_fleet(  # type: ignore[misc]
        ttl_s=1.0, a=Faults(on_push_batch=on_batch))
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 2)
    coordinator = fleet.coordinator(
        last_stage_max_blocks=0, max_batch_bytes=TINY_BLOCK_BYTES, reservation_ttl_s=1.0,
        link=LinkModel(gbytes_per_s=0.01, modelled_bytes_per_block=500_000))
    migration = asyncio.create_task(
        coordinator.migrate("r", fleet["a"].address, fleet["b"].address))
    await pushing.wait()  # the first stage is pushing (50 ms per block)
    await asyncio.sleep(0.01)
    assert fleet["b"].agent.num_open_migrations == 1
    assert fleet["b"].engine.core.num_pinned_blocks > 0
    migration.cancel()
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r") and log.hops == ["a"]
    # The destination's lease ran out: reservation and pinned blocks are gone.
    await _settle(fleet["a"], fleet["b"], seconds=1.3)


async def test_coordinator_dies_during_the_handoff(make_fleet: Callable[..., object]) -> None:
    commit_reached = asyncio.Event()

    async def slow_commit(request_id: str) -> None:
        commit_reached.set()
        await asyncio.sleep(0.1)

    fleet: Fleet = await make_fleet(a=Faults(before_commit=slow_commit))  # type: ignore[misc]
    progress: asyncio.Queue[int] = asyncio.Queue()
    client = fleet.start_client("r", 200, progress)
    await fleet.wait_for_tokens(progress, 3)
    migration = asyncio.create_task(fleet.coordinator().migrate(
        "r", fleet["a"].address, fleet["b"].address))
    await commit_reached.wait()
    migration.cancel()
    # The source finishes the handoff on its own: the request moves, exactly once.
    log = await client
    assert log.tokens == reference_tokens(PROMPT, 200, 0.0, "r") and log.hops == ["a", "b"]
    await _settle(fleet["a"], fleet["b"])


async def test_a_late_commit_after_an_abort_is_refused(
    make_fleet: Callable[..., object],
) -> None:
    """The fence that keeps a request from running twice: once a destination aborted a
    migration (lease expiry or Abort), a Commit for it is refused."""
    from proto import migration_pb2 as pb

    fleet: Fleet = await make_fleet()  # type: ignore[misc]
    stub = fleet.pool.stub(fleet["b"].address)
    reply = await stub.Reserve(pb.ReserveRequest(migration_id="m1", request_id="x",
                                                 num_blocks=3, ttl_s=0.1))
    assert reply.accepted and fleet["b"].engine.core.num_reserved_blocks("m1") == 3
    await asyncio.sleep(0.3)  # the lease runs out
    assert fleet["b"].engine.core.num_reserved_blocks() == 0
    state = pb.RequestState(request_id="x", prompt_token_ids=bytes(4 * 20), max_tokens=4)
    commit = await stub.Commit(pb.CommitRequest(migration_id="m1", state=state))
    assert not commit.committed and commit.reason == "aborted"
    abort = await stub.Abort(pb.AbortRequest(migration_id="m2"))
    assert not abort.known
    commit = await stub.Commit(pb.CommitRequest(migration_id="m2", state=state))
    assert not commit.committed
    assert fleet["b"].engine.core.get_request("x") is None
    await _settle(fleet["a"], fleet["b"])


async def test_client_gone_after_the_move_frees_everything(
    make_fleet: Callable[..., object],
) -> None:
    """A client that hangs up on the continuation, and one that never follows the move
    (its continuation is aborted after the orphan timeout): nothing stays pinned."""
    fleet: Fleet = await make_fleet()  # type: ignore[misc]
    fleet["b"].handle.orphan_timeout_s = 0.2
    params = SamplingParams(max_tokens=200)
    coordinator = fleet.coordinator()
    # 1. follows the move, then hangs up.
    events = fleet["a"].engine.generate("r1", PROMPT, params, migratable=True)
    await events.__anext__()
    result = await coordinator.migrate("r1", fleet["a"].address, fleet["b"].address)
    assert result.committed
    async for event in events:
        if event.finished:
            assert event.finish_reason == "migrated"
    continuation = fleet["b"].engine.attach("r1")
    assert fleet["b"].engine.core.num_pinned_blocks > 0
    async for _ in continuation.events:
        break
    await continuation.events.aclose()
    # 2. never follows.
    events = fleet["a"].engine.generate("r2", PROMPT, params, migratable=True)
    await events.__anext__()
    assert (await coordinator.migrate("r2", fleet["a"].address, fleet["b"].address)).committed
    await events.aclose()
    await _settle(fleet["a"], fleet["b"])
    assert not fleet["b"].engine.has_continuation("r2")
