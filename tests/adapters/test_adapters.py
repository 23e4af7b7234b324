"""Backend adapters: metrics per backend kind, SGLang against the reference engine's SGLang
personality, plain OpenAI servers, health-checked join and leave, vLLM's KV-event wire form."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator

import httpx
import msgpack
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from instances.adapters import (
    ExternalReplicaAgent,
    LoadReader,
    detect_api,
    kv_events_endpoint,
    parse_get_load,
    parse_load_metrics,
)
from instances.engine.factory import build_engine_core
from instances.launcher import free_port
from instances.server import EngineServerConfig, create_engine_app
from proto import backends
from proto.kv_events import decode_batch
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 96.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="1000"} 1.0
"""


def test_vllm_page_gives_load_block_size_and_prefix_counters() -> None:
    load = parse_load_metrics(VLLM_PAGE, "vllm")
    assert load == {"num_running": 3.0, "num_waiting": 2.0, "kv_usage": 0.25,
                    "prefix_cache_queries": 400.0, "prefix_cache_hits": 96.0,
                    "block_size": 32.0, "total_blocks": 1000.0, "free_blocks": 750.0}


def test_label_sets_are_summed_across_engines() -> None:
    page = VLLM_PAGE + 'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
    # A sample of a family after other families: the parser starts that family again.
    assert parse_load_metrics(page, "vllm")["num_running"] == 7.0


def test_renamed_gauge_is_read_and_a_missing_one_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    # vLLM's V0 name of the KV-usage gauge, and no waiting gauge at all.
    page = "\n".join(line for line in VLLM_PAGE.splitlines()
                     if "num_requests_waiting" not in line).replace(
        "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc") + "\n"
    reader = LoadReader(backends.VLLM, "http://replica")
    with caplog.at_level(logging.WARNING, logger="llmfleet.adapters"):
        first = reader.read(page)
        second = reader.read(page)
    assert first == second
    assert first["kv_usage"] == 0.25 and "num_waiting" not in first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "vllm:num_requests_waiting" in warnings[0] and "num_waiting" in warnings[0]


def test_an_unparseable_page_is_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    reader = LoadReader(backends.VLLM, "http://replica")
    with caplog.at_level(logging.WARNING, logger="llmfleet.adapters"):
        assert reader.read("vllm:num_requests_running{engine=0 oops\n") == {}
    assert "unparseable" in caplog.text


def test_detect_kind_from_metric_prefixes() -> None:
    assert detect_api(VLLM_PAGE) == "vllm"
    assert detect_api("# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 1\n") \
        == "sglang"
    assert detect_api("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 1\n") \
        == "openai"


