"""Token arrays, ring keys and prefix-block hashes."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import xxhash

from router.policy.hashing import PrefixHasher, mix64, token_array
from tests.routing.util import tokens


def test_token_array_accepts_every_form_with_the_same_result() -> None:
    ids = [1, 2, 250, 255, 7]
    expected = np.array(ids, dtype="<i4")
    for form in (ids, tuple(ids), np.array(ids, dtype=np.int64), array("i", ids), bytes(ids)):
        out = token_array(form)
        assert out.dtype == np.dtype("<i4")
        assert np.array_equal(out, expected), type(form)


def test_token_array_does_not_copy_int32_arrays() -> None:
    arr = np.arange(10, dtype=np.int32)
    assert token_array(arr) is arr


def test_key_hash_depends_on_exactly_the_key_tokens() -> None:
    rng = np.random.default_rng(0)
    a = tokens(rng, 2048)
    b = a.copy()
    b[1500] += 1  # differs after the first 1024 tokens only
    hasher = PrefixHasher(16)
    key_hash = hasher.key_hash
    assert key_hash(a, 1024) == key_hash(b, 1024)
    assert key_hash(a, 1500) == key_hash(b, 1500)  # a partial block before the difference
    assert key_hash(a, 1501) != key_hash(b, 1501)
    assert key_hash(a, 2048) != key_hash(b, 2048)
    assert key_hash(a, 1024) != key_hash(a, 1023)
    assert key_hash(token_array(a.tolist()), 1024) == key_hash(a, 1024)
    # Given prefix hashes (all, some, none) never change a key.
    full = hasher.hashes(a)
    for length in (0, 5, 16, 1000, 1024, 1500, 2048):
        expected = key_hash(a, length)
        assert key_hash(a, length, full) == key_hash(a, length, full[:10]) == expected
    # A key of a whole number of blocks is the prefix hash's mix, otherwise xxh64 (as ever).
    assert key_hash(a, 1024) == mix64(full.item(63))
    assert key_hash(a, 1000) == xxhash.xxh64_intdigest(a[:1000].tobytes(), 0x6C6C6D666C656574)


def test_prefix_hashes_agree_exactly_up_to_the_first_differing_block() -> None:
    rng = np.random.default_rng(1)
    hasher = PrefixHasher(16)
    a = tokens(rng, 1000)  # 62 full blocks, a partial tail without a hash
    b = a.copy()
    b[16 * 40 + 3] ^= 1  # block 40 differs
    ha, hb = hasher.hashes(a), hasher.hashes(b)
    assert len(ha) == 1000 // 16
    assert np.array_equal(ha[:40], hb[:40])
    assert np.all(ha[40:] != hb[40:])
    assert len(set(ha.tolist())) == len(ha)  # every prefix distinct


def test_prefix_hashes_see_token_order_within_and_across_blocks() -> None:
    hasher = PrefixHasher(16)
    base = np.arange(32, dtype=np.int32)
    swapped_in_block = base.copy()
    swapped_in_block[[0, 1]] = swapped_in_block[[1, 0]]
    swapped_blocks = np.concatenate([base[16:], base[:16]])
    h = hasher.hashes(base)
    assert hasher.hashes(swapped_in_block)[0] != h[0]
    assert hasher.hashes(swapped_blocks)[1] != h[1]


def test_prefix_hashes_continue_a_chain() -> None:
    rng = np.random.default_rng(2)
    hasher = PrefixHasher(16)
    full = tokens(rng, 16 * 10)
    whole = hasher.hashes(full)
    tail = hasher.hashes(full[16 * 4 :], start_block=4, start_prefix=int(whole[3]))
    assert np.array_equal(whole[4:], tail)


def test_prefix_hasher_rejects_odd_block_sizes() -> None:
    with pytest.raises(ValueError):
        PrefixHasher(15)


def test_mix64_is_a_64_bit_bijection_that_spreads_close_inputs() -> None:
    outs = [mix64(x) for x in range(1000)]
    assert len(set(outs)) == 1000 and all(0 <= o < 2**64 for o in outs)
    # Neighbouring inputs land far apart: the top bits of consecutive outputs vary.
    assert len({o >> 60 for o in outs[:64]}) > 8
