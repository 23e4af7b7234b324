"""The compiled routing kernels (``router/policy/_fastpath.c``) against plain definitions."""

from __future__ import annotations

import platform
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy._fastpath import PrefixLru
from router.policy.hashing import PrefixHasher


def reference_prefix_hashes(
    hasher: PrefixHasher, tokens: np.ndarray, start_block: int = 0, start_prefix: int = 0
) -> np.ndarray:
    """The hash as hashing.py defines it, in numpy: multilinear per block over little-endian
    uint64 words, XOR a per-position salt, running sum mod 2^64."""
    blocks = len(tokens) // hasher.block_size
    words = np.ascontiguousarray(tokens[: blocks * hasher.block_size], dtype="<i4")
    words = words.view(np.uint64).reshape(blocks, hasher.block_size // 2)
    salt = hasher._salts(start_block, blocks)
    with np.errstate(over="ignore"):
        block_hashes = (words @ hasher._mult) ^ salt
        return np.add.accumulate(block_hashes) + np.uint64(start_prefix)


@pytest.fixture(params=[True, False], ids=["vector", "scalar"])
def kernels(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a test with the SIMD hashing kernel (where this CPU has it) and without."""
    from router.policy._fastpath import set_vector_kernels, vector_kernels

    previous = set_vector_kernels(request.param)
    yield vector_kernels()
    set_vector_kernels(previous)


@pytest.mark.parametrize("block_size", [2, 16, 32])
@pytest.mark.parametrize("num_tokens", [0, 1, 15, 16, 17, 127, 128, 1000, 8192])
def test_prefix_hashes_match_the_numpy_definition(
    block_size: int, num_tokens: int, kernels: bool
) -> None:
    rng = np.random.default_rng(num_tokens + block_size)
    hasher = PrefixHasher(block_size)
    tokens = rng.integers(-(2**31), 2**31 - 1, num_tokens, dtype=np.int64).astype(np.int32)
    expected = reference_prefix_hashes(hasher, tokens)
    assert np.array_equal(hasher.hashes(tokens), expected)
    # A continued chain: the hashes of blocks d+1... after a known prefix of d blocks.
    if len(expected) > 3:
        start = 3 * block_size
        continued = hasher.hashes(tokens[start:], start_block=3, start_prefix=int(expected[2]))
        assert np.array_equal(continued, expected[3:])


def test_the_vector_kernel_is_used_where_the_cpu_has_it() -> None:
    from router.policy._fastpath import vector_kernels

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if sys.platform == "linux" and cpuinfo.exists() else ""
    if platform.machine() == "x86_64" and " avx512dq" in flags and " avx512f" in flags:
        assert vector_kernels()


def test_prefix_hashes_accept_any_integer_array_and_views() -> None:
    rng = np.random.default_rng(1)
    hasher = PrefixHasher(16)
    tokens = rng.integers(0, 128_000, 4096).astype(np.int32)
    expected = hasher.hashes(tokens)
    assert np.array_equal(hasher.hashes(tokens.astype(np.int64)), expected)
    assert np.array_equal(hasher.hashes(tokens.astype(">i4")), expected)
    spaced = np.empty(8192, dtype=np.int32)
    spaced[::2] = tokens
    assert np.array_equal(hasher.hashes(spaced[::2]), expected)  # not contiguous
    # Past the precomputed salt table (64k tokens): the table grows, values continue.
    long_prompt = rng.integers(0, 128_000, 70_000).astype(np.int32)
    assert np.array_equal(hasher.hashes(long_prompt),
                          reference_prefix_hashes(hasher, long_prompt))


def test_prefix_hashes_kernel_rejects_mismatched_buffers() -> None:
    from router.policy._fastpath import prefix_hashes

    mult = np.ones(8, dtype=np.uint64)
    salt = np.zeros(4, np.uint64)
    with pytest.raises(ValueError):  # fewer tokens than the blocks asked for
        prefix_hashes(np.zeros(20, np.int32), mult, salt, 0, np.empty(2, np.uint64), 0)
    with pytest.raises(ValueError):  # salt shorter than the blocks
        prefix_hashes(np.zeros(64, np.int32), mult, salt, 3, np.empty(2, np.uint64), 0)
    with pytest.raises(ValueError):
        prefix_hashes(np.zeros(64, np.int32), mult, salt, -1, np.empty(2, np.uint64), 0)
    with pytest.raises(TypeError):
        prefix_hashes([1, 2], mult, salt, 0, np.empty(1, np.uint64), 0)


class ModelLru:
    """PrefixLru's contract as plain Python: an OrderedDict of counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[int, int] = OrderedDict()

    def record(self, hashes: list[int]) -> None:
        for key in reversed(hashes):
            if key in self.entries:
                self.entries.move_to_end(key)
            else:
                self.entries[key] = 1
        self.evict()

    def evict(self) -> None:
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def add(self, key: int) -> None:
        if key in self.entries:
            self.entries[key] += 1
        else:
            self.entries[key] = 1

    def discard(self, key: int) -> None:
        if key in self.entries:
            self.entries[key] -= 1
            if not self.entries[key]:
                del self.entries[key]

    def cached_blocks(self, hashes: list[int]) -> int:
        """Longest held prefix, by a linear scan (the view is closed under prefixes)."""
        count = 0
        while count < len(hashes) and hashes[count] in self.entries:
            count += 1
        return count


# Keys from a small pool collide in the table often; some share their home slot by design.
_keys = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1),
                  st.sampled_from([0, 2**63, 2**64 - 1, 2**32]))