def test_sglang_get_load_sums_dp_ranks() -> None:
    payload = [{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 10},
               {"dp_rank": 1, "num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 3}]
    assert parse_get_load(payload) == {"num_running": 4.0, "num_waiting": 2.0}


def test_kv_event_source_wildcards_become_the_server_host() -> None:
    sources = {"0": {"enable_kv_cache_events": True, "publisher": "zmq",
                     "endpoint": "tcp://*:5557", "topic": "r0"}}
    assert kv_events_endpoint(sources, "http://10.1.2.3:8000") == "tcp://10.1.2.3:5557"
    assert kv_events_endpoint({"0": {"enable_kv_cache_events": False}}, "http://h:1") == ""
    assert kv_events_endpoint("nonsense", "http://h:1") == ""


def test_vllm_map_form_events_and_byte_hashes_decode() -> None:
    # vLLM 0.32 sends events as maps tagged by "type"; sha256 hashes may come as bytes.
    digest = bytes(range(32))
    payload = msgpack.packb([1.5, [
        {"type": "BlockStored", "block_hashes": [7, digest], "parent_block_hash": None,
         "token_ids": list(range(64)), "block_size": 32, "lora_id": None, "medium": "GPU",
         "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
         "kv_cache_spec_kind": "full_attention"},
        {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
        {"type": "SomethingNew", "x": 1},
    ], 0], use_bin_type=True)
    ts, events = decode_batch(payload)
    assert ts == 1.5 and [e.kind for e in events] == ["BlockStored", "BlockRemoved",
                                                        "AllBlocksCleared"]
    folded = int.from_bytes(digest, "big") & 0xFFFFFFFFFFFFFFFF
    assert events[0].block_hashes == (7, folded) and events[0].block_size == 32
    assert len(events[0].token_ids) == 64 and events[1].block_hashes == (7,)


# -- agents against real servers ---------------------------------------------------------

@contextlib.contextmanager
def _engine(api: str, port: int) -> Iterator[str]:
    core = build_engine_core("emulated", num_gpu_blocks=4096)
    config = EngineServerConfig(api=api, model="emu", instance_id=f"engine-{api}")
    with serve_in_thread(create_engine_app(core, config, speedup=1.0), port) as url:
        yield url


async def _live(redis_url: str, namespace: str) -> dict[str, object]:
    store = ClusterStateStore(redis_url, namespace, 5.0)
    try:
        return {r.instance_id: r for r in await store.live_instances()}
    finally:
        await store.close()


def test_sglang_adapter_reads_the_sglang_personality_under_load(
        redis_url: str, namespace: str) -> None:
    async def scenario(url: str) -> tuple[list[dict[str, float]], object, object]:
        store = ClusterStateStore(redis_url, namespace, 5.0)
        agent = ExternalReplicaAgent(url, store, "sg-0")
        loads: list[dict[str, float]] = []
        async with httpx.AsyncClient(timeout=30) as client:
            record = await agent.step(client)
            assert record is not None
            loads.append(dict(record.load or {}))

            async def one(i: int) -> None:
                await client.post(url + "/v1/completions", json={
                    "prompt": f"request {i} " * 50, "max_tokens": 200})

            requests = [asyncio.create_task(one(i)) for i in range(6)]
            for _ in range(20):
                await asyncio.sleep(0.05)
                record = await agent.step(client)
                assert record is not None
                loads.append(dict(record.load or {}))
            await asyncio.gather(*requests)
        live = await store.live_instances()
        await store.close()
        return loads, agent, live[0] if live else None

    with _engine("sglang", free_port()) as url:
        loads, agent, live = asyncio.run(scenario(url))
    assert isinstance(agent, ExternalReplicaAgent)
    assert agent.backend is backends.SGLANG
    assert agent.tokenizer_agrees is None  # SGLang has no /tokenize
    assert live is not None and live.api == "sglang" and live.model == "emu"  # type: ignore[attr-defined]
    assert loads[0]["num_running"] == 0 and loads[0]["num_waiting"] == 0
    busy = max(load["num_running"] + load["num_waiting"] for load in loads)
    assert busy == 6  # /get_load saw all six requests in flight
    assert all("kv_usage" in load for load in loads)  # sglang:token_usage
    assert max(load["kv_usage"] for load in loads) > 0


def test_plain_openai_server_joins_without_load_and_leaves_when_it_fails(
        redis_url: str, namespace: str) -> None:
    app = FastAPI()
    state = {"healthy": True}

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok", status_code=200 if state["healthy"] else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "plain", "object": "model"}]}

    async def run_agent(url: str, stop: threading.Event, seen: list[set[str]]) -> None:
        store = ClusterStateStore(redis_url, namespace, 5.0)
        agent = ExternalReplicaAgent(url, store, "plain-0", poll_s=0.05)
        async with httpx.AsyncClient(timeout=2) as client:
            for phase in ("up", "down", "up again"):
                state["healthy"] = phase != "down"
                for _ in range(3):
                    await agent.step(client)
                seen.append(set((await _live(redis_url, namespace)).keys()))
        assert agent.backend is backends.OPENAI
        record = (await _live(redis_url, namespace))["plain-0"]
        assert record.api == "openai"  # type: ignore[attr-defined]
        assert set(record.load or {}) == {"report_time"}  # type: ignore[attr-defined]
        await store.close()

    seen: list[set[str]] = []
    with serve_in_thread(app, free_port()) as url:
        asyncio.run(run_agent(url, threading.Event(), seen))
    assert seen == [{"plain-0"}, set(), {"plain-0"}]


def test_a_server_slow_to_answer_stays_in_the_fleet_for_its_grace_then_leaves(
        redis_url: str, namespace: str) -> None:
    # A loaded vLLM's API process can take seconds to answer /health: timing out is not
    # being down. The registration outlives both the probe timeout and the registry TTL
    # (the keepalive refreshes it) until the grace runs out.
    app = FastAPI()
    state = {"hang": False}

    @app.get("/health")
    async def health() -> PlainTextResponse:
        while state["hang"]:
            await asyncio.sleep(0.02)
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "slow", "object": "model"}]}

    ttl, grace = 0.6, 2.0

    async def scenario(url: str) -> tuple[list[bool], list[bool], bool, ExternalReplicaAgent]:
        store = ClusterStateStore(redis_url, namespace, ttl)
        agent = ExternalReplicaAgent(url, store, "slow-0", poll_s=0.05, kind="openai",
                                     probe_timeout_s=0.2, busy_grace_s=grace)
        task = asyncio.create_task(agent.run())

        async def registered() -> bool:
            return "slow-0" in await _live(redis_url, namespace)

        try:
            for _ in range(100):
                if await registered():
                    break
                await asyncio.sleep(0.02)
            state["hang"] = True
            hung_at = asyncio.get_running_loop().time()
            within: list[bool] = []  # sampled over 1.2 s: two TTLs, six probe timeouts
            while asyncio.get_running_loop().time() - hung_at < 1.2:
                within.append(await registered())
                await asyncio.sleep(0.1)
            after: list[bool] = []  # sampled until well past the grace
            while asyncio.get_running_loop().time() - hung_at < grace + 1.5:
                after.append(await registered())
                await asyncio.sleep(0.1)
            state["hang"] = False
            rejoined = False
            for _ in range(100):
                if rejoined := await registered():
                    break
                await asyncio.sleep(0.02)
        finally:
            state["hang"] = False
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.close()
        return within, after, rejoined, agent

    with serve_in_thread(app, free_port()) as url:
        within, after, rejoined, agent = asyncio.run(scenario(url))
    assert within and all(within), within  # timed-out checks within the grace: still in
    assert after[-1] is False, after  # past the grace: out
    assert rejoined  # answering again: back in
    assert agent.registered


