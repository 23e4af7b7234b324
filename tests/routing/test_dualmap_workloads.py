"""DualMap on conversation workloads behind a shared system prompt.

A small closed loop stands in for the fleet: every dispatched request gets its first token
8 dispatches later and finishes 24 dispatches later, so in-flight load is what the policy
balances on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from router.policy.dualmap import DualMapPolicy
from router.policy.interfaces import Decision
from tests.routing.util import ids, request, snapshot, tokens

FIRST_TOKEN_AFTER = 8
FINISH_AFTER = 24


@dataclass
class Conversation:
    prompt: np.ndarray
    turns: int
    decisions: list[Decision] = field(default_factory=list)


def _conversations(rng: np.random.Generator, system: np.ndarray, count: int,
                   first_message: tuple[int, int]) -> list[Conversation]:
    return [Conversation(np.concatenate([system, tokens(rng, int(rng.integers(*first_message)))]),
                         turns=int(rng.integers(1, 5))) for _ in range(count)]


def _schedule(rng: np.random.Generator, convs: list[Conversation]) -> list[int]:
    """Conversation indices in arrival order: staggered starts, turns in order."""
    events = []
    for index, conv in enumerate(convs):
        start = rng.uniform(0, 1000)
        for turn in range(conv.turns):
            events.append((start + turn * rng.uniform(5, 20), index))
    return [index for _, index in sorted(events)]


def _run(policy: DualMapPolicy, convs: list[Conversation], order: list[int],
         rng: np.random.Generator) -> Counter[str]:
    snap = snapshot(8)
    loads: Counter[str] = Counter()
    dispatched: list[tuple[str, Decision]] = []
    for seq, index in enumerate(order):
        conv = convs[index]
        if conv.decisions:  # a later turn: the reply and the next user message
            conv.prompt = np.concatenate([conv.prompt, tokens(rng, int(rng.integers(150, 300)))])
        rid = f"r{seq}"
        req = request(rid, conv.prompt)
        decision = policy.route(req, snap, float(seq))
        policy.on_dispatched(req, decision, float(seq))
        conv.decisions.append(decision)
        loads[decision.instance_id] += 1
        dispatched.append((rid, decision))
        if seq >= FIRST_TOKEN_AFTER:
            old_id, old = dispatched[seq - FIRST_TOKEN_AFTER]
            policy.on_first_token(old_id, old.instance_id, old.predicted_ttft_s or 0.0, None,
                                  float(seq))
        if seq >= FINISH_AFTER:
            old_id, old = dispatched[seq - FINISH_AFTER]
            policy.on_finished(old_id, old.instance_id, float(seq))
    return loads


def _imbalance(loads: Counter[str]) -> float:
    counts = np.array([loads[i] for i in ids(8)], dtype=float)
    return float(counts.max() / counts.mean())


def test_512_token_system_prompt_spreads_conversations_and_keeps_each_on_its_pair() -> None:
    rng = np.random.default_rng(0)
    system = tokens(rng, 512)
    convs = _conversations(rng, system, 2000, first_message=(600, 1200))
    policy = DualMapPolicy()
    loads = _run(policy, convs, _schedule(rng, convs), rng)
    assert sum(loads.values()) == sum(c.turns for c in convs)
    assert set(loads) == set(ids(8))
    assert _imbalance(loads) <= 1.2
    for conv in convs:
        assert len(conv.decisions[0].candidates) == 2
        assert all(d.instance_id in d.candidates for d in conv.decisions)
        # After the first turn the conversation returns to where its cache is (a home, or
        # the continuity candidate when the key lengthened after its first turn).
        assert all(d.instance_id == conv.decisions[0].instance_id for d in conv.decisions)


def test_a_hot_long_system_prompt_needs_the_adaptive_key() -> None:
    rng = np.random.default_rng(1)
    system = tokens(rng, 1536)  # longer than the two-block key: every base key collides
    convs = _conversations(rng, system, 800, first_message=(200, 600))
    order = _schedule(rng, convs)
    fixed = _run(DualMapPolicy(adaptive_key=False), _copy(convs), order, np.random.default_rng(2))
    assert len(fixed) <= 2  # everything on one candidate pair
    adaptive_convs = _copy(convs)
    adaptive = _run(DualMapPolicy(), adaptive_convs, order, np.random.default_rng(2))
    assert set(adaptive) == set(ids(8))
    assert _imbalance(adaptive) <= 1.2
    # Conversations starting once the prefix is known to be hot stay on their pair.
    first_seen = {index: order.index(index) for index in set(order)}
    settled = [c for index, c in enumerate(adaptive_convs) if first_seen[index] >= 300]
    assert len(settled) > 500
    for conv in settled:
        assert all(d.candidates == conv.decisions[0].candidates for d in conv.decisions)


def _copy(convs: list[Conversation]) -> list[Conversation]:
    return [Conversation(c.prompt.copy(), c.turns) for c in convs]
