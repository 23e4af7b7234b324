"""consistent_hash: the key's owner on ring A; prompts sharing the key share the owner."""

from __future__ import annotations

import numpy as np

from router.policy.consistent_hash import ConsistentHashPolicy
from router.policy.interfaces import ClusterSnapshot, InstanceView
from tests.routing.util import ids, request, snapshot, tokens


def test_same_key_same_owner_whatever_follows() -> None:
    rng = np.random.default_rng(0)
    policy = ConsistentHashPolicy()
    snap = snapshot(8)
    head = tokens(rng, 1024)
    owners = {
        policy.route(request(f"r{k}", np.concatenate([head, tokens(rng, 500)])), snap, 0)
        for k in range(20)
    }
    assert len(owners) == 1
    decision = owners.pop()
    assert decision.reason == "hash" and decision.candidates == (decision.instance_id,)


def test_keys_spread_over_the_fleet() -> None:
    rng = np.random.default_rng(1)
    policy = ConsistentHashPolicy()
    snap = snapshot(8)
    chosen = [policy.route(request(f"r{k}", tokens(rng, 1500)), snap, 0).instance_id
              for k in range(800)]
    counts = np.array([chosen.count(i) for i in ids(8)])
    assert counts.min() > 0 and counts.max() / counts.mean() < 1.5


def test_an_unroutable_owner_passes_its_keys_to_the_next_member() -> None:
    rng = np.random.default_rng(2)
    policy = ConsistentHashPolicy()
    snap = snapshot(8)
    prompts = [tokens(rng, 1200) for _ in range(200)]
    before = [policy.route(request(f"a{k}", p), snap, 0).instance_id for k, p in enumerate(prompts)]
    down = before[0]
    views = tuple(InstanceView(v.instance_id, healthy=v.instance_id != down)
                  for v in snap.instances)
    after = [policy.route(request(f"b{k}", p), ClusterSnapshot(1, views), 0).instance_id
             for k, p in enumerate(prompts)]
    for owner_before, owner_after in zip(before, after, strict=True):
        if owner_before == down:
            assert owner_after != down
        else:
            assert owner_after == owner_before  # nobody else's keys move
