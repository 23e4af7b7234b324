"""Run as a separate process: build a gateway from Redis, route N prompts, print a digest.

Used by the test that two gateway processes agree on every decision from shared state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys

from router.gateway import Gateway, GatewayConfig
from router.policy.interfaces import RoutingRequest


async def main(redis_url: str, namespace: str, policy: str, count: int, seed: int) -> None:
    gateway = Gateway(GatewayConfig(redis_url=redis_url, namespace=namespace, policy=policy))
    await gateway.refresh()
    await gateway.store.close()
    # The refresh adopted the snapshot, so no decision below pays for it.
    board = getattr(gateway.policy, "board", None)
    assert board is None or board.snapshot is gateway.snapshot
    rng = random.Random(seed)
    system = [rng.randrange(256) for _ in range(512)]
    digest = hashlib.sha256()
    counts: dict[str, int] = {}
    for i in range(count):
        tail = [rng.randrange(256) for _ in range(rng.randrange(16, 2048))]
        request = RoutingRequest(f"r{i}", system + tail if i % 2 else tail, 16)
        decision = gateway.route(request, set(), now=0.0)
        digest.update(decision.instance_id.encode())
        counts[decision.instance_id] = counts.get(decision.instance_id, 0) + 1
    print(json.dumps({"epoch": gateway.snapshot.epoch, "digest": digest.hexdigest(),
                      "counts": counts}))


if __name__ == "__main__":
    url, ns, pol, n, s = sys.argv[1:6]
    asyncio.run(main(url, ns, pol, int(n), int(s)))
