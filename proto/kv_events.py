"""KV cache events in vLLM's wire format over ZMQ PUB/SUB.

Wire format (as vLLM's ``ZmqEventPublisher``): multipart ``[topic, seq (8 bytes, big
endian), payload]``; the payload is a msgpack array ``[ts, [event, ...]]`` (optionally with a
data-parallel rank) where each event is a tagged array:
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
``["BlockRemoved", block_hashes, medium]`` or ``["AllBlocksCleared"]``.

The reference engine publishes with its instance id as topic; a vLLM replica can be told the same
topic. The gateway's subscriber decodes batches into ``KVEvent`` and feeds the policy's
precise cache view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger("llmfleet.kv_events")


@dataclass(frozen=True)
class KVEvent:
    """vLLM-format KV cache event (BlockStored / BlockRemoved / AllBlocksCleared)."""

    kind: str  # "BlockStored" | "BlockRemoved" | "AllBlocksCleared"
    block_hashes: tuple[int, ...] = ()
    parent_block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int = 0

MEDIUM = "GPU"


def encode_batch(ts: float, events: Sequence[KVEvent]) -> bytes:
    """One vLLM ``KVEventBatch`` payload."""
    wire: list[list[Any]] = []
    for e in events:
        if e.kind == "BlockStored":
            wire.append(["BlockStored", list(e.block_hashes), e.parent_block_hash,
                         list(e.token_ids), e.block_size, None, MEDIUM])
        elif e.kind == "BlockRemoved":
            wire.append(["BlockRemoved", list(e.block_hashes), MEDIUM])
        elif e.kind == "AllBlocksCleared":
            wire.append(["AllBlocksCleared"])
        else:
            raise ValueError(f"unknown KV event kind {e.kind!r}")
    return bytes(msgpack.packb([ts, wire], use_bin_type=True))


def _block_hash(value: Any) -> int:
    """An engine block hash as an int: vLLM sends ints, or sha256 digests as bytes (folded to
    64 bits as vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` does)."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big") & 0xFFFFFFFFFFFFFFFF
    return int(value)


def _event_fields(raw: Any) -> tuple[str, list[Any]]:
    """An event's tag and positional fields, from either wire form vLLM has used: a tagged
    array (``["BlockStored", hashes, ...]``) or, since vLLM's events stopped being
    array-like, a map with a ``type`` tag (``{"type": "BlockStored", "block_hashes": ...}``).
    """
    if isinstance(raw, dict):
        tag = raw.get("type", "")
        if tag == "BlockStored":
            return tag, [raw.get("block_hashes", []), raw.get("parent_block_hash"),
                         raw.get("token_ids", []), raw.get("block_size", 0)]
        if tag == "BlockRemoved":
            return tag, [raw.get("block_hashes", [])]
        return str(tag), []
    return str(raw[0]), list(raw[1:])


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent]]:
    """Parse a ``KVEventBatch`` payload; unknown event tags are skipped."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    ts, raw_events = float(batch[0]), batch[1]
    events: list[KVEvent] = []
    for raw in raw_events:
        tag, fields = _event_fields(raw)
        if tag == "BlockStored":
            events.append(KVEvent("BlockStored", tuple(_block_hash(h) for h in fields[0]),
                                  None if fields[1] is None else _block_hash(fields[1]),
                                  tuple(int(t) for t in fields[2]), int(fields[3])))
        elif tag == "BlockRemoved":
            events.append(KVEvent("BlockRemoved", tuple(_block_hash(h) for h in fields[0])))
        elif tag == "AllBlocksCleared":
            events.append(KVEvent("AllBlocksCleared"))
    return ts, events


class KVEventPublisher:
    """A PUB socket an engine publishes its KV events on, numbered by sequence."""

    def __init__(self, topic: str, endpoint: str = "tcp://127.0.0.1:*") -> None:
        self._context: Any = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        if endpoint.endswith(":*") or endpoint.endswith(":0"):
            host = endpoint.rsplit(":", 1)[0]
            port = self._socket.bind_to_random_port(host)
            self.endpoint = f"{host}:{port}"
        else:
            self._socket.bind(endpoint)
            self.endpoint = endpoint
        self.topic = topic.encode()
        self._seq = 0

    def publish(self, ts: float, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        self._socket.send_multipart(
            [self.topic, self._seq.to_bytes(8, "big"), encode_batch(ts, events)],
            flags=zmq.NOBLOCK)
        self._seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)


KVEventSink = Callable[[str, Iterable[KVEvent]], None]


class KVEventSubscriber:
    """Subscribes to many instances' KV event endpoints and hands events to ``sink``.

    ``sync(endpoints)`` connects new instances and drops gone ones; a sequence gap (events
    lost, e.g. after a slow consumer) resets that instance's view with AllBlocksCleared,
    since a view missing removals is worse than an empty one.
    """

    def __init__(self, sink: KVEventSink) -> None:
        self._sink = sink
        self._context = zmq.asyncio.Context.instance()
        self._sockets: dict[str, tuple[str, zmq.asyncio.Socket, asyncio.Task[None]]] = {}
        self._last_seq: dict[str, int] = {}
        self.batches = 0
        self.sink_errors: dict[str, int] = {}  # instance id -> batches its sink refused

    def sync(self, endpoints: dict[str, str]) -> None:
        for instance_id in list(self._sockets):
            if endpoints.get(instance_id) != self._sockets[instance_id][0]:
                self._drop(instance_id)
        for instance_id, endpoint in endpoints.items():
            if endpoint and instance_id not in self._sockets:
                socket = self._context.socket(zmq.SUB)
                socket.setsockopt(zmq.LINGER, 0)
                socket.setsockopt(zmq.SUBSCRIBE, b"")
                socket.connect(endpoint)
                task = asyncio.get_running_loop().create_task(self._read(instance_id, socket))
                self._sockets[instance_id] = (endpoint, socket, task)

    def _drop(self, instance_id: str) -> None:
        _, socket, task = self._sockets.pop(instance_id)
        task.cancel()
        socket.close(linger=0)
        self._last_seq.pop(instance_id, None)

    async def _read(self, instance_id: str, socket: zmq.asyncio.Socket) -> None:
        while True:
            frames = await socket.recv_multipart()
            if len(frames) != 3:
                continue
            seq = int.from_bytes(frames[1], "big")
            last = self._last_seq.get(instance_id)
            events: list[KVEvent] = []
            if last is not None and seq != last + 1:
                log.warning("KV events from %s: gap %s -> %s; resetting view", instance_id,
                            last, seq)
                events.append(KVEvent("AllBlocksCleared"))
            self._last_seq[instance_id] = seq
            try:
                events.extend(decode_batch(frames[2])[1])
            except (ValueError, IndexError, TypeError, msgpack.UnpackException) as exc:
                log.warning("bad KV event batch from %s: %s", instance_id, exc)
                continue
            self.batches += 1
            try:
                self._sink(instance_id, events)
            except Exception as exc:
                # A view that cannot take these events (e.g. a block size other than the
                # policy's) must not end the subscription: say so once per instance.
                if instance_id not in self.sink_errors:
                    log.warning("KV events from %s not applied: %r", instance_id, exc)
                self.sink_errors[instance_id] = self.sink_errors.get(instance_id, 0) + 1

    async def close(self) -> None:
        for instance_id in list(self._sockets):
            self._drop(instance_id)
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
