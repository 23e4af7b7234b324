"""Loops on Redis stop when their task is cancelled.

The control loop, the replica agents, the dashboard's and the auth table's pollers all run
as tasks that loop on Redis and are stopped with ``task.cancel()``. redis-py 8.0.x/8.1.0's
asyncio client swallowed that cancellation in a fraction of commands (the task carried on
as if nothing happened), which hung gateway shutdowns and CI teardowns; pyproject keeps
redis-py below 8. This holds the installed client to it.
"""

from __future__ import annotations

import asyncio
import random

from proto.registry import InstanceRecord
from router.state import ClusterStateStore


def test_a_task_looping_on_the_registry_stops_when_cancelled(
        redis_url: str, namespace: str) -> None:
    record = InstanceRecord(instance_id="r0", url="http://127.0.0.1:1", model="m",
                            load={"num_running": 1.0})

    async def heartbeats(store: ClusterStateStore) -> None:
        while True:
            await store.heartbeat(record)
            await store.live_instances()

    async def scenario() -> int:
        store = ClusterStateStore(redis_url, namespace, 5.0)
        rng = random.Random(7)
        carried_on = 0
        try:
            for _ in range(200):
                task = asyncio.create_task(heartbeats(store))
                await asyncio.sleep(rng.random() * 0.004)  # cancel at any point of a command
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=0.5)
                if not done:
                    carried_on += 1
                    for _ in range(100):  # try to end it, but a swallowed cancel may recur
                        if task.done():
                            break
                        task.cancel()
                        await asyncio.sleep(0.01)
        finally:
            await store.close()
        return carried_on

    # Not asyncio.run: its clean-up would wait on a task that ignores cancellation.
    loop = asyncio.new_event_loop()
    try:
        carried_on = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert carried_on == 0
