"""DualMap on the compiled kernels decides as on their readable Python reference
(``fastpath_py``), decision for decision, on random multi-turn traffic (hypothesis): shared
system prompts (hot, lengthened keys), conversations moved off their homes by load (the
continuity candidate), small caches (evicted holders), instances turning unroutable and
back, and feedback. Both policies live in one process: the reference one is built and
driven with the policy modules' kernel names pointed at ``fastpath_py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.policy import cache_view, dualmap, fastpath_py, hashing, keys, ring_keys, rings
from router.policy.dualmap import DualMapPolicy
from router.policy.fastpath import COMPILED
from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest

# Every name a policy module bound from router.policy.fastpath at import.
KERNEL_NAMES: dict[ModuleType, tuple[str, ...]] = {
    cache_view: ("LastHolderIndex", "PrefixLru"),
    dualmap: ("LastHolderIndex", "affinity_pick"),
    hashing: ("PromptKey", "key_hash", "mix64", "prefix_hashes", "prompt_key"),
    keys: ("PromptKey",),
    ring_keys: ("PrefixLru", "locate"),
    rings: ("RingIndex",),
}


@contextmanager
def python_kernels() -> Iterator[None]:
    """The policy modules on ``fastpath_py``'s kernels while inside."""
    saved = {(module, name): getattr(module, name)
             for module, names in KERNEL_NAMES.items() for name in names}
    try:
        for module, name in saved:
            setattr(module, name, getattr(fastpath_py, name))
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def test_the_switch_reaches_every_kernel_a_policy_uses() -> None:
    """Inside, a new DualMap holds only Python kernel objects; outside, the compiled ones."""
    with python_kernels():
        policy = DualMapPolicy()
        assert type(policy.last_holder) is fastpath_py.LastHolderIndex
        assert policy.rings.keys.hasher.hashes(np.arange(32, dtype=np.int32)).dtype == np.uint64
    for module, names in KERNEL_NAMES.items():
        for name in names:
            assert (getattr(module, name) is not getattr(fastpath_py, name)) == COMPILED


NUM_INSTANCES = 6
_steps = st.lists(st.one_of(
    # A turn of conversation c: its history plus new tokens (a first turn opens with one of
    # two system prompts).
    st.tuples(st.just("turn"), st.integers(0, 9), st.integers(1, 200)),
    st.tuples(st.just("health"), st.integers(0, NUM_INSTANCES - 1), st.booleans()),
    # A load report: uncached prefill waiting per instance (over the SLO bound: fallbacks).
    st.tuples(st.just("load"), st.lists(st.sampled_from([0, 0, 50_000, 2_000_000]),
                                        min_size=NUM_INSTANCES, max_size=NUM_INSTANCES)),
    st.tuples(st.just("first_token"), st.floats(0.01, 3.0)),
    st.tuples(st.just("finish"), st.none()),
), min_size=10, max_size=80)


def _snapshot(epoch: int, healthy: list[bool], waiting: list[int]) -> ClusterSnapshot:
    return ClusterSnapshot(epoch, tuple(
        InstanceView(f"i{k}", healthy=healthy[k], total_blocks=160, waiting_prefill_tokens=w,
                     num_waiting=int(w > 0))
        for k, w in enumerate(waiting)))


@contextmanager
def _kernels(python: bool) -> Iterator[None]:
    if python:
        with python_kernels():
            yield
    else:
        yield


def _drive(steps: list[Any], seed: int, params: dict[str, Any]) -> Counter[str]:
    """Run ``steps`` through a DualMap on the compiled kernels and one on the Python ones,
    asserting equal decisions; the reasons seen."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 50_000, n).astype(np.int32) for n in (40, 300)]
    policies = {}
    for python in (False, True):
        with _kernels(python):
            policies[python] = DualMapPolicy(slo_ttft_s=1.0, hot_min_count=4, **params)
    healthy, waiting = [True] * NUM_INSTANCES, [0] * NUM_INSTANCES
    snapshot = _snapshot(1, healthy, waiting)
    history: dict[int, np.ndarray] = {}
    in_flight: list[tuple[str, str]] = []
    reasons: Counter[str] = Counter()
    for seq, step in enumerate(steps):
        now = float(seq)
        kind = step[0]
        if kind == "turn":
            _, conversation, new_tokens = step
            start = history.get(conversation, systems[conversation % 2])
            prompt = np.concatenate(
                [start, rng.integers(0, 50_000, new_tokens).astype(np.int32)])
            request = RoutingRequest(f"r{seq}", prompt, 16)
            decisions = []
            for python, policy in policies.items():
                with _kernels(python):
                    decisions.append(policy.route(request, snapshot, now))
                    policy.on_dispatched(request, decisions[0], now)
            assert decisions[1] == decisions[0], seq
            in_flight.append((request.request_id, decisions[0].instance_id))
            reasons[decisions[0].reason] += 1
            answer = rng.integers(0, 50_000, int(rng.integers(5, 60))).astype(np.int32)
            history[conversation] = np.concatenate([prompt, answer])[-2500:]
        elif kind in ("health", "load"):
            if kind == "health":
                healthy[step[1]] = step[2] or not any(
                    h for k, h in enumerate(healthy) if k != step[1])
            else:
                waiting = list(step[1])
            snapshot = _snapshot(snapshot.epoch + 1, healthy, waiting)
        elif in_flight:
            request_id, instance_id = in_flight[0] if kind == "first_token" else in_flight.pop(0)
            for python, policy in policies.items():
                with _kernels(python):
                    if kind == "first_token":
                        policy.on_first_token(request_id, instance_id, step[1], None, now)
                    else:
                        policy.on_finished(request_id, instance_id, now)
    return reasons


needs_compiled = pytest.mark.skipif(
    not COMPILED, reason="the Python kernels run here (no C compiler at install, or "
    "LLMFLEET_PURE_PYTHON=1): there is no second path to compare")
PARAMS = [{}, {"continuity": False}, {"slo_aware": False},
          {"key_blocks": 2, "key_block_size": 128, "hot_step": 64}]


@needs_compiled
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps, seed=st.integers(0, 2**16), params=st.sampled_from(PARAMS))
def test_compiled_dualmap_decides_as_its_python_reference(
    steps: list[Any], seed: int, params: dict[str, Any]
) -> None:
    _drive(steps, seed, params)


@needs_compiled
def test_a_long_run_of_that_traffic_covers_every_reason() -> None:
    """One long draw of the same kind of traffic, compared the same way, goes through every
    reason the decision path has (not only the affinity pick)."""
    rng = np.random.default_rng(3)
    steps: list[Any] = []
    for k in range(1500):
        if k % 60 == 0:
            steps.append(("load", [int(w) for w in rng.choice([0, 0, 50_000, 2_000_000],
                                                               NUM_INSTANCES)]))
        if k % 45 == 0:
            steps.append(("health", int(rng.integers(NUM_INSTANCES)), bool(k % 90)))
        steps.append(("turn", int(rng.integers(10)), int(rng.integers(1, 200))))
        steps.append(("first_token", float(rng.uniform(0.05, 0.5))))
        steps.append(("finish", None))
    reasons = _drive(steps, 7, {})
    assert set(reasons) >= {"affinity", "continuity", "slo_fallback", "load",
                            "holder_unroutable", "holder_evicted"}, reasons
