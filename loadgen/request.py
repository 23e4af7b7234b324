"""The request record every workload generator and trace reader produces.

A ``TraceRequest`` says when a request arrives and what it asks for. Its prompt is usually
described, not stored: a tuple of ``Segment``s, each a deterministic run of byte-level token
ids derived from an integer key. Two segments with the same key have the same tokens, and a
shorter segment is a prefix of a longer one with the same key, so requests that share keys at
the same positions share real token prefixes (what prefix caches and cache-aware routers see),
while a trace of 8,000 requests x 15k tokens stays a few megabytes until a request is sent.

Token ids are engine ids (see ``instances.tokenizer``): 0..255 only; ``EOS_TOKEN_ID`` (256)
never appears in a generated prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` deterministic token ids derived from ``key`` (and the workload seed)."""

    key: int
    length: int


def segment_key(*parts: object) -> int:
    """A stable 64-bit key for a segment named by ``parts`` (e.g. ``("mooncake", 0, 17)``)."""
    return xxhash.xxh64_intdigest(repr(parts).encode())


def segment_bytes(segment: Segment, seed: int = 0) -> bytes:
    """The token ids of ``segment`` as bytes (each byte is one token id 0..255).

    SHAKE-128 is an extendable-output function: the first n bytes do not depend on how many
    are asked for, which gives the prefix property that partial trailing blocks need.
    """
    if segment.length <= 0:
        return b""
    material = seed.to_bytes(8, "little", signed=True) + segment.key.to_bytes(8, "little")
    return hashlib.shake_128(material).digest(segment.length)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload.

    ``arrival_s`` is seconds from the start of the workload. The prompt is
    ``prompt_token_ids`` when the source had real tokens, else the concatenation of
    ``segments`` (whose lengths sum to ``prompt_len``). ``hash_ids`` keeps a Mooncake
    trace's block ids for reference; ``session_id``/``turn`` identify multi-turn
    conversations; ``group`` names a shared-prefix group (or Zipf prefix) when there is one.
    """

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    segments: tuple[Segment, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None
    session_id: str | None = None
    turn: int = 0
    group: str | None = None
    hash_ids: tuple[int, ...] = ()
    seed: int = 0
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"{self.request_id}: prompt_len must be positive")
        if self.output_len <= 0:
            raise ValueError(f"{self.request_id}: output_len must be positive")
        if self.prompt_token_ids is not None:
            if len(self.prompt_token_ids) != self.prompt_len:
                raise ValueError(f"{self.request_id}: prompt_token_ids length != prompt_len")
        elif sum(s.length for s in self.segments) != self.prompt_len:
            raise ValueError(f"{self.request_id}: segment lengths do not sum to prompt_len")

    def token_ids(self) -> list[int]:
        """The prompt's engine token ids (materialised on demand; nothing is cached)."""
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        return list(b"".join(segment_bytes(s, self.seed) for s in self.segments))

    def with_arrival(self, arrival_s: float, request_id: str | None = None) -> TraceRequest:
        """A copy arriving at ``arrival_s`` (and optionally renamed)."""
        return TraceRequest(
            request_id=self.request_id if request_id is None else request_id,
            arrival_s=arrival_s,
            prompt_len=self.prompt_len,
            output_len=self.output_len,
            segments=self.segments,
            prompt_token_ids=self.prompt_token_ids,
            session_id=self.session_id,
            turn=self.turn,
            group=self.group,
            hash_ids=self.hash_ids,
            seed=self.seed,
            extra=self.extra,
        )


def unique_segments(namespace: str, index: int, length: int) -> tuple[Segment, ...]:
    """A prompt shared with nobody: one segment keyed by ``(namespace, index)``."""
    return (Segment(segment_key(namespace, index), length),)


class PrefixOracle:
    """An infinite prefix cache shared by everyone, at ``block_size`` granularity.

    ``observe(request)`` returns how many of the request's prompt tokens were already cached
    (the longest run of whole blocks whose token prefix an earlier observed request had) and
    then caches the request's blocks. Segments make this cheap: a block's identity is the
    chain of segment keys and offsets that produced it, so token ids are not materialised
    unless a request carries real tokens.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._seen: set[int] = set()

    def observe(self, request: TraceRequest) -> int:
        chain = 0
        hit_blocks = 0
        missed = False
        for block_digest in _block_digests(request, self.block_size):
            chain = xxhash.xxh64_intdigest(chain.to_bytes(8, "little") + block_digest)
            if not missed and chain in self._seen:
                hit_blocks += 1
            else:
                missed = True
                self._seen.add(chain)
        return hit_blocks * self.block_size


def shared_prefix_tokens(requests: Sequence[TraceRequest], block_size: int) -> int:
    """Prompt tokens an infinite shared prefix cache would have served, in arrival order."""
    oracle = PrefixOracle(block_size)
    return sum(oracle.observe(r) for r in sorted(requests, key=lambda r: r.arrival_s))


def _block_digests(request: TraceRequest, block_size: int) -> list[bytes]:
    """A digest per full block of ``request``'s prompt, equal iff the block tokens are equal
    (up to hash collisions), computed from segment descriptions when possible."""
    n_blocks = request.prompt_len // block_size
    if request.prompt_token_ids is not None:
        data = bytes(request.prompt_token_ids) if max(request.prompt_token_ids) < 256 else None
        if data is None:
            ids = request.prompt_token_ids
            return [
                xxhash.xxh64_digest(repr(ids[i * block_size:(i + 1) * block_size]).encode())
                for i in range(n_blocks)
            ]
        return [
            xxhash.xxh64_digest(data[i * block_size:(i + 1) * block_size])
            for i in range(n_blocks)
        ]
    # Describe each block by the (key, start, end) pieces of segments covering it. A segment's
    # content depends only on its key and the offset inside it (prefix property), so equal
    # descriptions mean equal tokens.
    digests: list[bytes] = []
    pieces: list[tuple[int, int, int]] = []
    filled = 0
    for segment in request.segments:
        offset = 0
        while offset < segment.length:
            take = min(block_size - filled, segment.length - offset)
            pieces.append((segment.key, offset, offset + take))
            offset += take
            filled += take
            if filled == block_size:
                digests.append(xxhash.xxh64_digest(repr(pieces).encode()))
                pieces = []
                filled = 0
    return digests[:n_blocks]
