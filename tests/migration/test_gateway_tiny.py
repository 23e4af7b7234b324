"""Issue 11's must-show with the ``tiny`` executor (a real numpy transformer, real K/V
blocks over gRPC): through the real gateway, a streamed request moved at random points —
several moves in a row, back to the first replica too — reaches the client token-identical
to the same request served unmigrated, every token once, in order, one ``[DONE]``, no
error. Ordered the way an operator does it: ``POST /admin/requests/{id}/migrate``.

And token replay (the path of engines that cannot export KV, and of a replica dying
mid-stream) on the reference engine: the serving replica is killed; the gateway re-issues
the request on a survivor with the text generated so far (chat: a partial assistant message
with ``continue_final_message``), and the stream is still token-identical; the replayed
request can then be live-migrated on.

Token replay re-encodes the generated *text*. The tiny model has random weights and emits
arbitrary bytes, most of them not valid UTF-8 (they reach the client as U+FFFD and cannot be
re-encoded), so the replay tests kill the replica inside the answer's leading run of ASCII
tokens, where text and tokens are the same; live migration carries token ids and has no
such limit.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from migration.stitch import MIGRATED_EVENT
from proto.tokenize import BYTE_TOKENIZER
from router.gateway import Gateway
from tests.fleet import gateway_fleet, wait_until
from tests.migration.fleet import reference_tokens
from tests.sse import StreamAnswer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ENGINES = ("engine-0", "engine-1", "engine-2")
SPEEDUP = 0.1  # the tiny model's ~0.3 ms steps, slowed to ~3 ms: time to order moves
# Greedy answers of 120+ tokens from the tiny model; each starts with a run of ASCII tokens
# (the replay tests kill the replica inside it, see the module docstring).
COMPLETION_PROMPT = "Once upon a time, in a fleet of replicas far away, "  # 23 ASCII tokens
# (this one 18)
CHAT_MESSAGES = [{"role": "user", "content": "!!! replica !!! replica gamma ### upon fleet"}]
MAX_TOKENS = 200


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    body: dict[str, Any]
    prompt_ids: list[int]

    def expected(self) -> tuple[str, int]:
        """The unmigrated answer (text, tokens), from an engine core of our own."""
        tokens = reference_tokens(self.prompt_ids, MAX_TOKENS, 0.0, "reference")
        decoder = BYTE_TOKENIZER.decoder()
        return "".join(decoder.step(t) for t in tokens), len(tokens)


COMPLETION = Kind("completion", "/v1/completions",
                  {"prompt": COMPLETION_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
                  BYTE_TOKENIZER.encode(COMPLETION_PROMPT))
CHAT = Kind("chat", "/v1/chat/completions",
            {"messages": CHAT_MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0},
            BYTE_TOKENIZER.encode_chat(CHAT_MESSAGES).tolist())
KINDS = {k.name: k for k in (COMPLETION, CHAT)}


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    with gateway_fleet(redis_url, namespace, len(ENGINES), speedup=SPEEDUP,
                       executor="tiny", policy="round_robin", ready_timeout_s=60) as fleet:
        fleet["agents"] = {i: r.migration for i, r in fleet["gateway"].records.items()}
        yield fleet


@pytest.fixture
def fleet3(fleet: dict[str, Any]) -> dict[str, Any]:
    """The module's fleet with every replica running (a replay test kills one)."""
    for engine in fleet["supervisor"].engines:
        if not engine.alive():
            _revive(fleet, engine.spec.instance_id)
    return fleet


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple[str, int]]:
    return {name: kind.expected() for name, kind in KINDS.items()}


