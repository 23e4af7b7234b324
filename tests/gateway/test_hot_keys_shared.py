"""Gateway replicas fed different traffic key prompts by one fleet-wide hot-key table."""

from __future__ import annotations

import asyncio

import numpy as np

from proto.registry import InstanceRecord
from router.gateway import Gateway, GatewayConfig
from router.policy.interfaces import RoutingRequest
from router.state import ClusterStateStore

SYSTEM = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.int32)


def _feed(gateway: Gateway, requests: list[RoutingRequest]) -> None:
    for request in requests:
        decision = gateway.route(request, set(), 0.0)
        gateway.policy.on_dispatched(request, decision, 0.0)
        gateway.policy.on_finished(request.request_id, decision.instance_id, 0.0)


def _shared_prefix_requests(tag: str, count: int, seed: int) -> list[RoutingRequest]:
    rng = np.random.default_rng(seed)
    return [RoutingRequest(f"{tag}{i}", np.concatenate(
        [SYSTEM, rng.integers(0, 256, 600, dtype=np.int32)]), 8) for i in range(count)]


def _local_key(gateway: Gateway, request: RoutingRequest) -> int:
    """The key this replica would use from its own traffic alone (its detector's table)."""
    keys = gateway.policy.rings.keys  # type: ignore[attr-defined]
    tokens = np.asarray(request.token_ids, dtype=np.int32)
    return int(keys.hasher.prompt_key(tokens, None, keys.base_length(len(tokens)),
                                      keys.hot_step, keys.max_key_tokens, keys.detector.hot,
                                      keys.detector.splits).hash)


def _candidates(gateway: Gateway, probes: list[RoutingRequest]) -> list[tuple[str, ...]]:
    return [tuple(gateway.route(p, set(), 0.0).candidates) for p in probes]


def test_two_replicas_with_different_traffic_agree_on_homes(redis_url: str,
                                                            namespace: str) -> None:
    async def main() -> None:
        store = ClusterStateStore(redis_url, namespace, heartbeat_ttl_s=120)
        for i in range(8):
            await store.heartbeat(InstanceRecord(f"i{i}", f"http://127.0.0.1:{9 + i}", "m"))
        await store.close()
        config = {"redis_url": redis_url, "namespace": namespace, "policy": "dualmap"}
        a = Gateway(GatewayConfig(**config, gateway_id="gw-a"))
        b = Gateway(GatewayConfig(**config, gateway_id="gw-b"))
        for gw in (a, b):
            await gw.control.tick()
        # A sees a system prompt in front of many conversations (it turns hot there);
        # B sees unrelated prompts only.
        _feed(a, _shared_prefix_requests("a", 300, seed=2))
        rng = np.random.default_rng(3)
        _feed(b, [RoutingRequest(f"b{i}", rng.integers(0, 256, 3600, dtype=np.int32), 8)
                  for i in range(300)])
        assert a.policy.hot_key_table() and not b.policy.hot_key_table()  # type: ignore[attr-defined]
        probes = _shared_prefix_requests("p", 40, seed=4)
        # Without the shared table the replicas would disagree: A lengthens the key of the
        # hot prefix (spreading the conversations), B does not (all on one pair of homes).
        local_a = {_local_key(a, p) for p in probes}
        local_b = {_local_key(b, p) for p in probes}
        assert len(local_a) > 1 and len(local_b) == 1
        # Control-loop rounds: each publishes, the leader merges, both adopt.
        for _ in range(3):
            for gw in (a, b):
                await gw.control.tick()
        assert a.is_leader != b.is_leader
        assert _candidates(a, probes) == _candidates(b, probes)
        assert len(set(_candidates(a, probes))) > 1  # the hot prefix's conversations spread
        for gw in (a, b):
            await gw.stop()

    asyncio.run(main())