_ops = st.lists(st.one_of(
    st.tuples(st.just("record"), st.lists(_keys, max_size=30, unique=True)),
    st.tuples(st.just("add"), _keys),
    st.tuples(st.just("discard"), _keys),
    st.tuples(st.just("capacity"), st.integers(0, 60)),
    st.tuples(st.just("clear"), st.none()),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 50), ops=_ops)
def test_prefix_lru_behaves_like_an_ordered_dict(capacity: int, ops: list) -> None:
    lru, model = PrefixLru(capacity), ModelLru(capacity)
    for op, arg in ops:
        if op == "record":
            hashes = np.array(arg, dtype=np.uint64)
            lru.record(hashes)
            model.record(arg)
            assert lru.cached_blocks(hashes) == model.cached_blocks(arg)
        elif op == "add":
            lru.add(arg)
            model.add(arg)
        elif op == "discard":
            lru.discard(arg)
            model.discard(arg)
        elif op == "capacity":
            lru.capacity = model.capacity = arg
            model.evict()
        else:
            lru.clear()
            model.entries.clear()
        assert lru.keys() == list(model.entries)
        assert len(lru) == len(model.entries)
        for key in list(model.entries)[:5]:
            assert key in lru and lru.count(key) == model.entries[key]


def test_prefix_lru_search_is_the_longest_held_prefix_whatever_the_hint() -> None:
    rng = np.random.default_rng(3)
    hasher = PrefixHasher(16)
    lru = PrefixLru()
    family = rng.integers(0, 128_000, 4000).astype(np.int32)
    lru.record(hasher.hashes(family[:2400]))
    prompt = np.concatenate([family[:3000], rng.integers(0, 128_000, 500).astype(np.int32)])
    hashes = hasher.hashes(prompt)
    assert all(lru.cached_blocks(hashes, hint) == 150 for hint in range(-2, len(hashes) + 3))
    assert lru.cached_blocks(hashes[:0]) == 0
    assert lru.cached_blocks(hasher.hashes(family[16:2000])) == 0


def test_prefix_lru_survives_growth_and_heavy_eviction() -> None:
    """Many keys through a small capacity: the table grows, and backward-shift deletion
    must keep every held key findable."""
    rng = np.random.default_rng(4)
    lru, model = PrefixLru(1000), ModelLru(1000)
    for _ in range(200):
        keys = rng.integers(0, 2**63, int(rng.integers(1, 200)), dtype=np.uint64)
        lru.record(keys)
        model.record(keys.tolist())
    assert lru.keys() == list(model.entries)
    held = np.array(list(model.entries), dtype=np.uint64)
    assert all(int(key) in lru for key in held)
    assert sum(int(key) in lru for key in rng.integers(0, 2**63, 1000, dtype=np.uint64)) == 0