async def _stream(url: str, kind: Kind, answer: StreamAnswer, started: asyncio.Event) -> None:
    body = {**kind.body, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=60) as client, client.stream(
            "POST", url + kind.path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        answer.serving = response.headers["x-llmfleet-instance"]
        answer.request_id = response.headers["x-request-id"]
        started.set()
        async for data in response.aiter_raw():
            answer.absorb(data)
    assert answer.raw == b"", answer.raw  # the stream ended on an event boundary


def _check(answer: StreamAnswer, kind: Kind, expected: tuple[str, int]) -> None:
    text, count = expected
    assert not answer.errors, answer.errors
    assert MIGRATED_EVENT not in answer.text
    assert answer.done == 1
    assert answer.text == text, (len(answer.text), len(text))
    assert (answer.prompt_tokens, answer.completion_tokens) == (len(kind.prompt_ids), count)


async def _wait_chunks(answer: StreamAnswer, task: asyncio.Task[None], chunks: int) -> bool:
    """Until the client has ``chunks`` text chunks; False if the stream ended first."""
    while answer.chunks < chunks:
        if task.done():
            return False
        await asyncio.sleep(0.002)
    return not task.done()


async def _move(client: httpx.AsyncClient, gateway: Gateway, answer: StreamAnswer,
                task: asyncio.Task[None], target: str) -> str:
    """Order a live migration through the admin API; its final state. After a commit, wait
    until the gateway relays the stream from ``target`` (the next move starts there)."""
    state = "not_migratable"
    for _ in range(100):
        r = await client.post(f"/admin/requests/{answer.request_id}/migrate",
                              json={"target": target})
        if r.status_code == 404 or task.done():  # the request finished meanwhile
            return "finished"
        assert r.status_code == 200, r.text
        state = r.json()["result"]["state"]
        # Right after a move the request is briefly not decoding (its first step on the
        # new replica): try again.
        if state != "not_migratable":
            break
        await asyncio.sleep(0.01)
    if state == "committed":
        deadline = time.monotonic() + 10
        while not task.done() and time.monotonic() < deadline:
            ctx = gateway.streams.get(answer.request_id)
            if ctx is None or ctx.instance_id == target:
                break
            await asyncio.sleep(0.002)
    return state


async def _stream_with_moves(
    fleet: dict[str, Any], kind: Kind, plan: list[tuple[int, int]],
) -> tuple[StreamAnswer, list[tuple[str, str, str]]]:
    """Stream ``kind``; for each (after, hop) of ``plan``, once ``after`` more text chunks
    reached the client, move the request ``hop`` replicas on (in ``ENGINES`` order) from
    where it runs. Returns the answer and the moves (from, to, state)."""
    gateway: Gateway = fleet["gateway"]
    answer, started = StreamAnswer(), asyncio.Event()
    task = asyncio.create_task(_stream(fleet["url"], kind, answer, started))
    moves: list[tuple[str, str, str]] = []
    async with httpx.AsyncClient(base_url=fleet["url"], timeout=30) as client:
        await asyncio.wait({task, asyncio.ensure_future(started.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        location = answer.serving
        for after, hop in plan:
            if not await _wait_chunks(answer, task, answer.chunks + after):
                break
            target = ENGINES[(ENGINES.index(location) + hop) % len(ENGINES)]
            state = await _move(client, gateway, answer, task, target)
            moves.append((location, target, state))
            if state == "committed":
                location = target
        await task
    return answer, moves


PLAN = st.lists(st.tuples(st.integers(1, 30), st.integers(1, len(ENGINES) - 1)),
                min_size=2, max_size=4)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=PLAN)
@example(plan=[(3, 1), (10, 1), (10, 1)])  # round the ring: back where it started
@example(plan=[(1, 1), (1, 2)])  # there and straight back
def test_moved_stream_is_token_identical_through_the_gateway(
    fleet3: dict[str, Any], expected: dict[str, tuple[str, int]], kind: str,
    plan: list[tuple[int, int]],
) -> None:
    answer, moves = asyncio.run(_stream_with_moves(fleet3, KINDS[kind], plan))
    _check(answer, KINDS[kind], expected[kind])
    committed = [m for m in moves if m[2] == "committed"]
    # The first move is ordered early in a 120+ token answer: it must happen.
    assert moves and moves[0][2] == "committed", moves
    assert all(state in ("committed", "finished") for _, _, state in moves), moves
    if len(committed) == len(plan) and sum(hop for _, hop in plan) % len(ENGINES) == 0:
        assert committed[-1][1] == answer.serving  # it came back to the first replica


def _ascii_lead(kind: Kind) -> int:
    """How many characters the unmigrated answer starts with that are ASCII tokens."""
    tokens = reference_tokens(kind.prompt_ids, MAX_TOKENS, 0.0, "reference")
    return next((i for i, t in enumerate(tokens) if t >= 128), len(tokens))


def _revive(fleet: dict[str, Any], instance_id: str) -> None:
    """Start a killed replica again and wait until the gateway sees its new agent."""
    gateway: Gateway = fleet["gateway"]
    engine = next(e for e in fleet["supervisor"].engines if e.spec.instance_id == instance_id)
    old_agent = fleet["agents"][instance_id]
    engine.start()
    engine.wait_healthy(60)

    def back() -> bool:
        record = gateway.records.get(instance_id)
        view = next((v for v in gateway.snapshot.instances if v.instance_id == instance_id),
                    None)
        return (record is not None and bool(record.migration)
                and record.migration != old_agent and view is not None and view.healthy)

    wait_until(back, timeout_s=30)
    fleet["agents"][instance_id] = gateway.records[instance_id].migration


async def _stream_with_kill(
    fleet: dict[str, Any], kind: Kind, kill_after: int, kill_before: int,
) -> tuple[StreamAnswer, str, str, list[tuple[str, str, str]]] | None:
    """Stream ``kind``; after ``kill_after`` text chunks, kill the serving replica (stopped
    first, so that what it sent has reached the client: the replay point is known); the
    gateway replays the request on a survivor; then live-migrate it to the third replica
    and back. Returns the answer, the victim, the text before the kill, and the moves; None
    (the replica resumed, nothing killed) if it had sent ``kill_before`` characters or more
    by the time it stopped (a slow client)."""
    gateway: Gateway = fleet["gateway"]
    engines = {e.spec.instance_id: e for e in fleet["supervisor"].engines}
    answer, started = StreamAnswer(), asyncio.Event()
    task = asyncio.create_task(_stream(fleet["url"], kind, answer, started))
    await asyncio.wait({task, asyncio.ensure_future(started.wait())},
                       return_when=asyncio.FIRST_COMPLETED)
    victim = answer.serving
    assert await _wait_chunks(answer, task, kill_after)
    proc = engines[victim].proc
    proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(0.3)
    before_kill = answer.text
    if len(before_kill) >= kill_before:
        proc.send_signal(signal.SIGCONT)
        await task
        return None
    proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait)
    moves: list[tuple[str, str, str]] = []
    async with httpx.AsyncClient(base_url=fleet["url"], timeout=30) as client:
        # Where the replay runs (the gateway switched the stream there).
        location = victim
        while not task.done() and location == victim:
            ctx = gateway.streams.get(answer.request_id)
            location = ctx.instance_id if ctx is not None else victim
            await asyncio.sleep(0.002)
        first = location
        for target in [next(i for i in ENGINES if i not in (victim, first)), first]:
            if not await _wait_chunks(answer, task, answer.chunks + 5):
                break
            state = await _move(client, gateway, answer, task, target)
            moves.append((location, target, state))
            if state == "committed":
                location = target
        await task
    return answer, victim, before_kill, moves


@pytest.mark.parametrize(("kind", "kill_after"), [("completion", 5), ("chat", 3)])
def test_token_replay_after_a_replica_dies_is_token_identical(
    fleet3: dict[str, Any], expected: dict[str, tuple[str, int]], kind: str, kill_after: int,
) -> None:
    gateway: Gateway = fleet3["gateway"]
    resumer = gateway.relay.resumer
    assert resumer is not None
    replays = resumer.resumed["replay"]  # type: ignore[attr-defined]
    # The replay point must be inside the answer's ASCII lead (module docstring): a try
    # whose replica had sent more by the time it stopped is let finish, and tried again.
    lead = _ascii_lead(KINDS[kind])
    for _ in range(3):
        killed = asyncio.run(_stream_with_kill(fleet3, KINDS[kind], kill_after, lead - 1))
        if killed is not None:
            break
    assert killed is not None, "the replica never stopped inside the answer's ASCII lead"
    answer, victim, before_kill, moves = killed
    assert kill_after <= len(before_kill) < lead - 1, before_kill
    assert resumer.resumed["replay"] == replays + 1  # type: ignore[attr-defined]
    # The usage too: the gateway gives the replayed text back to the completion count.
    _check(answer, KINDS[kind], expected[kind])
    assert [state for _, _, state in moves] == ["committed", "committed"], moves
    assert moves[1][1] == moves[0][0]  # back to the replica the replay ran on
    assert victim not in {replica for move in moves for replica in move[:2]}