def test_a_vanished_server_leaves_and_rejoins(redis_url: str, namespace: str) -> None:
    port = free_port()

    async def scenario() -> list[set[str]]:
        store = ClusterStateStore(redis_url, namespace, 5.0)
        agent = ExternalReplicaAgent(f"http://127.0.0.1:{port}", store, "v-0", kind="vllm")
        seen: list[set[str]] = []
        async with httpx.AsyncClient(timeout=1) as client:
            async def check() -> None:
                await agent.step(client)
                seen.append(set((await _live(redis_url, namespace)).keys()))

            with _engine("vllm", port):  # the engine runs in its own thread and loop
                await check()
            await check()  # one failed check is not enough to leave
            await check()
            with _engine("vllm", port):
                await check()
        await store.close()
        assert agent.backend is backends.VLLM
        return seen

    assert asyncio.run(scenario()) == [{"v-0"}, {"v-0"}, set(), {"v-0"}]


def test_a_sink_that_refuses_events_does_not_end_the_subscription(
        caplog: pytest.LogCaptureFixture) -> None:
    from proto.kv_events import KVEvent, KVEventPublisher, KVEventSubscriber

    publisher = KVEventPublisher("r0")
    calls: list[int] = []

    def sink(instance_id: str, events: object) -> None:
        calls.append(len(calls))
        raise ValueError("KV event block size 32 != view block size 16")

    async def scenario() -> KVEventSubscriber:
        subscriber = KVEventSubscriber(sink)
        subscriber.sync({"r0": publisher.endpoint})
        await asyncio.sleep(0.3)  # let the SUB socket join before anything is published
        for n in range(3):
            publisher.publish(float(n), [KVEvent("AllBlocksCleared")])
        for _ in range(100):
            if subscriber.batches == 3:
                break
            await asyncio.sleep(0.02)
        await subscriber.close()
        return subscriber

    with caplog.at_level(logging.WARNING, logger="llmfleet.kv_events"):
        subscriber = asyncio.run(scenario())
    publisher.close()
    assert subscriber.batches == 3 and len(calls) == 3
    assert subscriber.sink_errors == {"r0": 3}
    assert caplog.text.count("not applied") == 1