def test_prefix_lru_rejects_what_is_not_a_key() -> None:
    lru = PrefixLru(10)
    assert -1 not in lru and 2**70 not in lru
    with pytest.raises(TypeError):
        "x" in lru  # noqa: B015
    with pytest.raises(OverflowError):
        lru.add(-5)
    with pytest.raises(ValueError):
        PrefixLru(-1)
    with pytest.raises(ValueError):
        lru.record(b"abc")  # not a whole number of uint64
    lru.discard(-5)
    lru.discard(12345)
    assert len(lru) == 0 and lru.count(7) == 0


def test_mix64_is_splitmix64s_finaliser() -> None:
    from router.policy._fastpath import mix64

    def reference(value: int) -> int:
        mask = (1 << 64) - 1
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
        return value ^ (value >> 31)

    # splitmix64's first output from seed 0 (the published test vector).
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    values = np.random.default_rng(6).integers(0, 2**64, 200, dtype=np.uint64)
    assert [mix64(int(v)) for v in values] == [reference(int(v)) for v in values]


def test_ring_index_rejects_bad_input_and_handles_an_empty_ring() -> None:
    from array import array

    from router.policy._fastpath import RingIndex

    empty = RingIndex(array("Q"), array("i"))
    assert len(empty) == 0 and empty.first(123, b"\x01") == -1 and empty.index(5) == 0
    with pytest.raises(ValueError):
        RingIndex(array("Q", [5, 3]), array("i", [0, 1]))  # not sorted
    with pytest.raises(ValueError):
        RingIndex(array("Q", [3, 5]), array("i", [0]))  # owners do not pair up
    ring = RingIndex(array("Q", [10, 20, 30]), array("i", [0, 1, 0]))
    assert ring.first(15, b"\x01\x01") == 1 and ring.first(31, b"\x01\x01") == 0  # wraps
    assert ring.first(15, b"\x01\x00") == 0 and ring.first(15, b"\x00\x00") == -1
    assert ring.first(15, b"\x01") == 0  # labels past the mask are not eligible
    with pytest.raises(OverflowError):
        ring.first(-1, b"\x01")
    with pytest.raises(IndexError):
        ring.next_distinct(3)


KEY_SEED = 0x6C6C_6D66_6C65_6574  # "llmfleet"


def reference_key_hash(hasher: PrefixHasher, tokens: np.ndarray, length: int) -> int:
    """The key hash as csrc/hashing.h defines it: mix64 of the prefix hash for a whole
    number of blocks, else xxh64 of the tokens' int32 bytes (the xxhash package)."""
    import xxhash

    from router.policy._fastpath import mix64

    blocks, rest = divmod(length, hasher.block_size)
    if blocks and not rest:
        return mix64(int(reference_prefix_hashes(hasher, tokens[:length])[-1]))
    return xxhash.xxh64_intdigest(tokens[:length].astype("<i4").tobytes(), KEY_SEED)


def test_xxh64_is_the_xxhash_packages() -> None:
    import xxhash

    from router.policy._fastpath import xxh64

    data = np.random.default_rng(12).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for size in range(0, 300):  # every tail path: 32-byte stripes, 8, 4 and 1-byte steps
        for seed in (0, KEY_SEED):
            assert xxh64(data[:size], seed) == xxhash.xxh64_intdigest(data[:size], seed)


@pytest.mark.parametrize("length", [0, 1, 7, 15, 16, 31, 300, 1024, 1500, 2048])
def test_key_hash_matches_its_definition(length: int) -> None:
    hasher = PrefixHasher(16)
    prompt = np.random.default_rng(length).integers(0, 128_000, 2048).astype(np.int32)
    assert hasher.key_hash(prompt, length) == reference_key_hash(hasher, prompt, length)
    with pytest.raises(ValueError):
        hasher.key_hash(prompt, 2049)


