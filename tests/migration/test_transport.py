"""The zero-copy ``PushBlocks`` codec (``migration.transport``): its messages are ordinary
``BlockBatch``es on the wire, so the agent serves any protobuf client and protobuf reads
what the agent sends; the payload is never copied out of the received message."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from instances.engine.block_manager import hash_block_tokens
from instances.engine.emulated import DEFAULT_PAYLOAD_BYTES, block_payload
from migration.transport import (
    ChannelPool,
    decode_batch,
    encode_batch,
    push_blocks_call,
)
from proto import migration_pb2 as pb
from tests.migration.fleet import start_replica, stop_replicas

pytestmark = pytest.mark.timeout(60)

BLOCK_SIZE = 16


def _header(**fields: object) -> pb.BlockBatch:
    base: dict[str, object] = dict(
        migration_id="m-1", first_block=3, block_hashes=[7, 2**64 - 1], has_parent=True,
        parent_hash=2**63 + 5, token_ids=bytes(range(128)), payload_bytes_per_block=5)
    base.update(fields)
    return pb.BlockBatch(**base)  # type: ignore[arg-type]


def test_encoded_batch_is_a_plain_block_batch() -> None:
    header = _header()
    message = encode_batch(header, [b"hello", b"world"])
    parsed = pb.BlockBatch.FromString(message)
    expected = pb.BlockBatch()
    expected.CopyFrom(header)
    expected.payload = b"helloworld"
    assert parsed == expected


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 4097])
def test_decode_reads_any_protobuf_serialization(payload: bytes) -> None:
    batch = _header(payload=payload)
    message = batch.SerializeToString()  # protobuf puts the payload between other fields
    header, view = decode_batch(message)
    assert bytes(view) == payload
    batch.payload = b""
    assert header == batch


def test_decode_returns_a_view_of_the_message_not_a_copy() -> None:
    message = encode_batch(_header(), [b"a" * 1000, b"b" * 1000])
    header, view = decode_batch(message)
    assert view.obj is message and len(view) == 2000
    assert bytes(view[995:1005]) == b"aaaaabbbbb"
    assert header.block_hashes == [7, 2**64 - 1] and not header.payload


def test_a_later_payload_field_wins_as_in_protobuf() -> None:
    message = encode_batch(_header(), [b"old"]) + encode_batch(pb.BlockBatch(), [b"newer"])
    header, view = decode_batch(message)
    assert bytes(view) == pb.BlockBatch.FromString(message).payload == b"newer"
    assert header.migration_id == "m-1"


def test_malformed_messages_are_refused() -> None:
    message = encode_batch(_header(), [b"payload!"])
    with pytest.raises(ValueError):
        decode_batch(message[:-3])  # payload cut short
    with pytest.raises(ValueError):
        decode_batch(b"\x0b\x00")  # a group: never in a BlockBatch
    with pytest.raises(ValueError):
        encode_batch(_header(payload=b"inline"), [b"x"])


def _emulated_blocks(count: int) -> tuple[pb.BlockBatch, list[bytes]]:
    """``count`` full blocks of a request, as the source's engine would export them."""
    tokens = np.arange(100, 100 + count * BLOCK_SIZE, dtype="<i4").reshape(count, BLOCK_SIZE)
    hashes, payloads, parent = [], [], None
    for row in tokens.tolist():
        block_hash = hash_block_tokens(parent, row)
        hashes.append(block_hash)
        payloads.append(block_payload(row, parent))
        parent = block_hash
    header = pb.BlockBatch(first_block=0, block_hashes=hashes, token_ids=tokens.tobytes(),
                           payload_bytes_per_block=DEFAULT_PAYLOAD_BYTES)
    return header, payloads


@pytest.mark.parametrize("client", ["zero_copy", "generated_stub"])
async def test_agent_imports_blocks_from_either_kind_of_client(client: str) -> None:
    replica = await start_replica("dst", executor="emulated", speedup=1.0)
    pool = ChannelPool()
    try:
        header, payloads = _emulated_blocks(6)
        header.migration_id = f"mig-{client}"
        halves = [(0, 4), (4, 6)]  # two messages: the second's parent is the first's last
        messages = []
        for start, end in halves:
            part = pb.BlockBatch(
                migration_id=header.migration_id, first_block=start,
                block_hashes=header.block_hashes[start:end], has_parent=start > 0,
                parent_hash=header.block_hashes[start - 1] if start else 0,
                token_ids=header.token_ids[start * BLOCK_SIZE * 4:end * BLOCK_SIZE * 4],
                payload_bytes_per_block=DEFAULT_PAYLOAD_BYTES)
            messages.append((part, payloads[start:end]))
        if client == "zero_copy":
            call = push_blocks_call(pool.channel(replica.address))

            async def raw() -> AsyncIterator[bytes]:
                for part, blocks in messages:
                    yield encode_batch(part, blocks)

            reply = await call(raw())
        else:
            async def batches() -> AsyncIterator[pb.BlockBatch]:
                for part, blocks in messages:
                    part.payload = b"".join(blocks)
                    yield part

            reply = await pool.stub(replica.address).PushBlocks(batches())
        assert reply.error == ""
        assert (reply.blocks_received, reply.blocks_copied) == (6, 6)
        assert reply.bytes_received == 6 * DEFAULT_PAYLOAD_BYTES
        assert replica.engine.core.num_pinned_blocks == 6
        aborted = await pool.stub(replica.address).Abort(
            pb.AbortRequest(migration_id=header.migration_id))
        assert aborted.known and not aborted.committed
        replica.assert_no_leaks()
    finally:
        await pool.close()
        await stop_replicas([replica])


async def test_agent_rejects_a_corrupted_payload_and_keeps_nothing() -> None:
    replica = await start_replica("dst", executor="emulated", speedup=1.0)
    pool = ChannelPool()
    try:
        header, payloads = _emulated_blocks(3)
        header.migration_id = "mig-bad"
        payloads[1] = bytes(len(payloads[1]))  # not the block's KV

        async def raw() -> AsyncIterator[bytes]:
            yield encode_batch(header, payloads)

        reply = await push_blocks_call(pool.channel(replica.address))(raw())
        assert reply.error.startswith("bad_block") and reply.blocks_received == 0
        await pool.stub(replica.address).Abort(pb.AbortRequest(migration_id="mig-bad"))
        replica.assert_no_leaks()
    finally:
        await pool.close()
        await stop_replicas([replica])
