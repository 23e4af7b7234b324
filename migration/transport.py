"""gRPC plumbing shared by the migration agent, the coordinator and the benchmark.

KV blocks travel in ``PushBlocks`` as ``BlockBatch`` messages of about
``DEFAULT_MAX_BATCH_BYTES`` of payload (one ``bytes`` field holding the blocks' payloads back
to back). The wire format is the ``.proto``'s, but neither end lets protobuf touch the
payload: Python protobuf copies a ``bytes`` field on every set, parse and read, which made
the stream CPU-bound at a third of a GB/s. Instead the method is called and served with
identity (de)serializers and this module's codec:

* ``encode_batch`` serializes the batch's small header fields with protobuf and appends the
  ``payload`` field (tag, length, bytes) itself, joining the blocks' payloads straight into
  the message: one copy on the way out (gRPC's own into its send buffer is the other).
* ``decode_batch`` walks the message's top-level fields (a handful: the payload is one
  length-delimited field), parses the rest as a ``BlockBatch`` and returns the payload as a
  ``memoryview`` of the received message: no copy on the way in beyond gRPC's own.

Any protobuf implementation can still produce or read these messages (fields may come in
any order; the last ``payload`` wins, as in protobuf). ``serve_migration_agent`` registers
the generated service with only ``PushBlocks``'s request deserializer replaced;
``ChannelPool.push_blocks`` is the matching client call.

Message size limits are lifted, the HTTP/2 frame size raised to its maximum and the socket
read in MiB chunks. ``tune_allocator`` keeps the large receive buffers in the heap (see its
docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from proto import migration_pb2 as pb
from proto import migration_pb2_grpc as pb_grpc

# Per message. Larger ones measured no faster on loopback with this codec, and a batch is
# exported (source) and imported (destination) in one go on the engine's event loop: the
# emulated executor derives or checks ~30-50 us per 4 KiB block, 1 MiB is ~10 ms of it.
DEFAULT_MAX_BATCH_BYTES = 1 << 20
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    # Read the socket in MiBs, not the default KiBs: fewer reads, and fewer, larger slices
    # for the Python side to copy into a message (measured: ~10% less receiver CPU).
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]

_SERVICE = pb.DESCRIPTOR.services_by_name["MigrationAgent"]
PUSH_BLOCKS_METHOD = f"/{_SERVICE.full_name}/PushBlocks"
_PAYLOAD_FIELD = pb.BlockBatch.DESCRIPTOR.fields_by_name["payload"].number
_PAYLOAD_TAG = bytes([(_PAYLOAD_FIELD << 3) | 2])  # length-delimited; field number < 16

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD_BYTES = 256 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in a BlockBatch")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long in a BlockBatch")


def encode_batch(header: pb.BlockBatch, payloads: Iterable[bytes]) -> bytes:
    """A serialized ``BlockBatch``: ``header`` (its ``payload`` must be empty) followed by
    the ``payload`` field holding ``payloads`` back to back, joined in one copy."""
    if header.payload:
        raise ValueError("encode_batch takes the payload separately")
    parts = list(payloads)
    size = sum(len(p) for p in parts)
    return b"".join([header.SerializeToString(), _PAYLOAD_TAG, _varint(size), *parts])


def decode_batch(message: bytes) -> tuple[pb.BlockBatch, memoryview]:
    """Split a serialized ``BlockBatch`` into its header (every field but ``payload``,
    parsed) and its payload, a view of ``message`` (not copied). ValueError if malformed."""
    data = memoryview(message)
    pos = 0
    payload = data[0:0]
    rest: list[memoryview] = []  # the header's fields, as they lie in the message
    start = 0
    while pos < len(data):
        field_start = pos
        key, pos = _read_varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            if key >> 3 == _PAYLOAD_FIELD:
                payload = data[pos:pos + length]
                if field_start > start:
                    rest.append(data[start:field_start])
                start = pos + length
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire_type} in a BlockBatch")
        if pos > len(data):
            raise ValueError("truncated BlockBatch")
    if start < len(data):
        rest.append(data[start:])
    # Only the header's few KiB are copied (usually one run: the payload comes last).
    return pb.BlockBatch.FromString(b"".join(rest)), payload


def serve_migration_agent(servicer: pb_grpc.MigrationAgentServicer, server: Any) -> None:
    """Register ``servicer`` on ``server`` (a ``grpc.aio.Server``) like the generated
    ``add_MigrationAgentServicer_to_server``, except that ``PushBlocks`` receives each
    message as raw ``bytes`` (to be split with ``decode_batch``)."""
    collected = _CollectHandlers()
    pb_grpc.add_MigrationAgentServicer_to_server(servicer, collected)
    handlers = dict(collected.handlers)
    if "PushBlocks" not in handlers:
        raise RuntimeError("the generated MigrationAgent registration changed shape")
    handlers["PushBlocks"] = handlers["PushBlocks"]._replace(request_deserializer=None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)


class _CollectHandlers:
    """Stands in for a server to capture the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def push_blocks_call(channel: grpc.aio.Channel) -> grpc.aio.StreamUnaryMultiCallable:
    """``PushBlocks`` on ``channel``, sending messages made by ``encode_batch`` as they are."""
    return channel.stream_unary(PUSH_BLOCKS_METHOD, request_serializer=None,
                                response_deserializer=pb.PushReply.FromString)


def tune_allocator() -> bool:
    """Keep large allocations in glibc's heap and the heap from shrinking eagerly.

    Every received gRPC message is a few fresh MiB (gRPC's read slices, then the Python
    ``bytes``). By default glibc serves those from ``mmap`` and gives them back at once, so
    each message pays page faults on memory it just had: measured, about a fifth of the
    receiver's CPU. Raising the mmap and trim thresholds lets the same memory be reused.
    Process-wide; a no-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL(None).mallopt
        return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                    and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return False


class ChannelPool:
    """One gRPC channel per peer address (``host:port``), created on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def stub(self, address: str) -> pb_grpc.MigrationAgentStub:
        return pb_grpc.MigrationAgentStub(self.channel(address))

    def push_blocks(self, address: str) -> grpc.aio.StreamUnaryMultiCallable:
        """``PushBlocks`` to a peer with the zero-copy codec (``encode_batch`` messages)."""
        return push_blocks_call(self.channel(address))

    async def forget(self, address: str) -> None:
        """Close the channel to a peer (after it died: the next call reconnects)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace=None)
