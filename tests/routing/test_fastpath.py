"""The routing kernels on both paths.

The Python kernels (``router/policy/fastpath_py.py``) are the reference: they are checked
against the definitions written out by hand (hashes, the xxhash package, the published
splitmix64 vector), and the compiled kernels (``router/policy/_fastpath.c``, where built)
are held to them value for value under hypothesis: hashes, keys, LRU order and evictions,
ring owners, ``locate`` on a warm policy, the affinity pick float for float. Contract tests
(errors, edge cases) run on every implementation present.
"""

from __future__ import annotations

import platform
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy import fastpath_py as py
from router.policy.hashing import PrefixHasher

try:
    from router.policy import _fastpath

    C: Any = _fastpath
except ImportError:  # built without a C compiler: only the Python kernels exist
    C = None

needs_compiled = pytest.mark.skipif(
    C is None, reason="the C extension is not built here (installed without a C compiler)")
IMPLEMENTATIONS: list[ModuleType] = [py] if C is None else [py, C]
MASK = (1 << 64) - 1


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda m: "compiled" if m is C else "python")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each implementation of the kernels present here."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=[True, False], ids=["vector", "scalar"])
def kernels(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The compiled kernels with the SIMD hashing kernel (where this CPU has it) and without."""
    previous = C.set_vector_kernels(request.param)
    yield C.vector_kernels()
    C.set_vector_kernels(previous)


# ---- The reference against the definitions ---------------------------------------------


def test_prefix_hashes_are_the_definition_written_out(impl: ModuleType) -> None:
    """Block j: int32 tokens in pairs as little-endian uint64 words, times odd multipliers,
    summed mod 2^64, XOR salt[j]; prefix k: the running sum from start_prefix."""
    rng = np.random.default_rng(5)
    mult = (rng.integers(0, 2**64, 3, dtype=np.uint64) | np.uint64(1))  # 6-token blocks
    salt = rng.integers(0, 2**64, 10, dtype=np.uint64)
    tokens = rng.integers(-(2**31), 2**31, 6 * 4 + 5, dtype=np.int64).astype(np.int32)
    start_prefix, salt_start = 2**64 - 12345, 2
    expected, running = [], start_prefix
    for block in range(4):
        value = 0
        for w in range(3):
            first = 6 * block + 2 * w
            low, high = (int(t) & 0xFFFFFFFF for t in tokens[first: first + 2])
            value += (low | high << 32) * int(mult[w])
        running = (running + ((value & MASK) ^ int(salt[salt_start + block]))) & MASK
        expected.append(running)
    out = np.empty(4, dtype=np.uint64)
    impl.prefix_hashes(tokens, mult, salt, salt_start, out, start_prefix)
    assert out.tolist() == expected


def test_mix64_is_splitmix64s_finaliser(impl: ModuleType) -> None:
    # splitmix64's first output from seed 0 (the published test vector).
    assert impl.mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    values = np.random.default_rng(6).integers(0, 2**64, 200, dtype=np.uint64).tolist()
    assert [impl.mix64(v) for v in values] == [py.mix64(v) for v in values]
    assert impl.mix64(-1) == impl.mix64(MASK)  # taken mod 2^64


def test_xxh64_is_the_xxhash_packages(impl: ModuleType) -> None:
    data = np.random.default_rng(12).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for size in range(0, 300):  # every tail path: 32-byte stripes, 8, 4 and 1-byte steps
        for seed in (0, py.KEY_SEED):
            assert impl.xxh64(data[:size], seed) == xxhash.xxh64_intdigest(data[:size], seed)


@pytest.mark.parametrize("length", [0, 1, 7, 15, 16, 31, 300, 1024, 1500, 2048])
def test_key_hash_matches_its_definition(length: int, impl: ModuleType) -> None:
    """mix64 of the prefix hash for a whole number of blocks, else xxh64 of the tokens'
    int32 bytes with the key seed; the prefix hashes given or not, in part or in full."""
    hasher = PrefixHasher(16)
    prompt = np.random.default_rng(length).integers(0, 128_000, 2048).astype(np.int32)
    mult, salt = hasher.constants(len(prompt))
    hashes = np.empty(len(prompt) // 16, dtype=np.uint64)
    py.prefix_hashes(prompt, mult, salt, 0, hashes, 0)
    blocks, rest = divmod(length, 16)
    expected = (py.mix64(int(hashes[blocks - 1])) if blocks and not rest
                else xxhash.xxh64_intdigest(prompt[:length].tobytes(), py.KEY_SEED))
    for given_hashes in (hashes[:0], hashes[:3], hashes):
        assert impl.key_hash(prompt, mult, salt, given_hashes, length) == expected
    with pytest.raises(ValueError):
        impl.key_hash(prompt, mult, salt, hashes, 2049)


# ---- The active path through its callers -------------------------------------------------


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
    # A continued chain: the hashes of blocks d+1... after a known prefix of d blocks.
    assert np.array_equal(hasher.hashes(tokens[48:], start_block=3,
                                        start_prefix=int(expected[2])), expected[3:])
    # Past the precomputed salt table (64k tokens): the table grows, values continue.
    long_prompt = rng.integers(0, 128_000, 70_000).astype(np.int32)
    mult, salt = hasher.constants(len(long_prompt))
    reference = np.empty(len(long_prompt) // 16, dtype=np.uint64)
    py.prefix_hashes(long_prompt, mult, salt, 0, reference, 0)
    assert np.array_equal(hasher.hashes(long_prompt), reference)


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


# ---- The compiled kernels against the reference -----------------------------------------


@needs_compiled
def test_the_vector_kernel_is_used_where_the_cpu_has_it() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if sys.platform == "linux" and cpuinfo.exists() else ""
    if platform.machine() == "x86_64" and " avx512dq" in flags and " avx512f" in flags:
        assert C.vector_kernels()
    assert not py.vector_kernels() and not py.set_vector_kernels(True)


def _hashes(module: ModuleType, tokens: np.ndarray, mult: np.ndarray, salt: np.ndarray,
            salt_start: int = 0, start_prefix: int = 0) -> np.ndarray:
    out = np.empty(len(tokens) // (2 * len(mult)), dtype=np.uint64)
    module.prefix_hashes(tokens, mult, salt, salt_start, out, start_prefix)
    return out


@needs_compiled
@pytest.mark.parametrize("block_size", [2, 16, 32])
@pytest.mark.parametrize("num_tokens", [0, 1, 15, 16, 17, 127, 128, 1000, 8192])
def test_prefix_hashes_compiled_equal_python(
    block_size: int, num_tokens: int, kernels: bool
) -> None:
    rng = np.random.default_rng(num_tokens + block_size)
    hasher = PrefixHasher(block_size)
    tokens = rng.integers(-(2**31), 2**31 - 1, num_tokens, dtype=np.int64).astype(np.int32)
    mult, salt = hasher.constants(num_tokens + 7 * block_size)
    for salt_start, start_prefix in ((0, 0), (3, 2**64 - 1), (7, 12345)):
        assert np.array_equal(_hashes(C, tokens, mult, salt, salt_start, start_prefix),
                              _hashes(py, tokens, mult, salt, salt_start, start_prefix))


_block_sizes = st.sampled_from([2, 4, 16])


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(block_size=_block_sizes, data=st.data())
def test_keys_compiled_equal_python(block_size: int, data: st.DataObject) -> None:
    """key_hash at every kind of length, with the prefix hashes given in part or not at
    all, and prompt_key along hot keys whose splits lengthen, cap or stop the chain."""
    hasher = PrefixHasher(block_size)
    tokens = np.array(data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=200)),
                      dtype=np.int32)
    mult, salt = hasher.constants(len(tokens))
    full = _hashes(py, tokens, mult, salt)
    given_hashes = full[: data.draw(st.integers(0, len(full)))]
    length = data.draw(st.integers(0, len(tokens)))
    assert (C.key_hash(tokens, mult, salt, given_hashes, length)
            == py.key_hash(tokens, mult, salt, given_hashes, length))
    hot_step = data.draw(st.sampled_from([1, 4, 16, 50]))
    max_length = data.draw(st.integers(0, 250))
    # Hot keys: the keys at some lengths of this prompt (so chains really lengthen).
    lengths = data.draw(st.lists(st.integers(0, len(tokens)), max_size=6))
    hot = {py.key_hash(tokens, mult, salt, full, n) for n in lengths}
    splits = {key: data.draw(st.integers(-3, 220)) for key in hot}
    args = (tokens, mult, salt, given_hashes, length, hot_step, max_length, hot, splits)
    compiled, python = C.prompt_key(*args), py.prompt_key(*args)
    assert tuple(compiled) == tuple(python)
    assert (compiled.hash, compiled.length, compiled.chain) == (
        python.hash, python.length, python.chain)


# Keys from a small pool collide in the table often; some share their home slot by design.
_keys = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1),
                  st.sampled_from([0, 2**63, 2**64 - 1, 2**32]))
_lru_ops = st.lists(st.one_of(
    st.tuples(st.just("record"), st.lists(_keys, max_size=30)),
    st.tuples(st.just("add"), _keys),
    st.tuples(st.just("discard"), _keys),
    st.tuples(st.just("capacity"), st.integers(0, 60)),
    # A search: the held keys, most recent first, as far as given, then any keys; the hint
    # near where the held keys end (where a wrong probe would show) or anywhere.
    st.tuples(st.just("search"), st.tuples(st.integers(0, 30), st.lists(_keys, max_size=10),
                                           st.none() | st.integers(-3, 3),
                                           st.integers(-2, 25))),
    st.tuples(st.just("clear"), st.none()),
), max_size=60)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 50), ops=_lru_ops)
def test_prefix_lru_compiled_equals_python(capacity: int, ops: list) -> None:
    """Same keys in the same LRU order, same counts, same evictions, and the same search
    answers (with any hint, also where add/discard left a set not closed under prefixes)."""
    compiled, python = C.PrefixLru(capacity), py.PrefixLru(capacity)
    for op, arg in ops:
        if op == "record":
            hashes = np.array(arg, dtype=np.uint64)
            compiled.record(hashes)
            python.record(hashes)
        elif op == "search":
            held, extra, near, anywhere = arg
            recent = python.keys()[::-1][:held]
            hashes = np.array(recent + extra, dtype=np.uint64)
            hint = anywhere if near is None else len(recent) + near
            assert (compiled.cached_blocks(hashes, hint)
                    == python.cached_blocks(hashes.tobytes(), hint))
        elif op == "capacity":
            compiled.capacity = python.capacity = arg
        elif op == "clear":
            compiled.clear()
            python.clear()
        else:
            getattr(compiled, op)(arg)
            getattr(python, op)(arg)
        assert compiled.keys() == python.keys()
        assert len(compiled) == len(python) and compiled.capacity == python.capacity
        for key in python.keys()[:5]:
            assert key in compiled and compiled.count(key) == python.count(key)


@needs_compiled
def test_prefix_lru_growth_and_heavy_eviction_compiled_equal_python() -> None:
    """Many keys through a small capacity: the compiled table grows, and backward-shift
    deletion must keep every held key findable."""
    rng = np.random.default_rng(4)
    compiled, python = C.PrefixLru(1000), py.PrefixLru(1000)
    for _ in range(200):
        keys = rng.integers(0, 2**63, int(rng.integers(1, 200)), dtype=np.uint64)
        compiled.record(keys)
        python.record(keys)
    assert compiled.keys() == python.keys() and len(python) == 1000
    assert all(key in compiled for key in python.keys())  # noqa: SIM118
    strangers = rng.integers(0, 2**63, 1000, dtype=np.uint64).tolist()
    assert sum(key in compiled for key in strangers) == sum(key in python for key in strangers)


_holder_ops = st.lists(st.one_of(
    st.tuples(st.just("record"), st.tuples(st.lists(_keys, max_size=40),
                                           st.sampled_from(["a", "b", "c", "d"]),
                                           st.integers(0, 45))),
    # A search: prefixes recorded earlier (so that deep ones are held), cut anywhere and
    # continued with any keys, from any depth on.
    st.tuples(st.just("deepest"), st.tuples(st.integers(0, 10), st.integers(0, 40),
                                            st.lists(_keys, max_size=8), st.integers(0, 45))),
), max_size=50)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(2, 80), grid=st.integers(1, 5), dense=st.integers(0, 10),
       ops=_holder_ops)
def test_last_holder_index_compiled_equals_python(
    capacity: int, grid: int, dense: int, ops: list
) -> None:
    """The same answers to every search (holder and depth), the same sizes through
    generation turnover, with any grid, any starting depth and keys that collide."""
    compiled = C.LastHolderIndex(capacity, grid, dense)
    python = py.LastHolderIndex(capacity=capacity, grid_blocks=grid, dense_blocks=dense)
    recorded: list[list[int]] = []
    for op, arg in ops:
        if op == "record":
            keys, instance_id, from_block = arg
            hashes = np.array(keys, dtype=np.uint64)
            compiled.record(hashes, instance_id, from_block)
            python.record(hashes.tobytes(), instance_id, from_block=from_block)
            recorded.append(keys)
        else:
            which, cut, extra, beyond = arg
            keys = recorded[which % len(recorded)][:cut] if recorded else []
            hashes = np.array(keys + extra, dtype=np.uint64)
            assert compiled.deepest(hashes, beyond) == python.deepest(hashes.tobytes(), beyond)
        assert len(compiled) == len(python)
    assert (compiled.capacity, compiled.grid_blocks, compiled.dense_blocks) == (
        python.capacity, python.grid_blocks, python.dense_blocks)
    for point in range(20):
        assert compiled.blocks_at(point) == python.blocks_at(point)
        assert compiled.points_within(point) == python.points_within(point)


@needs_compiled
def test_last_holder_index_turnover_and_growth_compiled_equal_python() -> None:
    """Many prompts through a small index: the compiled tables grow, turn over and are
    reused; every answer stays the Python one's."""
    rng = np.random.default_rng(5)
    compiled, python = C.LastHolderIndex(3000), py.LastHolderIndex(3000)
    prompts = [rng.integers(0, 2**63, int(rng.integers(1, 300)), dtype=np.uint64)
               for _ in range(400)]
    answers = turnovers = 0
    for k, hashes in enumerate(prompts):
        size = len(python)
        instance_id = f"i{k % 7}"
        compiled.record(hashes, instance_id, k % 11)
        python.record(hashes, instance_id, k % 11)
        earlier = prompts[int(rng.integers(0, k + 1))]
        probe = np.concatenate([earlier[:int(rng.integers(0, len(earlier) + 1))],
                                rng.integers(0, 2**63, 5, dtype=np.uint64)])
        beyond = int(rng.integers(0, 12))
        assert compiled.deepest(probe, beyond) == python.deepest(probe, beyond)
        answers += python.deepest(probe, beyond)[0] is not None
        assert len(compiled) == len(python)
        turnovers += len(python) < size
    assert answers > 50 and turnovers > 3


_positions = st.lists(st.one_of(st.integers(0, 50), st.integers(0, 2**64 - 1),
                                st.sampled_from([0, 2**64 - 1])), max_size=40)


@needs_compiled
@settings(max_examples=150, deadline=None)
@given(data=st.data(), positions=_positions)
def test_ring_index_compiled_equals_python(data: st.DataObject, positions: list[int]) -> None:
    """Same first owner for any eligibility mask (shorter or longer than the labels) and
    exclusion, same point index and next distinct owner, repeated positions and
    runs of one owner included."""
    positions.sort()
    owners = data.draw(st.lists(st.integers(0, 5), min_size=len(positions),
                                max_size=len(positions)))
    arrays = (np.array(positions, dtype=np.uint64), np.array(owners, dtype=np.int32))
    compiled, python = C.RingIndex(*arrays), py.RingIndex(*arrays)
    assert len(compiled) == len(python) == len(positions)
    assert ([compiled.next_distinct(k) for k in range(len(positions))]
            == [python.next_distinct(k) for k in range(len(positions))])
    for _ in range(10):
        position = data.draw(st.one_of(st.integers(0, 60), st.integers(0, 2**64 - 1)))
        mask = bytes(data.draw(st.lists(st.integers(0, 1), max_size=7)))
        exclude = data.draw(st.integers(-1, 6))
        assert compiled.index(position) == python.index(position)
        assert compiled.first(position, mask, exclude) == python.first(position, mask, exclude)


def _warm_dualmap() -> tuple[Any, Any, Any, Any]:
    """A DualMap policy (on the active path) after 300 decisions with a shared system
    prompt: hot (lengthened) keys and cached prefixes; its snapshot, one with an
    unroutable instance, and a prompt maker."""
    from router.policy.dualmap import DualMapPolicy
    from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest

    rng = np.random.default_rng(11)
    views = tuple(InstanceView(f"i{k}", total_blocks=4000) for k in range(8))
    policy = DualMapPolicy(hot_min_count=4)
    system = rng.integers(0, 50_000, 1100).astype(np.int32)
    documents = [rng.integers(0, 50_000, 1500).astype(np.int32) for _ in range(6)]

    def prompt(k: int) -> np.ndarray:
        tail = rng.integers(0, 50_000, int(rng.integers(1, 300))).astype(np.int32)
        return np.concatenate([system, documents[k % 6], tail])

    snapshot = ClusterSnapshot(1, views)
    for seq in range(300):
        request = RoutingRequest(f"r{seq}", prompt(seq), 8)
        policy.on_dispatched(request, policy.route(request, snapshot, 0.0), 0.0)
    masked = ClusterSnapshot(2, tuple(sorted(
        (replace(views[3], healthy=False), *views[:3], *views[4:]),
        key=lambda v: v.instance_id)))
    return policy, snapshot, masked, prompt


def _copy_lru(lru: Any, module: ModuleType) -> Any:
    """The same keys, counts and LRU order in ``module``'s PrefixLru."""
    copy = module.PrefixLru(lru.capacity)
    for key in lru.keys():  # noqa: SIM118  (LRU order)
        for _ in range(lru.count(key)):
            copy.add(key)
    return copy


@needs_compiled
def test_locate_on_a_warm_policy_compiled_equals_python() -> None:
    """Key (lengthened or not), homes on two rings or one, cached blocks per home, the
    prefix hashes and the continuity probe (the last holder of a deeper routed prefix):
    the same from both, with and without an unroutable instance, tables and an index."""
    policy, snapshot, masked, prompt = _warm_dualmap()
    rings = policy.rings
    assert rings.keys.hot_prefixes  # some keys are lengthened
    tables = {module: [None if t is None else _copy_lru(t, module) for t in rings._tables]
              for module in (C, py)}
    lookups = {module: tuple(module.RingIndex(ring._positions, ring._owner_slots)
                             for ring in rings.rings) for module in (C, py)}
    holders = {module: module.LastHolderIndex() for module in (C, py)}
    views = {module: dict(zip(rings._names, tables[module], strict=True))
             for module in (C, py)}
    keys = rings.keys
    seen_cached = seen_lengthened = 0
    seen: Counter[str] = Counter()
    previous = prompt(0)
    for snap in (snapshot, masked):
        policy.adopt(snap)
        continuity = {module: (holders[module], views[module], policy.board.eligible_set)
                      for module in (C, py)}
        for seq in range(60):
            tokens = prompt(seq)
            if seq % 2:  # the next turn of a conversation whose last turn went elsewhere
                for module, index in holders.items():
                    index.record(keys.hasher.hashes(previous), f"i{seq % 8}", seq % 5)
                    if seq % 4 == 1:  # that replica's view holds it (else: evicted since)
                        views[module][f"i{seq % 8}"].record(keys.hasher.hashes(previous))
                tokens = np.concatenate([previous, tokens[-40:]])
            previous = tokens
            for two_rings, with_tables, with_index in ((True, True, True), (False, True, True),
                                                       (True, False, True), (True, True, False)):
                results = []
                for module in (C, py):
                    mult, salt = keys.hasher.constants(len(tokens))
                    results.append(module.locate(
                        tokens, mult, salt, keys.base_length(len(tokens)), keys.hot_step,
                        keys.max_key_tokens, keys.hot_prefixes, keys.key_splits,
                        lookups[module] if two_rings else lookups[module][:1],
                        rings._eligible_mask, tables[module] if with_tables else None,
                        rings._names, continuity[module] if with_index else None))
                (c_key, *c_rest), (p_key, *p_rest) = results
                assert tuple(c_key) == tuple(p_key) and c_rest == p_rest
                seen_cached += any(p_rest[1])
                seen_lengthened += len(p_key.chain) > 1
                seen[type(p_rest[3]).__name__ if not isinstance(p_rest[3], str)
                     else p_rest[3]] += 1
    # the cases that matter were there
    assert seen_cached > 60 and seen_lengthened > 60 and seen["tuple"] > 20, seen
    assert seen["holder_unroutable"] > 0 and seen["NoneType"] > 20, seen


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_affinity_pick_compiled_equals_python(data: st.DataObject) -> None:
    size = data.draw(st.integers(2, 6))
    index = {f"i{k}": k for k in range(size)}
    floats = st.floats(0.0, 5.0, allow_nan=False)
    fixed = np.array(data.draw(st.lists(floats, min_size=size, max_size=size)))
    queued = np.array(data.draw(st.lists(st.integers(0, 50_000), min_size=size,
                                         max_size=size)), dtype=np.float64)
    slope = np.array(data.draw(st.lists(st.sampled_from([1e-5, 2.1e-5, 3e-5]),
                                        min_size=size, max_size=size)))
    if data.draw(st.booleans()):  # equal loads everywhere: ties in TTFT
        fixed[:], queued[:], slope[:] = fixed[0], queued[0], slope[0]
    homes = tuple(data.draw(st.lists(st.sampled_from(sorted(index)), min_size=1, max_size=3,
                                     unique=True)))  # c1, c2, the continuity candidate
    # Small block counts make ties in the cached prefix common.
    blocks = tuple(data.draw(st.lists(st.integers(0, 70), min_size=len(homes),
                                      max_size=len(homes))))
    num_tokens = data.draw(st.integers(0, 1200))
    key_length = data.draw(st.sampled_from([0, 16, 512, 1024]))
    args = (homes, blocks, index, fixed, queued, slope, 16, num_tokens, key_length)
    assert C.affinity_pick(*args) == py.affinity_pick(*args)


# ---- Contracts on every implementation -------------------------------------------------


def test_affinity_pick_applies_the_rule(impl: ModuleType) -> None:
    index = {"a": 0, "b": 1}
    fixed, queued, slope = np.array([0.1, 0.1]), np.array([0.0, 5000.0]), np.array([1e-5] * 2)
    # b holds more of the prompt (and covers the key): b, despite its queue.
    best, estimates = impl.affinity_pick(("a", "b"), (10, 40), index, fixed, queued, slope,
                                         16, 1000, 512)
    assert best == 1
    assert estimates == ((160, 0.1 + 840 * 1e-5), (640, 0.1 + (5000 + 360) * 1e-5))
    # Neither covers a 1024-token key: both score cold, the lower TTFT wins (a).
    assert impl.affinity_pick(("a", "b"), (10, 40), index, fixed, queued, slope,
                              16, 1000, 1024)[0] == 0
    # A full tie goes to c1; the cached prefix never counts the prompt's last token.
    best, estimates = impl.affinity_pick(("b", "a"), (99, 99), index, np.zeros(2),
                                         np.zeros(2), slope, 16, 1000, 0)
    assert best == 0 and estimates[0][0] == estimates[1][0] == 999
    # A third candidate (the continuity candidate) under the same rule: the most cached.
    index["c"] = 2
    three = (np.array([0.1] * 3), np.array([0.0, 5000.0, 9000.0]), np.array([1e-5] * 3))
    best, estimates = impl.affinity_pick(("a", "b", "c"), (10, 40, 50), index, *three,
                                         16, 1000, 512)
    assert best == 2 and estimates[2] == (800, 0.1 + (9000 + 200) * 1e-5)
    # Tied with b on the cached prefix: the lower TTFT (b's), then the earlier candidate.
    assert impl.affinity_pick(("a", "b", "c"), (10, 40, 40), index, *three,
                              16, 1000, 512)[0] == 1
    assert impl.affinity_pick(("a", "c", "b"), (40, 40, 40), index, np.zeros(3),
                              np.zeros(3), np.ones(3), 16, 1000, 512)[0] == 0


def test_prefix_hashes_kernel_rejects_mismatched_buffers(impl: ModuleType) -> None:
    mult = np.ones(8, dtype=np.uint64)
    salt = np.zeros(4, np.uint64)
    with pytest.raises(ValueError):  # fewer tokens than the blocks asked for
        impl.prefix_hashes(np.zeros(20, np.int32), mult, salt, 0, np.empty(2, np.uint64), 0)
    with pytest.raises(ValueError):  # salt shorter than the blocks
        impl.prefix_hashes(np.zeros(64, np.int32), mult, salt, 3, np.empty(2, np.uint64), 0)
    with pytest.raises(ValueError):
        impl.prefix_hashes(np.zeros(64, np.int32), mult, salt, -1, np.empty(2, np.uint64), 0)
    with pytest.raises(TypeError):
        impl.prefix_hashes([1, 2], mult, salt, 0, np.empty(1, np.uint64), 0)
    with pytest.raises(TypeError):  # out is not writable
        impl.prefix_hashes(np.zeros(64, np.int32), mult, salt, 0, bytes(16), 0)
    with pytest.raises(ValueError):  # not contiguous
        impl.xxh64(np.arange(10, dtype=np.int32)[::2])


def test_prefix_lru_search_is_the_longest_held_prefix_whatever_the_hint(
    impl: ModuleType,
) -> None:
    rng = np.random.default_rng(3)
    hasher = PrefixHasher(16)
    lru = impl.PrefixLru()
    family = rng.integers(0, 128_000, 4000).astype(np.int32)
    lru.record(hasher.hashes(family[:2400]))
    prompt = np.concatenate([family[:3000], rng.integers(0, 128_000, 500).astype(np.int32)])
    hashes = hasher.hashes(prompt)
    assert all(lru.cached_blocks(hashes, hint) == 150 for hint in range(-2, len(hashes) + 3))
    assert lru.cached_blocks(hashes[:0]) == 0
    assert lru.cached_blocks(hasher.hashes(family[16:2000])) == 0


def test_prefix_lru_records_tail_first_and_evicts_deep_blocks(impl: ModuleType) -> None:
    lru = impl.PrefixLru(4)
    lru.record(np.array([1, 2, 3], dtype=np.uint64))
    assert lru.keys() == [3, 2, 1]  # the prompt's head ends most recently used
    lru.add(2)  # a held key keeps its place, counted twice
    assert lru.keys() == [3, 2, 1] and lru.count(2) == 2
    lru.record(np.array([1, 7, 8], dtype=np.uint64))  # over capacity: the deepest go first
    assert lru.keys() == [2, 8, 7, 1]
    lru.capacity = 2
    assert lru.keys() == [7, 1]
    lru.discard(7)
    assert lru.keys() == [1] and 7 not in lru


def test_prefix_lru_rejects_what_is_not_a_key(impl: ModuleType) -> None:
    lru = impl.PrefixLru(10)
    assert -1 not in lru and 2**70 not in lru
    with pytest.raises(TypeError):
        "x" in lru  # noqa: B015
    with pytest.raises(OverflowError):
        lru.add(-5)
    with pytest.raises(ValueError):
        impl.PrefixLru(-1)
    with pytest.raises(ValueError):
        lru.capacity = -1
    with pytest.raises(ValueError):
        lru.record(b"abc")  # not a whole number of uint64
    lru.discard(-5)
    lru.discard(12345)
    assert len(lru) == 0 and lru.count(7) == 0 and lru.count(-7) == 0


def test_ring_index_rejects_bad_input_and_handles_an_empty_ring(impl: ModuleType) -> None:
    from array import array

    empty = impl.RingIndex(array("Q"), array("i"))
    assert len(empty) == 0 and empty.first(123, b"\x01") == -1 and empty.index(5) == 0
    with pytest.raises(ValueError):
        impl.RingIndex(array("Q", [5, 3]), array("i", [0, 1]))  # not sorted
    with pytest.raises(ValueError):
        impl.RingIndex(array("Q", [3, 5]), array("i", [0]))  # owners do not pair up
    ring = impl.RingIndex(array("Q", [10, 20, 30]), array("i", [0, 1, 0]))
    assert ring.first(15, b"\x01\x01") == 1 and ring.first(31, b"\x01\x01") == 0  # wraps
    assert ring.first(15, b"\x01\x00") == 0 and ring.first(15, b"\x00\x00") == -1
    assert ring.first(15, b"\x01") == 0  # labels past the mask are not eligible
    assert ring.first(15, b"\x01\x01", 1) == 0  # excluded: the next distinct owner
    assert [ring.next_distinct(k) for k in range(3)] == [1, 2, 1]
    with pytest.raises(OverflowError):
        ring.first(-1, b"\x01")
    with pytest.raises(IndexError):
        ring.next_distinct(3)
    with pytest.raises(RuntimeError):  # immutable
        ring.__init__(array("Q"), array("i"))


def test_affinity_pick_rejects_what_it_cannot_read(impl: ModuleType) -> None:
    arrays = (np.zeros(2), np.zeros(2), np.ones(2))
    with pytest.raises(KeyError):
        impl.affinity_pick(("nope",), (0,), {"a": 0}, *arrays, 16, 100, 16)
    with pytest.raises(IndexError):
        impl.affinity_pick(("a",), (0,), {"a": 5}, *arrays, 16, 100, 16)
    with pytest.raises(ValueError):
        impl.affinity_pick((), (), {"a": 0}, *arrays, 16, 100, 16)
    with pytest.raises(ValueError):  # at most c1, c2 and the continuity candidate
        impl.affinity_pick(("a",) * 4, (0,) * 4, {"a": 0}, *arrays, 16, 100, 16)
    with pytest.raises(TypeError):
        impl.affinity_pick(["a"], (0,), {"a": 0}, *arrays, 16, 100, 16)


def test_last_holder_index_rejects_what_it_cannot_use(impl: ModuleType) -> None:
    index = impl.LastHolderIndex(capacity=8, grid_blocks=2, dense_blocks=1)
    hashes = np.arange(1, 9, dtype=np.uint64)
    with pytest.raises(TypeError):
        index.record(hashes, 7)
    with pytest.raises(ValueError):
        index.record(hashes, "a", -1)
    with pytest.raises(ValueError):
        index.record(b"\x00" * 12, "a")
    with pytest.raises(ValueError):
        index.deepest(hashes, -1)
    with pytest.raises(ValueError):
        index.deepest(b"\x00" * 12)
    with pytest.raises(ValueError):
        index.points_within(-1)
    for bad in ((1, 4, 8), (8, 0, 8), (8, 4, -1)):
        with pytest.raises(ValueError):
            impl.LastHolderIndex(*bad)
    index.record(hashes, "a")  # grid: blocks 1, 3, 5, 7
    assert len(index) == 4 and index.deepest(hashes) == ("a", 7)
    index.record(hashes[:3], "b")  # the newer generation is full: it turns over
    assert len(index) == 6 and index.deepest(hashes) == ("a", 7)
    assert index.deepest(hashes[:4]) == ("b", 3)


def test_locate_rejects_what_it_cannot_use(impl: ModuleType) -> None:
    from array import array

    ring = impl.RingIndex(array("Q", [10]), array("i", [0]))
    tokens, mult = np.arange(64, dtype=np.int32), np.ones(8, np.uint64)
    salt = np.zeros(8, np.uint64)
    index = impl.LastHolderIndex(grid_blocks=1, dense_blocks=0)
    held = {"a": impl.PrefixLru(), "b": impl.PrefixLru()}
    args: list[Any] = [tokens, mult, salt, 32, 16, 64, set(), {}, (ring,), b"\x01", None, ["a"],
                       (index, held, {"a"})]
    key, homes, blocks, hashes, candidate = impl.locate(*args)
    assert homes == ("a",) and blocks == (0,) and len(hashes) == 4 * 8 and key.length == 32
    assert candidate is None
    index.record(hashes, "b")  # past the key (2 blocks): the third and fourth block
    assert impl.locate(*args)[4] == "holder_unroutable"  # b is not routable
    args[12] = (index, held, {"a", "b"})
    assert impl.locate(*args)[4] == "holder_evicted"  # b's view does not hold the prompt
    held["b"].record(hashes[:24])  # three blocks of four: still short of what was routed
    assert impl.locate(*args)[4] == "holder_evicted"
    held["b"].record(hashes)
    assert impl.locate(*args)[4] == ("b", 4)
    assert impl.locate(*args[:-1])[4] is None  # no index, no search
    for position, bad, error in ((8, (), ValueError), (8, (ring, ring, ring), ValueError),
                                 (8, ("ring",), TypeError), (4, 0, ValueError),
                                 (10, [object()], TypeError), (11, [], IndexError),
                                 (2, np.zeros(2, np.uint64), ValueError),
                                 (12, {}, TypeError), (12, (index, held), TypeError),
                                 (12, (index, {"b": 1}, {"b"}), TypeError)):
        with pytest.raises(error):
            impl.locate(*[bad if k == position else a for k, a in enumerate(args)])
