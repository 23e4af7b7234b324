"""In-process replicas for the migration tests: a real engine core (tiny or emulated
executor) stepped in real time by an ``AsyncEngine``, with its ``MigrationAgent`` serving
real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from instances.async_engine import AsyncEngine, MigratedEvent
from instances.engine.factory import build_engine_core
from instances.engine.types import SamplingParams, TokenEvent
from instances.migration_adapter import EngineMigrationHandle
from migration.agent import Faults, MigrationAgent
from migration.coordinator import locate_request
from migration.transport import ChannelPool
from tests.engine.drive import make_request, run_until_idle


class ReplicaDied(ConnectionError):
    """The replica serving a stream went away (its connection broke)."""


@dataclass
class Replica:
    name: str
    engine: AsyncEngine
    agent: MigrationAgent
    handle: EngineMigrationHandle
    dead: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return self.agent.address

    async def kill(self) -> None:
        """Die: stop serving gRPC and stepping; open streams break."""
        self.dead.set()
        await self.agent.stop(grace=0)
        await self.engine.stop()

    def assert_no_leaks(self) -> None:
        core = self.engine.core
        assert core.num_pinned_blocks == 0, f"{self.name}: pinned blocks left"
        assert core.num_reserved_blocks() == 0, f"{self.name}: reserved blocks left"
        assert self.agent.num_open_migrations == 0, f"{self.name}: open migrations left"
        stats = core.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0, f"{self.name}: requests left"
        assert stats.free_blocks == stats.total_blocks, f"{self.name}: blocks in use"
        core.block_manager.check_invariants()


async def start_replica(
    name: str, executor: str = "tiny", speedup: float = 0.1, ttl_s: float = 10.0,
    faults: Faults | None = None, **config: Any,
) -> Replica:
    core = build_engine_core(executor, **config)
    engine = AsyncEngine(core, speedup=speedup)
    engine.start()
    handle = EngineMigrationHandle(engine, name, f"http://{name}.invalid", orphan_timeout_s=5.0)
    agent = MigrationAgent(handle, default_ttl_s=ttl_s, sweep_interval_s=0.05, faults=faults)
    await agent.start("127.0.0.1", 0)
    return Replica(name, engine, agent, handle)


async def stop_replicas(replicas: Sequence[Replica]) -> None:
    for replica in replicas:
        if not replica.dead.is_set():
            await replica.agent.stop(grace=0)
            await replica.engine.stop()


def reference_tokens(
    prompt: list[int], max_tokens: int, temperature: float, request_id: str,
    executor: str = "tiny",
) -> list[int]:
    """What the request produces unmigrated (engine seed 0, virtual time)."""
    core = build_engine_core(executor)
    log = run_until_idle(core, [make_request(request_id, prompt, max_tokens, temperature)])
    return log.outputs[request_id]


async def _next_or_dead(
    events: AsyncGenerator[TokenEvent, None], replica: Replica
) -> TokenEvent:
    nxt = asyncio.ensure_future(events.__anext__())
    dead = asyncio.ensure_future(replica.dead.wait())
    done, _ = await asyncio.wait({nxt, dead}, return_when=asyncio.FIRST_COMPLETED)
    if nxt in done:
        dead.cancel()
        return nxt.result()
    nxt.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await nxt
    raise ReplicaDied(replica.name)


@dataclass
class ClientLog:
    tokens: list[int] = field(default_factory=list)
    hops: list[str] = field(default_factory=list)  # replicas that served the stream, in order
    finish_reason: str | None = None
    recovered: int = 0  # times the client had to find the request after a replica died


async def follow(
    replicas: dict[str, Replica], first: str, request_id: str, prompt: list[int],
    params: SamplingParams, pool: ChannelPool, progress: asyncio.Queue[int] | None = None,
) -> ClientLog:
    """A client that follows the request wherever it moves (what the gateway's stitcher
    does), collecting every token exactly once."""
    log = ClientLog(hops=[first])
    current = replicas[first]
    events: AsyncGenerator[TokenEvent, None] = current.engine.generate(
        request_id, prompt, params, migratable=True)
    while True:
        try:
            event = await _next_or_dead(events, current)
        except ReplicaDied:
            alive = [r.address for r in replicas.values() if not r.dead.is_set()]
            found = await locate_request(request_id, alive, pool)
            assert found is not None, "the request vanished with its replica"
            current = next(r for r in replicas.values() if r.address == found[0])
            continuation = current.engine.attach(request_id)
            assert continuation.output_token_ids[: len(log.tokens)] == log.tokens
            log.tokens.extend(continuation.output_token_ids[len(log.tokens):])
            events = continuation.events
            log.hops.append(current.name)
            log.recovered += 1
            continue
        if event.finish_reason == "migrated":
            assert isinstance(event, MigratedEvent)
            target = event.target
            assert target is not None
            assert target.num_output_tokens == len(log.tokens), "tokens lost before the move"
            await events.aclose()
            current = replicas[target.instance_id]
            continuation = current.engine.attach(request_id)
            assert continuation.output_token_ids == log.tokens, "stream not continuous"
            events = continuation.events
            log.hops.append(current.name)
            continue
        log.tokens.extend(event.new_token_ids)
        if progress is not None and event.new_token_ids:
            progress.put_nowait(len(log.tokens))
        if event.finished:
            log.finish_reason = event.finish_reason
            return log


async def start_replicas_named(names: Sequence[str], **kwargs: Any) -> dict[str, Replica]:
    replicas = {name: await start_replica(name, **kwargs) for name in names}
    await connect_all(replicas.values())
    return replicas


async def connect_all(replicas: Iterable[Replica], pool: ChannelPool | None = None) -> None:
    """Open every agent-to-agent channel (and the test's own) before measuring anything."""
    replicas = list(replicas)
    addresses = [r.address for r in replicas]
    for replica in replicas:
        await replica.agent.connect([a for a in addresses if a != replica.address])
    if pool is not None:
        for address in addresses:
            await locate_request("", [address], pool)
