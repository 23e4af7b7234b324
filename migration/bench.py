"""``llmfleet bench migration``: live migration vs token replay, by context length.

    llmfleet bench migration --contexts 1024,4096,16384,32768 --json

Two reference-engine replicas run as separate processes (``llmfleet engine``, real time,
each with its gRPC migration agent). For every context length and repeat, a fresh random
prompt of that many tokens is streamed from replica A over HTTP; after a few tokens the
request moves to replica B and the client follows the stream (``migration.stitch``):

* ``live`` / ``kv: real``: the Llumnix protocol over gRPC with the executor's real block
  payloads (``emulated``: 4 KiB per block derived from the tokens; ``tiny``: the numpy
  transformer's float64 K/V, 32 KiB per block, for the contexts it can hold).
* ``live`` / ``kv: modelled``: the same run, but the source paces its sends as if each
  block were Llama-3-8B's (128 KiB per token, 2 MiB per 16-token block) over a link of
  ``link_gbytes_per_s`` (25 GB/s RDMA, 1.25 GB/s = 10 Gb/s Ethernet): the copy time comes
  from the link, the protocol's own time (RPCs, export, import, commit, reconnection) is
  measured.
* ``replay``: the source's stream is dropped and the request re-issued on B with the prompt
  plus the tokens generated so far and the remaining budget (``migration.replay``); B
  prefills the whole context again (the emulated engine times that prefill as an H100
  would).

Per row: ``downtime_ms`` — how much longer the client waited for the first token after the
move than for an ordinary token (the gap in its token stream, minus the median
inter-token gap before the move); ``gap_ms`` the raw gap; ``stopped_ms`` how long the
source held the request stopped (live); ``total_ms`` from the migration order to the
commit (live; replay: the gap); ``bytes`` of KV sent over gRPC (modelled rows: the modelled
bytes; replay: the continuation request body); ``stages`` pre-copy stages plus the
stop-and-copy. Numbers are medians over ``--repeat`` runs.

``grpc_loopback_gbytes_per_s``: 1 GiB of KV blocks per round as one ``PushBlocks`` stream
of 1 MiB batches (4 KiB blocks) into a sink process, encoded, sent and decoded as the agents
do it (``migration.transport``: identity serializers, no protobuf copy of the payload);
beside it in alternating rounds the same bytes over a plain TCP socket
(``tcp_loopback_gbytes_per_s``) and as ordinary protobuf ``BlockBatch`` messages
(``grpc_loopback_protobuf_gbytes_per_s``, the naive path); medians of
``--loopback-rounds``, each round's figures under ``loopback``. ``--only grpc_loopback``
runs just this part and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from migration.coordinator import LinkModel, MigrationConfig, MigrationCoordinator
from migration.replay import continuation_body
from migration.stitch import Resume, StreamStitcher, stitch
from migration.transport import (
    CHANNEL_OPTIONS,
    DEFAULT_MAX_BATCH_BYTES,
    ChannelPool,
    decode_batch,
    encode_batch,
    push_blocks_call,
    serve_migration_agent,
    tune_allocator,
)
from proto import migration_pb2 as pb
from proto import migration_pb2_grpc as pb_grpc
from proto.headers import REQUEST_ID_HEADER

DEFAULT_OUT = Path("docs/results/migration.json")
LLAMA3_8B_KV_BYTES_PER_TOKEN = 128 * 1024
BLOCK_SIZE = 16
LINKS_GBYTES_PER_S = (25.0, 1.25)
DOWNTIME_GOAL_MS = 30.0
TOKENS_BEFORE_MOVE = 12  # the request decodes this many tokens before the move is ordered
TOKENS_AFTER_MOVE = 12  # the client reads this many after it, then hangs up


# ---- replicas ------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    url: str
    migration: str
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_replica(name: str, executor: str, speedup: float = 1.0,
                  timeout_s: float = 60.0) -> Replica:
    """``llmfleet engine`` in a child process; returns once it serves HTTP and gRPC."""
    port, migration_port = _free_port(), _free_port()
    args = [sys.executable, "-m", "router.cli", "engine", "--executor", executor,
            "--port", str(port), "--migration-port", str(migration_port),
            "--instance-id", name, "--model", "bench", "--speedup", str(speedup)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    replica = Replica(name, f"http://127.0.0.1:{port}", f"127.0.0.1:{migration_port}", proc)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            replica.output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine {name} exited:\n" + "".join(replica.output[-30:]))
        with contextlib.suppress(queue.Empty):
            if '"engine_ready"' in lines.get(timeout=0.2):
                break
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{replica.url}/health", timeout=1.0).status_code == 200:
                return replica
        time.sleep(0.1)
    replica.stop()
    raise TimeoutError(f"engine {name} did not come up:\n" + "".join(replica.output[-30:]))


@contextlib.contextmanager
def replica_pair(executor: str, speedup: float = 1.0) -> Iterator[tuple[Replica, Replica]]:
    a = start_replica("bench-a", executor, speedup)
    try:
        b = start_replica("bench-b", executor, speedup)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


# ---- one migration, seen by the client ------------------------------------------------------


@dataclass
class Observation:
    arrivals: list[tuple[float, int]]  # (time, hop) of each chunk with generated text
    migration: dict[str, Any]

    def gap_and_itl(self) -> tuple[float, float]:
        """The gap at the first hop change and the median gap before it (seconds)."""
        before = [t for t, hop in self.arrivals if hop == 0]
        after = [t for t, hop in self.arrivals if hop > 0]
        if len(before) < 3 or not after:
            raise RuntimeError("the stream did not move, or moved too early")
        itl = statistics.median(np.diff(before[1:]).tolist())
        return after[0] - before[-1], itl


def _prompt(context: int, seed: int) -> list[int]:
    # Printable bytes: every replica's byte-level vocabulary, no EOS, no special meaning.
    return np.random.default_rng(seed).integers(32, 127, context).tolist()


async def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in response.aiter_raw():
            yield data
    finally:
        await response.aclose()


async def _read(
    stream: AsyncIterator[bytes], stitcher: StreamStitcher,
    arrivals: list[tuple[float, int]], before: int, after: int,
) -> None:
    """Relay ``stream``, stamping each chunk with text, until ``before`` chunks arrived
    before the first move and ``after`` after it (or the stream ends)."""
    clock = time.perf_counter
    seen = stitcher.chunks
    moved = 0
    async for _ in stream:
        now = clock()
        while seen < stitcher.chunks:
            arrivals.append((now, stitcher.hops))
            moved += stitcher.hops > 0
            seen += 1
        if moved >= after and len(arrivals) - moved >= before:
            return


async def run_live(
    a: Replica, b: Replica, context: int, seed: int, config: MigrationConfig,
) -> Observation:
    link = int(config.link.gbytes_per_s * 100) if config.link else 0
    request_id = f"live-{context}-{seed}-{link}"
    body = {"prompt": _prompt(context, seed), "max_tokens": 4000, "stream": True,
            "temperature": 0.0}
    stitcher = StreamStitcher(keep_text=False)
    arrivals: list[tuple[float, int]] = []
    pool = ChannelPool()
    coordinator = MigrationCoordinator(config, pool)
    result: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=300) as client:

        async def open_continuation(resume: Resume) -> AsyncIterator[bytes]:
            response = await client.send(client.build_request("GET", resume.continuation_url),
                                         stream=True)
            return _raw(response)

        async def mover() -> None:
            while len(arrivals) < TOKENS_BEFORE_MOVE:
                await asyncio.sleep(0.001)
            moved = await coordinator.migrate(request_id, a.migration, b.migration)
            result.update(status=moved.status, reason=moved.reason, stages=moved.stages,
                          bytes=moved.bytes, blocks=moved.blocks, total_s=moved.total_s,
                          stopped_s=moved.stopped_s, stage_blocks=moved.stage_blocks)

        request = client.build_request("POST", f"{a.url}/v1/completions", json=body,
                                       headers={REQUEST_ID_HEADER: request_id})
        response = await client.send(request, stream=True)
        moving = asyncio.create_task(mover())
        stream = stitch(_raw(response), open_continuation, stitcher=stitcher)
        try:
            await _read(stream, stitcher, arrivals, TOKENS_BEFORE_MOVE, TOKENS_AFTER_MOVE)
            await moving
        finally:
            moving.cancel()
            await stream.aclose()  # type: ignore[attr-defined]
    await coordinator.close()
    await pool.close()
    return Observation(arrivals, result)


async def run_replay(a: Replica, b: Replica, context: int, seed: int) -> Observation:
    request_id = f"replay-{context}-{seed}"
    body: dict[str, Any] = {"prompt": _prompt(context, seed), "max_tokens": 4000,
                            "stream": True, "temperature": 0.0}
    stitcher = StreamStitcher()
    arrivals: list[tuple[float, int]] = []
    info: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=300) as client:
        request = client.build_request("POST", f"{a.url}/v1/completions", json=body,
                                       headers={REQUEST_ID_HEADER: request_id})
        response = await client.send(request, stream=True)
        await _read(_stitched_once(response, stitcher), stitcher, arrivals,
                    TOKENS_BEFORE_MOVE, 0)
        await response.aclose()  # stop on the source: the client is gone, it aborts
        generated = stitcher.text
        replay = continuation_body("/v1/completions", body, generated, len(generated.encode()),
                                   generated_token_ids=list(generated.encode()))
        payload = json.dumps(replay).encode()
        info.update(status="committed", stages=0, bytes=len(payload))
        stitcher.continue_from()
        started = time.perf_counter()
        request = client.build_request("POST", f"{b.url}/v1/completions", content=payload,
                                       headers={REQUEST_ID_HEADER: request_id,
                                                "content-type": "application/json"})
        response = await client.send(request, stream=True)
        await _read(_stitched_once(response, stitcher), stitcher, arrivals, 0,
                    TOKENS_AFTER_MOVE)
        await response.aclose()
        info["total_s"] = time.perf_counter() - started
    return Observation(arrivals, info)


async def _stitched_once(response: httpx.Response, stitcher: StreamStitcher
                         ) -> AsyncIterator[bytes]:
    async for data in response.aiter_raw():
        out = stitcher.feed(data)
        if out:
            yield out


# ---- gRPC loopback throughput ----------------------------------------------------------------


# The loopback measurement runs each gRPC side in a process of its own, so that the
# baseline is the path as it was before ``migration.transport``'s codec (generated protobuf
# (de)serializers, the default allocator) and the other one the agents' path (codec,
# ``tune_allocator``), side by side in one run.
_SINK_CPU_KEY = "llmfleet-sink-cpu-s"


class _Sink(pb_grpc.MigrationAgentServicer):
    """``PushBlocks`` without an engine behind it: the bytes are counted, not imported.
    ``raw``: as the agent serves it (``serve_migration_agent``, ``decode_batch``); else
    through the generated protobuf deserializer. Its process's CPU seconds for the call go
    back in the trailing metadata."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw

    async def PushBlocks(self, request_iterator: AsyncIterator[Any],
                         context: grpc.aio.ServicerContext) -> pb.PushReply:
        cpu = time.process_time()
        blocks = received = 0
        async for message in request_iterator:
            if self.raw:
                batch, payload = decode_batch(message)
                received += len(payload)
            else:
                batch = message
                received += len(batch.payload)
            blocks += len(batch.block_hashes)
        context.set_trailing_metadata(((_SINK_CPU_KEY, str(time.process_time() - cpu)),))
        return pb.PushReply(blocks_received=blocks, bytes_received=received)