def test_prompt_key_follows_hot_splits_on_the_step_grid() -> None:
    hasher = PrefixHasher(16)
    prompt = np.random.default_rng(8).integers(0, 128_000, 3000).astype(np.int32)
    key = hasher.key_hash
    base = key(prompt, 1024)
    # Not hot: the base key. Hot with a split at 1100: one hot step past it (1152); that
    # key hot too with a split the prompt's end caps (2990 -> 3000), then max_length caps.
    assert hasher.prompt_key(prompt, None, 1024, 128, 4096, set(), {}) == (
        base, 1024, (base,))
    longer = key(prompt, 1152)
    splits = {base: 1100, longer: 2990}
    assert hasher.prompt_key(prompt, None, 1024, 128, 4096, {base}, splits) == (
        longer, 1152, (base, longer))
    end = key(prompt, 3000)
    assert hasher.prompt_key(prompt, hasher.hashes(prompt), 1024, 128, 4096,
                             {base, longer}, splits) == (end, 3000, (base, longer, end))
    capped = key(prompt, 2048)
    assert hasher.prompt_key(prompt, None, 1024, 128, 2048, {base, longer}, splits) == (
        capped, 2048, (base, longer, capped))
    # A split that would not lengthen the key stops the chain.
    assert hasher.prompt_key(prompt, None, 1024, 128, 4096, {base}, {base: 10})[1] == 1024


def reference_affinity_pick(
    homes: tuple[str, ...], blocks: tuple[int, ...], index: dict[str, int], fixed: np.ndarray,
    queued: np.ndarray, slope: np.ndarray, block_size: int, num_tokens: int, key_length: int,
) -> tuple[int, tuple[tuple[int, float], ...]]:
    """DualMap's pick as plain Python (the rule dualmap.py states)."""
    estimates, scores = [], []
    for home, held in zip(homes, blocks, strict=True):
        i = index[home]
        base, ahead, per_token = fixed.item(i), queued.item(i), slope.item(i)
        cached = min(held * block_size, max(0, num_tokens - 1))
        ttft = base + (ahead + (num_tokens - cached)) * per_token
        estimates.append((cached, ttft))
        cold = base + (ahead + num_tokens) * per_token
        scores.append((-cached, ttft) if cached >= key_length else (0, cold))
    best = 0 if len(homes) == 1 or scores[0] <= scores[1] else 1
    return best, tuple(estimates)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_affinity_pick_is_the_plain_rule(data: st.DataObject) -> None:
    from router.policy._fastpath import affinity_pick

    size = data.draw(st.integers(2, 6))
    index = {f"i{k}": k for k in range(size)}
    floats = st.floats(0.0, 5.0, allow_nan=False)
    fixed = np.array(data.draw(st.lists(floats, min_size=size, max_size=size)))
    queued = np.array(data.draw(st.lists(st.integers(0, 50_000), min_size=size,
                                         max_size=size)), dtype=np.float64)
    slope = np.array(data.draw(st.lists(st.sampled_from([1e-5, 2.1e-5, 3e-5]),
                                        min_size=size, max_size=size)))
    homes = tuple(data.draw(st.lists(st.sampled_from(sorted(index)), min_size=1, max_size=2,
                                     unique=True)))
    # Small block counts and equal loads make ties (in cache and in TTFT) common.
    blocks = tuple(data.draw(st.lists(st.integers(0, 70), min_size=len(homes),
                                      max_size=len(homes))))
    num_tokens = data.draw(st.integers(0, 1200))
    key_length = data.draw(st.sampled_from([0, 16, 512, 1024]))
    args = (homes, blocks, index, fixed, queued, slope, 16, num_tokens, key_length)
    assert affinity_pick(*args) == reference_affinity_pick(*args)


def test_affinity_pick_rejects_what_it_cannot_read() -> None:
    from router.policy._fastpath import affinity_pick

    arrays = (np.zeros(2), np.zeros(2), np.ones(2))
    with pytest.raises(KeyError):
        affinity_pick(("nope",), (0,), {"a": 0}, *arrays, 16, 100, 16)
    with pytest.raises(IndexError):
        affinity_pick(("a",), (0,), {"a": 5}, *arrays, 16, 100, 16)
    with pytest.raises(ValueError):
        affinity_pick((), (), {"a": 0}, *arrays, 16, 100, 16)
