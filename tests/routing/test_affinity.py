"""DualMap keeps a conversation's turns on the replica of the turn before (docs/routing.md,
"Follow-up affinity"): short keys that grow only past hot splits, and the continuity
candidate found through ``LastHolderIndex``.

``make test`` runs this file on both kernel paths (compiled, and ``LLMFLEET_PURE_PYTHON=1``);
``test_both_kernel_paths_route_the_conversations_alike`` also compares them in one run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proto.kv_events import KVEvent
from router.policy.cache_view import LastHolderIndex
from router.policy.dualmap import DualMapPolicy
from router.policy.interfaces import ClusterSnapshot, Decision, InstanceView
from tests.routing.util import ids, request, snapshot, tokens

# DualMap's keys before this work (two 512-token blocks, 128-token hot steps), no continuity.
BEFORE: dict[str, Any] = {"key_blocks": 2, "key_block_size": 512, "max_key_blocks": 16,
                          "hot_step": 128, "continuity": False}
INSTANCES = 8
FIRST_TOKEN_AFTER = 4  # dispatches until a request's first token (light load)
FINISH_AFTER = 8


@dataclass
class Conversation:
    prompt: np.ndarray
    turns: int
    decisions: list[Decision] = field(default_factory=list)


def _conversations(seed: int, count: int) -> tuple[list[Conversation], list[int]]:
    """``count`` conversations behind one 24-token chat header (so the header's key turns
    hot and is lengthened while they run), first prompts of ~50 tokens, and the arrival
    order of their turns (staggered starts, turns in order)."""
    rng = np.random.default_rng(seed)
    header = tokens(rng, 24)
    convs = [Conversation(np.concatenate([header, tokens(rng, int(rng.integers(20, 40)))]),
                          turns=int(rng.integers(3, 9))) for _ in range(count)]
    events = []
    for index, conv in enumerate(convs):
        start = rng.uniform(0, 1000)
        for turn in range(conv.turns):
            events.append((start + turn * rng.uniform(5, 40), index))
    return convs, [index for _, index in sorted(events)]


def _run(policy: DualMapPolicy, convs: list[Conversation], order: list[int], seed: int,
         snap: ClusterSnapshot | None = None) -> None:
    """Every turn adds an answer and a user message (~150-600 tokens) to the prompt; each
    request gets its first token and finishes a few dispatches later."""
    rng = np.random.default_rng(seed)
    snap = snap or snapshot(INSTANCES)
    dispatched: list[tuple[str, Decision]] = []
    for seq, index in enumerate(order):
        conv = convs[index]
        if conv.decisions:
            conv.prompt = np.concatenate([conv.prompt, tokens(rng, int(rng.integers(150, 600)))])
        req = request(f"r{seq}", conv.prompt)
        decision = policy.route(req, snap, float(seq))
        policy.on_dispatched(req, decision, float(seq))
        conv.decisions.append(decision)
        dispatched.append((req.request_id, decision))
        if seq >= FIRST_TOKEN_AFTER:
            rid, old = dispatched[seq - FIRST_TOKEN_AFTER]
            policy.on_first_token(rid, old.instance_id, old.predicted_ttft_s or 0.0, None,
                                  float(seq))
        if seq >= FINISH_AFTER:
            rid, old = dispatched[seq - FINISH_AFTER]
            policy.on_finished(rid, old.instance_id, float(seq))


def _moves(convs: list[Conversation]) -> int:
    return sum(a.instance_id != b.instance_id
               for c in convs for a, b in zip(c.decisions, c.decisions[1:], strict=False))


def _grow(rng: np.random.Generator, prompt: np.ndarray, target: int) -> np.ndarray:
    return np.concatenate([prompt, tokens(rng, target - len(prompt))])


def test_a_conversation_growing_from_50_to_3000_tokens_keeps_its_home() -> None:
    rng = np.random.default_rng(3)
    lengths = [50, 120, 300, 511, 513, 700, 1023, 1025, 1600, 2200, 3000]
    for params, expect_moves in (({}, False), (BEFORE, True)):
        policy = DualMapPolicy(**params)
        snap = snapshot(INSTANCES)
        prompt = tokens(rng, lengths[0])
        where = []
        for turn, length in enumerate(lengths):
            prompt = _grow(rng, prompt, length)
            req = request(f"t{turn}", prompt)
            decision = policy.route(req, snap, float(turn))
            policy.on_dispatched(req, decision, float(turn))
            policy.on_finished(req.request_id, decision.instance_id, float(turn))
            where.append(decision.instance_id)
        if expect_moves:  # the old keys change at every turn under 1,024 tokens
            assert len(set(where)) > 1, where
        else:
            assert set(where) == {where[0]}, where


def test_many_short_conversations_keep_their_replica_and_spread() -> None:
    convs, order = _conversations(seed=5, count=200)
    policy = DualMapPolicy()
    _run(policy, convs, order, seed=6)
    firsts = [c.decisions[0].instance_id for c in convs]
    assert set(firsts) == set(ids(INSTANCES))
    counts = np.array([firsts.count(i) for i in ids(INSTANCES)])
    # All first turns behind the header collide until its key turns hot (16 requests).
    assert counts.max() <= 2.5 * counts.mean(), counts
    assert _moves(convs) == 0
    # The header's key was lengthened just past the point where conversations differ.
    assert policy.rings.keys.detector.hot
    # Before this work most follow-ups moved: their keys changed with every turn.
    before_convs, before_order = _conversations(seed=5, count=200)
    _run(DualMapPolicy(**BEFORE), before_convs, before_order, seed=6)
    followups = sum(c.turns - 1 for c in convs)
    assert _moves(before_convs) > followups // 3


def _backlogged(base: ClusterSnapshot, backlog: dict[str, int]) -> ClusterSnapshot:
    return ClusterSnapshot(base.epoch + 1, tuple(
        InstanceView(v.instance_id, waiting_prefill_tokens=backlog.get(v.instance_id, 0))
        for v in base.instances))


def test_a_hotspot_moves_the_conversation_with_a_reason_and_it_stays_there() -> None:
    rng = np.random.default_rng(7)
    policy = DualMapPolicy(slo_ttft_s=1.0, prefill_s_per_token=1e-4)
    snap = snapshot(INSTANCES)
    prompt = tokens(rng, 400)
    decisions = []
    for turn in range(2):
        prompt = _grow(rng, prompt, 400 + 600 * turn)
        req = request(f"a{turn}", prompt)
        decisions.append(policy.route(req, snap, 0.0))
        policy.on_dispatched(req, decisions[-1], 0.0)
        policy.on_finished(req.request_id, decisions[-1].instance_id, 0.0)
    home = decisions[0].instance_id
    assert decisions[1].instance_id == home
    # The home's queue alone predicts 0.8 s, past the 0.5 s bound: the turn leaves, and says so.
    hot = _backlogged(snap, {home: 8000})
    prompt = _grow(rng, prompt, 1500)
    req = request("a2", prompt)
    moved = policy.route(req, hot, 1.0)
    policy.on_dispatched(req, moved, 1.0)
    policy.on_finished(req.request_id, moved.instance_id, 1.0)
    assert moved.instance_id != home
    assert moved.reason in ("slo_fallback", "load")
    # The hotspot persists: the next turn stays where the last one went (its cache is there).
    prompt = _grow(rng, prompt, 1900)
    after = policy.route(request("a3", prompt), hot, 2.0)
    assert after.instance_id == moved.instance_id
    assert after.reason in ("affinity", "continuity")
    assert after.cached_tokens_estimate == 1488  # the previous prompt's whole blocks


def test_a_turn_that_cannot_return_to_its_previous_replica_says_why() -> None:
    rng = np.random.default_rng(9)
    policy = DualMapPolicy(slo_ttft_s=1.0, prefill_s_per_token=1e-4)
    snap = snapshot(INSTANCES)
    prompt = tokens(rng, 800)
    first = policy.route(request("b0", prompt), snap, 0.0)
    policy.on_dispatched(request("b0", prompt), first, 0.0)
    policy.on_finished("b0", first.instance_id, 0.0)
    home = first.instance_id
    hot = _backlogged(snap, dict.fromkeys(first.candidates, 8000))  # both homes busy
    prompt = _grow(rng, prompt, 1500)
    moved = policy.route(request("b1", prompt), hot, 1.0)
    assert moved.reason == "load"
    policy.on_dispatched(request("b1", prompt), moved, 1.0)
    policy.on_finished("b1", moved.instance_id, 1.0)
    away = moved.instance_id
    assert away != home and away not in first.candidates
    prompt = _grow(rng, prompt, 1800)
    # The replica that served the last turn drains: the turn goes home and says why.
    drained = ClusterSnapshot(snap.epoch + 2, tuple(
        InstanceView(v.instance_id, draining=v.instance_id == away) for v in snap.instances))
    back = policy.route(request("b2", prompt), drained, 2.0)
    assert back.instance_id in first.candidates
    assert back.reason == "holder_unroutable"
    # Its cache evicted there (KV events say all blocks were cleared): the same, for that.
    policy.apply_kv_events(away, [KVEvent("AllBlocksCleared")])
    back = policy.route(request("b2", prompt), snap, 2.0)
    assert (back.instance_id, back.reason) == (home, "holder_evicted")


def test_a_shared_system_prompt_alone_does_not_pull_new_conversations() -> None:
    """The continuity candidate must hold more than the key: a new conversation whose only
    cached prefix is a system prompt goes to its own homes, not to the last holder."""
    rng = np.random.default_rng(8)
    system = tokens(rng, 2048)
    policy = DualMapPolicy()
    snap = snapshot(INSTANCES)
    firsts = []
    for k in range(64):
        prompt = np.concatenate([system, tokens(rng, 300)])
        decision = policy.route(request(f"n{k}", prompt), snap, float(k))
        policy.on_dispatched(request(f"n{k}", prompt), decision, float(k))
        policy.on_finished(f"n{k}", decision.instance_id, float(k))
        assert decision.reason == "affinity"
        firsts.append(decision.instance_id)
    assert len(set(firsts[32:])) >= INSTANCES // 2  # spread once the prefix is hot


def _decisions_digest(params: dict[str, Any]) -> str:
    convs, order = _conversations(seed=11, count=80)
    policy = DualMapPolicy(**{"slo_ttft_s": 1.0, "prefill_s_per_token": 1e-4, **params})
    base = snapshot(INSTANCES)
    # Load that moves some turns: queues on three instances (SLO and load fallbacks).
    _run(policy, convs, order, seed=12,
         snap=_backlogged(base, {"i00": 40_000, "i03": 4_000, "i05": 4_600}))
    digest = hashlib.sha256()
    for conv in convs:
        for d in conv.decisions:
            digest.update(repr((d.instance_id, d.reason, d.candidates,
                                d.cached_tokens_estimate)).encode())
    return digest.hexdigest()


def test_decisions_are_the_same_from_two_policy_instances() -> None:
    first, second = _decisions_digest({}), _decisions_digest({})
    assert first == second
    assert first != _decisions_digest(BEFORE)


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("router.policy._fastpath") is None,
                    reason="the C extension is not built here: no second path to compare")
def test_both_kernel_paths_route_the_conversations_alike() -> None:
    code = "from tests.routing.test_affinity import _decisions_digest as d; print(d({}))"
    outs = []
    for pure in ("0", "1"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFLEET_PURE_PYTHON": pure}
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              capture_output=True, timeout=180, check=True)
        outs.append(proc.stdout.strip())
    assert len(outs[0]) == 64 and outs[0] == outs[1]


def test_last_holder_index_finds_the_deepest_routed_prefix() -> None:
    index = LastHolderIndex(capacity=64, grid_blocks=1, dense_blocks=0)
    prompt = np.arange(1, 21, dtype=np.uint64)  # prefix hashes of a 20-block prompt
    index.record(prompt[:12], "a")
    index.record(prompt[:5], "b")  # a later prompt through the first 5 blocks
    assert index.deepest(prompt) == ("a", 12)
    assert index.deepest(prompt[:4]) == ("b", 4)
    assert index.deepest(prompt.tobytes(), 11) == ("a", 12)
    assert index.deepest(prompt, 12) == (None, 0)  # nothing deeper than what is known
    assert index.deepest(np.array([99], dtype=np.uint64)) == (None, 0)
    # Generations: 32 new hashes make the newer dict the older; 32 more drop it.
    index.record(np.arange(100, 132, dtype=np.uint64), "c")
    assert index.deepest(prompt) == ("a", 12)
    index.record(np.arange(200, 232, dtype=np.uint64), "d")
    assert index.deepest(prompt) == (None, 0)
    assert len(index) == 32
    with pytest.raises(ValueError):
        LastHolderIndex(1)


def test_last_holder_index_on_a_grid_answers_to_within_a_step() -> None:
    index = LastHolderIndex(grid_blocks=4, dense_blocks=2)  # grid: 1, 2, 6, 10, 14, ...
    prompt = np.arange(1, 41, dtype=np.uint64)
    index.record(prompt[:13], "a")
    assert len(index) == 4
    assert index.deepest(prompt) == ("a", 10)
    assert index.deepest(prompt[:1]) == ("a", 1)
    assert index.deepest(prompt[:5]) == ("a", 2)  # under one grid step past the dense part
    index.record(prompt[:9], "b")
    assert index.deepest(prompt) == ("a", 10)
    assert index.deepest(prompt[:9]) == ("b", 6)
    index.record(prompt[:30], "c", from_block=13)  # c held the first 13 blocks already
    assert index.deepest(prompt) == ("c", 30)
    assert index.deepest(prompt[:13]) == ("a", 10)  # left as it was
    assert index.deepest(prompt, 25) == ("c", 30)
    assert index.deepest(prompt, 30) == (None, 0)