async def _serve_sink(kind: str, port_file: str) -> None:
    raw = kind == "grpc"
    if raw:
        tune_allocator()
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    if raw:
        serve_migration_agent(_Sink(raw=True), server)
    else:
        pb_grpc.add_MigrationAgentServicer_to_server(_Sink(raw=False), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


@dataclass
class _Round:
    gbytes_per_s: float
    sender_cpu_s: float  # CPU seconds of the sending side (its process, or its thread)
    receiver_cpu_s: float


def _loopback_batch(batch_bytes: int, block_bytes: int) -> tuple[pb.BlockBatch, list[bytes]]:
    """A batch as the agent exports it: hashes, int32 token ids and one payload per block."""
    count = max(1, batch_bytes // block_bytes)
    header = pb.BlockBatch(migration_id="bench", first_block=0,
                           block_hashes=list(range(1, count + 1)),
                           token_ids=bytes(4 * BLOCK_SIZE * count),
                           payload_bytes_per_block=block_bytes)
    blob = os.urandom(block_bytes * count)
    return header, [blob[i * block_bytes:(i + 1) * block_bytes] for i in range(count)]


async def _push_round(kind: str, address: str, count: int, batch_bytes: int,
                      block_bytes: int) -> _Round:
    """One timed stream of ``count`` batches (after a short untimed one) to a sink."""
    header, payloads = _loopback_batch(batch_bytes, block_bytes)
    sent = count * sum(len(p) for p in payloads)

    async def raw_messages(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield encode_batch(header, payloads)

    async def pb_messages(n: int) -> AsyncIterator[pb.BlockBatch]:
        for _ in range(n):
            batch = pb.BlockBatch()
            batch.CopyFrom(header)
            batch.payload = b"".join(payloads)
            yield batch

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        if kind == "grpc":
            call = push_blocks_call(channel)
            messages: Any = raw_messages
        else:
            call = pb_grpc.MigrationAgentStub(channel).PushBlocks
            messages = pb_messages
        await call(messages(min(count, 64)))  # warm-up (connection, buffers)
        started, cpu = time.perf_counter(), time.process_time()
        pushed = call(messages(count))
        reply = await pushed
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        trailing = dict(await pushed.trailing_metadata() or ())
    if reply.bytes_received != sent or reply.blocks_received != count * len(payloads):
        raise RuntimeError(f"the sink got {reply.bytes_received} of {sent} bytes")
    return _Round(sent / elapsed / 1e9, cpu, float(trailing[_SINK_CPU_KEY]))


def _client_main(spec: str) -> int:
    """``--loopback-client kind,address,count,batch_bytes,block_bytes``: one round, as JSON."""
    kind, address, count, batch_bytes, block_bytes = spec.split(",")
    if kind == "grpc":
        tune_allocator()
    measured = asyncio.run(_push_round(kind, address, int(count), int(batch_bytes),
                                       int(block_bytes)))
    print(json.dumps(measured.__dict__))
    return 0


def _tcp_round(total_bytes: int, chunk: bytes) -> _Round:
    """``total_bytes`` sent in ``chunk``s over a plain loopback TCP socket to a thread."""
    server = socket.create_server(("127.0.0.1", 0))
    receiver_cpu: list[float] = []

    def sink() -> None:
        conn, _ = server.accept()
        cpu = time.thread_time()
        buffer = bytearray(1 << 20)
        with conn:
            while conn.recv_into(buffer):
                pass
        receiver_cpu.append(time.thread_time() - cpu)

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    count = total_bytes // len(chunk)
    with socket.create_connection(server.getsockname()) as conn:
        started, cpu = time.perf_counter(), time.thread_time()
        for _ in range(count):
            conn.sendall(chunk)
        sender_cpu = time.thread_time() - cpu
    thread.join()
    elapsed = time.perf_counter() - started
    server.close()
    return _Round(count * len(chunk) / elapsed / 1e9, sender_cpu, receiver_cpu[0])


@contextlib.contextmanager
def _sink_process(kind: str) -> Iterator[str]:
    """A sink of ``kind`` in a child process; yields its ``host:port``."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".port") as port_file:
        proc = subprocess.Popen([sys.executable, "-m", "migration.bench", "--sink",
                                 f"{kind},{port_file.name}"])
        try:
            deadline = time.monotonic() + 30
            while not Path(port_file.name).read_text().strip():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {kind} sink did not start")
                time.sleep(0.05)
            yield f"127.0.0.1:{Path(port_file.name).read_text().strip()}"
        finally:
            proc.terminate()
            proc.wait(10)


def measure_loopback(total_bytes: int = 1 << 30, rounds: int = 5,
                     batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, block_bytes: int = 4096,
                     protobuf_baseline: bool = True) -> dict[str, Any]:
    """GB/s of KV blocks over ``PushBlocks`` from one process into a sink process on
    loopback, beside plain TCP, in alternating rounds (medians; each round's figures too).

    ``grpc``: the agents' path — each batch (``batch_bytes`` of ``block_bytes`` blocks)
    encoded with ``encode_batch`` per message (its one join of the payloads counted), sent
    with identity serializers, split with ``decode_batch``; both processes
    ``tune_allocator``. ``protobuf``: the path before that codec — the same batches as
    generated ``BlockBatch`` messages (payload joined, set, serialized, parsed and read by
    protobuf), default allocator. ``tcp``: the same bytes with ``sendall`` of 1 MiB.

    Each side's CPU seconds per GB are measured too (process time of the sending and of the
    sink process; thread time for TCP), and from them ``per_core_gbytes_per_s``: the rate if
    the busier side had a core to itself, which a loaded shared machine moves much less
    than the wall-clock rate.
    """
    chunk = os.urandom(1 << 20)
    message_bytes = max(1, batch_bytes // block_bytes) * block_bytes
    count = max(1, total_bytes // message_bytes)
    sent = count * message_bytes
    kinds = ["grpc"] + (["protobuf"] if protobuf_baseline else [])
    measured: dict[str, list[_Round]] = {kind: [] for kind in [*kinds, "tcp"]}
    with contextlib.ExitStack() as stack:
        sinks = {kind: stack.enter_context(_sink_process(kind)) for kind in kinds}
        for _ in range(rounds):
            for kind in kinds:
                spec = f"{kind},{sinks[kind]},{count},{batch_bytes},{block_bytes}"
                out = subprocess.run(
                    [sys.executable, "-m", "migration.bench", "--loopback-client", spec],
                    capture_output=True, text=True, timeout=600, check=True)
                measured[kind].append(_Round(**json.loads(out.stdout.strip().splitlines()[-1])))
            measured["tcp"].append(_tcp_round(sent, chunk))
    gb = sent / 1e9
    result: dict[str, Any] = {
        "grpc_loopback_gbytes_per_s": statistics.median(r.gbytes_per_s for r in measured["grpc"]),
        "tcp_loopback_gbytes_per_s": statistics.median(r.gbytes_per_s for r in measured["tcp"]),
    }
    if protobuf_baseline:
        result["grpc_loopback_protobuf_gbytes_per_s"] = statistics.median(
            r.gbytes_per_s for r in measured["protobuf"])
    cpu: dict[str, dict[str, float]] = {}
    for kind, runs in measured.items():
        sender = statistics.median(r.sender_cpu_s for r in runs) / gb
        receiver = statistics.median(r.receiver_cpu_s for r in runs) / gb
        cpu[kind] = {"sender_cpu_s_per_gb": round(sender, 3),
                     "receiver_cpu_s_per_gb": round(receiver, 3),
                     "per_core_gbytes_per_s": round(1 / max(sender, receiver), 3)}
    result["loopback"] = {
        "bytes_per_round": sent, "rounds": rounds, "batch_bytes": message_bytes,
        "block_bytes": block_bytes, "cpu": cpu,
        "rounds_gbytes_per_s": {k: [round(r.gbytes_per_s, 3) for r in v]
                                for k, v in measured.items()},
    }
    return result


# ---- the benchmark ---------------------------------------------------------------------------


def _row(context: int, mode: str, kv: str, executor: str, link: float | None,
         observations: list[Observation], modelled_bytes_per_block: int = 0) -> dict[str, Any]:
    gaps, itls, downtimes, totals, stopped, sizes, stages = [], [], [], [], [], [], []
    statuses = []
    for obs in observations:
        gap, itl = obs.gap_and_itl()
        gaps.append(gap * 1e3)
        itls.append(itl * 1e3)
        downtimes.append(max(0.0, gap - itl) * 1e3)
        info = obs.migration
        statuses.append(info.get("status", ""))
        totals.append(info.get("total_s", gap) * 1e3)
        stopped.append(info.get("stopped_s", 0.0) * 1e3)
        blocks = info.get("blocks", 0)
        sizes.append(blocks * modelled_bytes_per_block if modelled_bytes_per_block
                     else info.get("bytes", 0))
        stages.append(info.get("stages", 0))
    row: dict[str, Any] = {
        "context_tokens": context, "mode": mode, "kv": kv, "executor": executor,
        "downtime_ms": round(statistics.median(downtimes), 2),
        "gap_ms": round(statistics.median(gaps), 2),
        "itl_ms": round(statistics.median(itls), 2),
        "total_ms": round(statistics.median(totals), 2),
        "bytes": int(statistics.median(sizes)),
        "stages": int(statistics.median(stages)),
        "runs": len(observations),
        "committed": statuses.count("committed"),
    }
    if mode == "live":
        row["stopped_ms"] = round(statistics.median(stopped), 2)
    if link is not None:
        row["link_gbytes_per_s"] = link
    return row


async def _repeat_live(a: Replica, b: Replica, context: int, repeat: int,
                       config: MigrationConfig, seed0: int) -> list[Observation]:
    out = []
    for i in range(repeat):
        obs = await run_live(a, b, context, seed0 + i, config)
        if obs.migration.get("status") != "committed":
            raise RuntimeError(f"live migration at {context} tokens: {obs.migration}")
        out.append(obs)
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    contexts = [int(c) for c in args.contexts.split(",") if c]
    tiny_contexts = [int(c) for c in args.tiny_contexts.split(",") if c]
    links = [float(x) for x in args.links.split(",") if x]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    modelled_block = LLAMA3_8B_KV_BYTES_PER_TOKEN * BLOCK_SIZE
    with replica_pair("emulated") as (a, b):
        # Untimed: connections, imports and caches warm up before anything is measured.
        asyncio.run(run_live(a, b, 256, 1, MigrationConfig()))
        for context in contexts:
            seed = context * 1000
            real = asyncio.run(_repeat_live(a, b, context, args.repeat, MigrationConfig(), seed))
            rows.append(_row(context, "live", "real", "emulated", None, real))
            _progress(rows[-1])
            for link in links:
                config = MigrationConfig(link=LinkModel(link, modelled_block))
                modelled = asyncio.run(
                    _repeat_live(a, b, context, args.repeat, config, seed + 100 * int(link * 4)))
                rows.append(_row(context, "live", "modelled", "emulated", link, modelled,
                                 modelled_block))
                _progress(rows[-1])
            replays = [asyncio.run(run_replay(a, b, context, seed + 900 + i))
                       for i in range(args.repeat)]
            rows.append(_row(context, "replay", "modelled", "emulated", None, replays))
            _progress(rows[-1])
    if tiny_contexts:
        # The tiny model's decode step is ~0.3 ms of modelled time: slowed down so that the
        # request is still decoding when the move is ordered.
        with replica_pair("tiny", args.tiny_speedup) as (a, b):
            asyncio.run(run_live(a, b, 256, 1, MigrationConfig()))
            for context in tiny_contexts:
                real = asyncio.run(_repeat_live(a, b, context, args.repeat, MigrationConfig(),
                                                context * 7))
                rows.append(_row(context, "live", "real", "tiny", None, real))
                _progress(rows[-1])
    loopback = _loopback(args)
    live = [r for r in rows if r["mode"] == "live"]
    result: dict[str, Any] = {
        "results": rows,
        **loopback,
        "downtime_goal_ms": DOWNTIME_GOAL_MS,
        "max_live_downtime_ms": max(r["downtime_ms"] for r in live),
        "config": {"contexts": contexts, "tiny_contexts": tiny_contexts, "links": links,
                   "repeat": args.repeat, "tokens_before_move": TOKENS_BEFORE_MOVE,
                   "tiny_speedup": args.tiny_speedup,
                   "max_stages": MigrationConfig().max_stages,
                   "last_stage_max_blocks": MigrationConfig().last_stage_max_blocks,
                   "modelled_kv_bytes_per_token": LLAMA3_8B_KV_BYTES_PER_TOKEN,
                   "engine_profile": "h100-llama3-8b (emulated), tiny-cpu (tiny)"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return result


def _loopback(args: argparse.Namespace) -> dict[str, Any]:
    loopback = measure_loopback(rounds=args.loopback_rounds,
                                batch_bytes=args.loopback_batch_bytes)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in loopback.items()}


def _progress(row: dict[str, Any]) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for row in result["results"]:
        label = f"{row['mode']} · {row['kv']} · {row['executor']}"
        if "link_gbytes_per_s" in row:
            label += f" · {row['link_gbytes_per_s']:g} GB/s"
        series.setdefault(label, []).append((row["context_tokens"], row))
    for label, points in series.items():
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        style = "--" if label.startswith("replay") else "-"
        # The raw gap (downtime = gap - ordinary inter-token gap, often ~0: not on a log axis).
        left.plot(xs, [p[1]["gap_ms"] for p in points], style, marker="o", label=label)
        right.plot(xs, [p[1]["total_ms"] for p in points], style, marker="o", label=label)
    emulated = sorted((r["context_tokens"], r["itl_ms"]) for r in result["results"]
                      if r["executor"] == "emulated" and r["mode"] == "live"
                      and r["kv"] == "real")
    if emulated:
        left.plot([c for c, _ in emulated], [i for _, i in emulated], color="grey", lw=0.8,
                  ls="-.", label="ordinary token gap (emulated)")
    goal = result.get("downtime_goal_ms", DOWNTIME_GOAL_MS)
    left.axhline(goal, color="grey", lw=0.8, ls=":", label=f"{goal:g} ms goal (downtime)")
    for ax, title in ((left, "gap in the client's token stream at the move (ms)"),
                      (right, "total migration time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"llmfleet live migration vs token replay (KV over gRPC on loopback "
                 f"{result['grpc_loopback_gbytes_per_s']} GB/s, plain TCP "
                 f"{result['tcp_loopback_gbytes_per_s']} GB/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.sink:
        kind, port_file = args.sink.split(",", 1)
        asyncio.run(_serve_sink(kind, port_file))
        return 0
    if args.loopback_client:
        return _client_main(args.loopback_client)
    if args.plot_only:
        out = Path(args.out)
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    if args.only == "grpc_loopback":
        print(json.dumps(_loopback(args)))
        return 0
    result = run_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result if args.json else {"written": str(out)}, indent=None))
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--tiny-contexts", default="1024",
                        help="contexts also run with the tiny executor (real K/V tensors)")
    parser.add_argument("--links", default=",".join(f"{x:g}" for x in LINKS_GBYTES_PER_S),
                        help="modelled link bandwidths, GB/s")
    parser.add_argument("--tiny-speedup", type=float, default=0.1,
                        help="the tiny replicas' clock speed (below 1: slower than modelled)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (medians)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--json", action="store_true", help="print the whole result")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot of an existing --out file")
    parser.add_argument("--loopback-rounds", type=int, default=7,
                        help="rounds of the gRPC/TCP loopback throughput (1 GiB each; medians)")
    parser.add_argument("--loopback-batch-bytes", type=int, default=DEFAULT_MAX_BATCH_BYTES,
                        help="KV payload bytes per PushBlocks message in the loopback run")
    parser.add_argument("--only", choices=["grpc_loopback"], default=None,
                        help="run only this part and print it (writes nothing)")
    parser.add_argument("--sink", default="", help=argparse.SUPPRESS)
    parser.add_argument("--loopback-client", default="", help=argparse.SUPPRESS)


def register_bench(bench_subparsers: Any) -> None:
    parser = bench_subparsers.add_parser(
        "migration", help="live migration vs token replay by context length",
        description=__doc__.splitlines()[0] if __doc__ else None)
    _add_arguments(parser)
    parser.set_defaults(func=main)


if __name__ == "__main__":
    cli = argparse.ArgumentParser()
    _add_arguments(cli)
    sys.exit(main(cli.parse_args()))
