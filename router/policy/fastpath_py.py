"""The routing kernels in plain Python: the reference for, and fallback of, ``_fastpath.c``.

Every function and class here has the signature, the results and the errors of its compiled
counterpart in ``router/policy/_fastpath.c`` (``csrc/`` holds the parts; ``_fastpath.pyi``
the types): the same hash values, the same ring owners, the same LRU order and evictions,
the same affinity pick, float for float. ``router/policy/fastpath.py`` chooses between the
two; ``tests/routing/test_fastpath.py`` holds the compiled kernels to these definitions.

What each computes (the C files say how it is made fast):

* ``prefix_hashes``: the prefix-block hashes of a prompt: block ``j`` (int32 tokens read in
  pairs as little-endian uint64 words ``w``) hashes to ``sum(w * mult) ^ salt[j]`` (mod
  2^64), and prefix ``k`` to the running sum of block hashes ``0..k`` (numpy:
  ``words @ mult``, XOR, ``cumsum``);
* ``key_hash``: a ring key: ``mix64`` of the prefix hash when the length is a whole number
  of blocks, else ``xxh64`` (the xxhash package) of the tokens' int32 bytes with
  ``KEY_SEED``;
* ``prompt_key``: the key lengthened along hot prefixes (``keys.PrefixKeyBuilder``);
* ``PrefixLru``: one instance's cached prefix hashes, an ``OrderedDict`` of counts in LRU
  order (least recently used first);
* ``RingIndex``: first owner clockwise from a position (``bisect``), eligibility as a byte
  per owner slot, and the next point with another owner;
* ``LastHolderIndex``: which instance each routed grid prefix last went to (two dicts, one
  per generation), with the binary search for a prompt's deepest routed prefix;
* ``locate``: the above composed for one decision; ``affinity_pick``: DualMap's pick.

Buffers come in as the C kernels take them: any C-contiguous object with the buffer
protocol (numpy arrays, ``array.array``, ``bytes``), read as raw little-endian bytes.
Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import operator
import sys
from bisect import bisect_left
from collections import OrderedDict
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import xxhash

__all__ = [
    "KEY_SEED",
    "LastHolderIndex",
    "PrefixLru",
    "PromptKey",
    "RingIndex",
    "affinity_pick",
    "key_hash",
    "locate",
    "mix64",
    "prefix_hashes",
    "prompt_key",
    "set_vector_kernels",
    "vector_kernels",
    "xxh64",
]

Buffer = Any  # anything with the buffer protocol, checked at run time as the C kernels do
# locate's continuity context (holder index, each instance's cached prefixes by id, the
# routable ids) and its answer (see ``_continuity_candidate``).
Continuity = tuple["LastHolderIndex", dict[str, "PrefixLru"], "frozenset[str] | set[str]"]
Candidate = tuple[str, int] | str | None
U64 = npt.NDArray[np.uint64]

MASK64 = (1 << 64) - 1
KEY_SEED = 0x6C6C_6D66_6C65_6574  # "llmfleet": the seed of ring keys that are xxh64
_U64_LE = np.dtype("<u8")
_F64 = np.dtype("<f8")
_SSIZE_MAX = sys.maxsize
_RING_MAX_POINTS = (2**32 - 1) // 2  # the compiled ring's limit (uint32 point indices)


# ---- Buffers ---------------------------------------------------------------------------


def _bytes(obj: Buffer) -> memoryview:
    """``obj``'s bytes as a flat memoryview; TypeError without the buffer protocol,
    ValueError when not C-contiguous (what the C kernels' buffer requests raise)."""
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _words(view: memoryview, what: str) -> memoryview:
    """A byte view as native uint64 words (the hosts are little-endian: hashing.py checks)."""
    if len(view) % 8:
        raise ValueError(what)
    return view.cast("Q")


def _u64_array(view: memoryview) -> U64:
    """A byte view's whole uint64 words as a numpy array (no copy)."""
    return np.frombuffer(view, dtype=_U64_LE, count=len(view) // 8)


def _position(value: object) -> int:
    """A ring position (uint64), with the C kernels' errors."""
    if not isinstance(value, int):
        raise TypeError("an integer is required")
    if value < 0 or value > MASK64:
        raise OverflowError("position must be an unsigned 64-bit int")
    return value


# ---- Hashes ----------------------------------------------------------------------------


def mix64(value: int) -> int:
    """splitmix64's finaliser of ``value`` mod 2^64."""
    value = operator.index(value) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def xxh64(data: Buffer, seed: int = 0) -> int:
    """XXH64 of a bytes-like object (the xxhash package's)."""
    return xxhash.xxh64_intdigest(_bytes(data), operator.index(seed) & MASK64)


def vector_kernels() -> bool:
    """Whether prompt hashing uses a SIMD kernel: never in Python."""
    return False


def set_vector_kernels(on: bool) -> bool:
    """No SIMD kernel to switch in Python (the values are the same either way); returns the
    previous setting, always False."""
    bool(on)  # the compiled call's truth test, errors included
    return False


def _block_values(tokens: memoryview, mult: U64, first: int, end: int) -> U64:
    """``sum_w word[j][w] * mult[w]`` (mod 2^64) for blocks ``first <= j < end``."""
    words = len(mult)
    data = np.frombuffer(tokens, dtype=_U64_LE, count=end * words)
    return data[first * words:].reshape(end - first, words) @ mult


def prefix_hashes(
    tokens: Buffer, mult: Buffer, salt: Buffer, salt_start: int, out: Buffer, start_prefix: int
) -> None:
    """Prefix-block hashes into ``out``: ``out[k] = start_prefix + sum_{j<=k}
    (block_value(j) ^ salt[salt_start + j])`` (mod 2^64), one per uint64 of ``out``;
    ``tokens`` must hold at least that many blocks of ``2 * len(mult)`` int32 tokens."""
    token_bytes, mult_bytes, salt_bytes = _bytes(tokens), _bytes(mult), _bytes(salt)
    out_view = memoryview(out)
    if out_view.readonly:
        raise TypeError("prefix_hashes: out must be a writable buffer")
    out_bytes = _bytes(out_view)
    salt_start = operator.index(salt_start)
    words_per_block = len(mult_bytes) // 8
    blocks = len(out_bytes) // 8
    if (words_per_block <= 0 or len(token_bytes) < blocks * words_per_block * 8
            or salt_start < 0 or len(salt_bytes) // 8 - salt_start < blocks):
        raise ValueError("prefix_hashes: buffer sizes do not match")
    if not blocks:
        return
    multipliers = np.frombuffer(mult_bytes, dtype=_U64_LE, count=words_per_block)
    salts = np.frombuffer(salt_bytes, dtype=_U64_LE, count=salt_start + blocks)[salt_start:]
    result = np.frombuffer(out_bytes, dtype=_U64_LE, count=blocks)
    np.cumsum(_block_values(token_bytes, multipliers, 0, blocks) ^ salts, out=result)
    result += np.uint64(operator.index(start_prefix) & MASK64)


class _Prompt:
    """A prompt and the hashing constants, as the key kernels read them."""

    __slots__ = ("block_tokens", "hashes", "mult", "num_hashes", "num_salts", "num_tokens",
                 "salt", "tokens")

    def __init__(self, tokens: Buffer, mult: Buffer, salt: Buffer, hashes: Buffer | None) -> None:
        self.tokens = _bytes(tokens)
        mult_bytes = _bytes(mult)
        salt_bytes = _bytes(salt)
        hash_bytes = _bytes(hashes) if hashes is not None else None
        words_per_block = len(mult_bytes) // 8
        if (len(self.tokens) % 4 or words_per_block <= 0
                or (hash_bytes is not None and len(hash_bytes) % 8)):
            raise ValueError("prompt key: bad buffer sizes")
        self.num_tokens = len(self.tokens) // 4
        self.mult = np.frombuffer(mult_bytes, dtype=_U64_LE, count=words_per_block)
        self.block_tokens = 2 * words_per_block
        self.salt = _u64_array(salt_bytes)
        self.num_salts = len(self.salt)
        self.hashes: memoryview | U64 = (
            hash_bytes.cast("Q") if hash_bytes is not None else np.empty(0, np.uint64))
        self.num_hashes = len(self.hashes)

    def key_value(self, length: int) -> int:
        """The key hash at ``length`` (see the module docstring)."""
        if length < 0 or length > self.num_tokens:
            raise ValueError("key length past the prompt")
        blocks, rest = divmod(length, self.block_tokens)
        if blocks == 0 or rest:
            return xxhash.xxh64_intdigest(self.tokens[: 4 * length], KEY_SEED)
        if blocks <= self.num_hashes:
            return mix64(int(self.hashes[blocks - 1]))
        if blocks > self.num_salts:
            raise ValueError("key length past the salt table")
        # Past the caller's hashes: continue the prefix hash from the last one given.
        start = self.num_hashes
        value = int(self.hashes[start - 1]) if start else 0
        tail = _block_values(self.tokens, self.mult, start, blocks) ^ self.salt[start:blocks]
        return mix64(value + int(tail.sum(dtype=np.uint64)))


def key_hash(tokens: Buffer, mult: Buffer, salt: Buffer, hashes: Buffer, length: int) -> int:
    """A prompt's ring key hash at ``length``; ``hashes``: its prefix hashes as far as the
    caller has them (may be empty)."""
    return _Prompt(tokens, mult, salt, hashes).key_value(operator.index(length))


class PromptKey(NamedTuple):
    """A prompt's ring key: (hash, length, chain)."""

    hash: int  # the key hash (a ring position)
    length: int  # tokens the key covers
    chain: tuple[int, ...]  # key hashes from the base key to this key


def _check_key_args(hot_step: int, hot: object, splits: object) -> None:
    if hot_step <= 0:
        raise ValueError("hot_step must be positive")
    if not isinstance(hot, set) or not isinstance(splits, dict):
        raise TypeError("hot must be a set and splits a dict")


def _prompt_key(
    prompt: _Prompt, length: int, hot_step: int, max_length: int, hot: set[int],
    splits: dict[int, int],
) -> PromptKey:
    """The key at ``length``; while that key is hot, the key lengthened to just past its
    split (the next multiple of ``hot_step``, capped by the prompt and ``max_length``), as
    long as that is longer."""
    key = prompt.key_value(length)
    keys = [key]
    while hot and key in hot:
        split = splits.get(key)
        if split is None or operator.index(split) < 0:
            break
        longer = min((split // hot_step + 1) * hot_step, prompt.num_tokens, max_length)
        if longer <= length:
            break
        length = longer
        key = prompt.key_value(length)
        keys.append(key)
    return PromptKey(key, length, tuple(keys))


def prompt_key(
    tokens: Buffer, mult: Buffer, salt: Buffer, hashes: Buffer, base_length: int,
    hot_step: int, max_length: int, hot: set[int], splits: dict[int, int],
) -> PromptKey:
    """A prompt's ring key (``keys.PrefixKeyBuilder.key`` states the rule); ``chain`` holds
    every key hash from the base key on."""
    hot_step = operator.index(hot_step)
    _check_key_args(hot_step, hot, splits)
    prompt = _Prompt(tokens, mult, salt, hashes)
    return _prompt_key(prompt, operator.index(base_length), hot_step,
                       operator.index(max_length), hot, splits)


# ---- PrefixLru -------------------------------------------------------------------------


def _key(value: object) -> int | None:
    """A uint64 key, or None for an int no key can equal; TypeError for a non-int."""
    if not isinstance(value, int):
        raise TypeError("PrefixLru keys are ints")
    return value if 0 <= value <= MASK64 else None


def _capacity(value: int) -> int:
    capacity = operator.index(value)
    if capacity > _SSIZE_MAX:
        raise OverflowError("capacity too large")
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    return capacity


class PrefixLru:
    """uint64 prefix hashes in LRU order (least recently used first), each with a count.

    ``count`` is 1 for a block recorded from a routed prompt (approximate view) and the
    number of engine blocks mapped to the key for a precise view (``add``/``discard``). Only
    ``record`` and setting ``capacity`` evict; a precise view keeps what the engine reports.
    """

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int = _SSIZE_MAX) -> None:
        self._entries: OrderedDict[int, int] = OrderedDict()
        self._capacity = _capacity(capacity)

    @property
    def capacity(self) -> int:
        """Most keys held; setting it evicts the least recently used beyond it."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = _capacity(value)
        self._evict()

    def _evict(self) -> None:
        entries, capacity = self._entries, self._capacity
        while len(entries) > capacity:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, value: object) -> bool:
        key = _key(value)
        return key is not None and key in self._entries

    def cached_blocks(self, hashes: Buffer, hint: int = 0) -> int:
        """Leading blocks of a prompt whose prefix hashes (uint64 buffer) are held: a binary
        search, valid because a view is closed under prefixes. Prefix 1 is probed first,
        then, if ``1 < hint < len``, prefixes ``hint`` and ``hint + 1``; the probes are the
        compiled search's, so the answer is too, even for a view not closed under prefixes."""
        words = _words(_bytes(hashes), "hashes must be a uint64 buffer")
        return self._search(words, len(words), operator.index(hint))

    def _search(self, hashes: memoryview | list[int], count: int, hint: int) -> int:
        entries = self._entries
        if count == 0 or hashes[0] not in entries:
            return 0
        lo, hi = 1, count  # invariant: prefix lo is held, prefix hi + 1 is not
        if 1 < hint < hi:
            if hashes[hint - 1] not in entries:
                hi = hint - 1
            elif hashes[hint] not in entries:
                return hint
            else:
                lo = hint + 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if hashes[mid - 1] in entries:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def record(self, hashes: Buffer) -> None:
        """A routed prompt's prefix hashes, touched tail first (the deepest block first, the
        first block last, so it ends most recently used; a held key keeps its count), then
        the least recently used entries evicted down to capacity."""
        words = _words(_bytes(hashes), "hashes must be a uint64 buffer")
        entries = self._entries
        to_end = entries.move_to_end
        for key in reversed(words.tolist()):
            if key in entries:
                to_end(key)
            else:
                entries[key] = 1
        self._evict()

    def add(self, key: int) -> None:
        """One more engine block maps to ``key`` (a precise view; no eviction). A new key
        goes in as most recently used; a held one keeps its place."""
        value = _key(key)
        if value is None:
            raise OverflowError("PrefixLru keys are unsigned 64-bit ints")
        entries = self._entries
        entries[value] = entries.get(value, 0) + 1

    def discard(self, key: int) -> None:
        """One engine block fewer maps to ``key``; gone at zero (absent: no-op)."""
        value = _key(key)
        entries = self._entries
        if value is not None and value in entries:
            left = entries[value] - 1
            if left:
                entries[value] = left
            else:
                del entries[value]

    def count(self, key: int) -> int:
        """Engine blocks (or 1 for a recorded block) mapped to ``key``; 0 if absent."""
        value = _key(key)
        return 0 if value is None else self._entries.get(value, 0)

    def clear(self) -> None:
        """Hold nothing."""
        self._entries.clear()

    def keys(self) -> list[int]:
        """The held keys, least recently used first."""
        return list(self._entries)


# ---- RingIndex -------------------------------------------------------------------------


class RingIndex:
    """Lookups on a consistent-hash ring: sorted uint64 ``positions``, each with an int32
    owner label (the member's slot). A position belongs to the first point at or after it,
    wrapping around."""

    __slots__ = ("_count", "_next_distinct", "_owners", "_positions")

    def __init__(self, positions: Buffer, owners: Buffer) -> None:
        if hasattr(self, "_count"):
            raise RuntimeError("RingIndex is immutable")
        position_bytes, owner_bytes = _bytes(positions), _bytes(owners)
        count = len(position_bytes) // 8
        if (len(position_bytes) % 8 or len(owner_bytes) != count * 4
                or count >= _RING_MAX_POINTS):
            raise ValueError("RingIndex: positions (uint64) and owners (int32) must pair up")
        points = np.frombuffer(position_bytes, dtype=_U64_LE)
        labels = np.frombuffer(owner_bytes, dtype="<i4")
        if count > 1 and bool((points[1:] < points[:-1]).any()):
            raise ValueError("RingIndex: positions must be sorted")
        self._positions: list[int] = points.tolist()
        self._owners: list[int] = labels.tolist()
        self._next_distinct: list[int] = self._distinct_after(labels).tolist()
        self._count = count

    @staticmethod
    def _distinct_after(labels: npt.NDArray[np.int32]) -> npt.NDArray[np.intp]:
        """Per point, the next point clockwise with another owner (itself if none): one past
        the end of the point's run of equal owners."""
        count = len(labels)
        ends = np.flatnonzero(labels != np.roll(labels, -1))  # own[k + 1] != own[k]
        if not len(ends):
            return np.arange(count)
        run = np.searchsorted(ends, np.arange(count))  # the first run end at or after k
        run[run == len(ends)] = 0  # past the last end: the run wraps to the first
        return (ends[run] + 1) % count  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self._count

    def index(self, position: int) -> int:
        """The first point at or after ``position`` (``len`` past the last)."""
        return bisect_left(self._positions, _position(position))

    def first(self, position: int, eligible: Buffer, exclude: int = -1) -> int:
        """The owner label of the first point clockwise from ``position`` whose owner is
        eligible (``eligible[label] != 0``, a bytes-like mask) and is not ``exclude``; -1 if
        there is none."""
        mask = eligible if type(eligible) is bytes else bytes(_bytes(eligible))
        exclude = operator.index(exclude)
        position = _position(position)
        count = self._count
        if not count:
            return -1
        return self._first(bisect_left(self._positions, position), mask, exclude)

    def _first(self, start: int, mask: bytes, exclude: int) -> int:
        owners, count, labels = self._owners, self._count, len(mask)
        if start == count:
            start = 0
        owner = owners[start]
        if owner == exclude:  # the next distinct owner, in one step
            start = self._next_distinct[start]
            owner = owners[start]
        if owner != exclude and 0 <= owner < labels and mask[owner]:
            return owner
        for owner in chain(owners[start + 1:], owners[:start]):
            if owner != exclude and 0 <= owner < labels and mask[owner]:
                return owner
        return -1

    def next_distinct(self, point: int) -> int:
        """The next point clockwise with another owner (itself if the ring has one owner)."""
        point = operator.index(point)
        if not 0 <= point < self._count:
            raise IndexError("RingIndex: point out of range")
        return self._next_distinct[point]


# ---- LastHolderIndex -------------------------------------------------------------------


class LastHolderIndex:
    """Fleet-wide: which instance a prompt through each prefix was last routed to.

    Maps prefix-block hashes to the id of the instance that last received a prompt through
    that prefix. ``record`` keeps a prompt's prefixes on a grid: every block up to
    ``dense_blocks``, then every ``grid_blocks`` blocks (16 and 64 tokens with the default
    hasher). Every recorded prompt adds all its grid prefixes, so the held ones are closed
    under taking shorter grid prefixes and ``deepest`` binary-searches a prompt's grid
    prefixes for the deepest one held: the last holder of the longest routed prefix of the
    prompt, to within a grid step. For a conversation's next turn that is the previous
    turn's prompt, held by the instance that served it, wherever that was (a ring home, a
    load fallback, before its key or the ring membership changed). It is a hint: the caller
    checks that instance's own cache view, which knows about evictions and the exact depth.
    The index forgets by generations (when the newer of two dicts holds ``capacity / 2``
    entries after a recorded prompt, it becomes the older and the oldest is dropped), which
    keeps the closure: each generation is a union of whole recorded prompts.
    """

    __slots__ = ("_new", "_old", "capacity", "dense_blocks", "grid_blocks")

    def __init__(self, capacity: int = 1 << 18, grid_blocks: int = 4,
                 dense_blocks: int = 8) -> None:
        capacity, grid_blocks = operator.index(capacity), operator.index(grid_blocks)
        dense_blocks = operator.index(dense_blocks)
        if capacity < 2 or grid_blocks < 1 or dense_blocks < 0:
            raise ValueError("need capacity >= 2, grid_blocks >= 1, dense_blocks >= 0")
        self.capacity = capacity
        self.grid_blocks = grid_blocks
        self.dense_blocks = dense_blocks
        self._new: dict[int, str] = {}
        self._old: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def blocks_at(self, point: int) -> int:
        """Prefix length in blocks of grid point ``point`` (1-based; 0 is the empty prefix)."""
        dense = self.dense_blocks
        return point if point <= dense else dense + (point - dense) * self.grid_blocks

    def points_within(self, blocks: int) -> int:
        """Grid points whose prefix has at most ``blocks`` blocks (``blocks >= 0``)."""
        if blocks < 0:
            raise ValueError("blocks must be >= 0")
        dense = self.dense_blocks
        return blocks if blocks <= dense else dense + (blocks - dense) // self.grid_blocks

    def record(self, prefix_hashes: Buffer, instance_id: str, from_block: int = 0) -> None:
        """A prompt with ``prefix_hashes`` (a uint64 buffer) was routed to ``instance_id``;
        ``from_block`` (>= 0): its grid prefixes up to that many blocks are left as they are
        (the caller knows the instance already held them: a conversation's next turn on the
        same replica then costs only its new blocks)."""
        if not isinstance(instance_id, str):
            raise TypeError("instance_id must be a str")
        from_block = operator.index(from_block)
        if from_block < 0:
            raise ValueError("from_block must be >= 0")
        view = _bytes(prefix_hashes)
        if len(view) % 8:
            raise ValueError("prefix_hashes must be a uint64 buffer")
        hashes = _u64_array(view)
        dense, grid = self.dense_blocks, self.grid_blocks
        first = self.blocks_at(self.points_within(from_block) + 1)  # blocks, 1-based
        if first <= dense:
            points = hashes[first - 1:dense].tolist()
            points += hashes[dense + grid - 1::grid].tolist()
        else:
            points = hashes[first - 1::grid].tolist()
        new = self._new
        new.update(dict.fromkeys(points, instance_id))
        if len(new) >= self.capacity // 2:
            self._old, self._new = new, {}

    def deepest(self, prefix_hashes: Buffer, beyond: int = 0) -> tuple[str | None, int]:
        """(the last holder of the prompt's deepest held grid prefix, that prefix's length
        in blocks) if it is longer than the grid prefix of ``beyond`` (>= 0) blocks, else
        ``(None, 0)``. The grid prefix just past ``beyond`` is probed first: when it is not
        held (the usual case: the caller passes what it already found cached), that one
        probe is the whole search."""
        hashes = _words(_bytes(prefix_hashes), "prefix_hashes must be a uint64 buffer")
        beyond = operator.index(beyond)
        if beyond < 0:
            raise ValueError("beyond must be >= 0")
        return self._deepest(hashes, beyond)

    def _deepest(self, hashes: memoryview | list[int], beyond: int) -> tuple[str | None, int]:
        new, old = self._new, self._old
        dense, grid = self.dense_blocks, self.grid_blocks
        after = beyond + 1 if beyond < dense else beyond + grid - (beyond - dense) % grid
        if after > len(hashes):
            return None, 0
        value = hashes[after - 1]
        if value not in new and value not in old:
            return None, 0
        blocks_at = self.blocks_at
        lo, hi = self.points_within(after), self.points_within(len(hashes))
        # invariant: grid point lo is held, grid point hi + 1 is not
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            value = hashes[blocks_at(mid) - 1]
            if value in new or value in old:
                lo = mid
            else:
                hi = mid - 1
        depth = blocks_at(lo)
        value = hashes[depth - 1]
        holder = new.get(value)
        return (holder if holder is not None else old.get(value)), depth


# ---- One decision ----------------------------------------------------------------------


def locate(
    tokens: Buffer, mult: Buffer, salt: Buffer, base_length: int, hot_step: int,
    max_length: int, hot: set[int], splits: dict[int, int],
    lookups: tuple[RingIndex, ...], eligible: Buffer, tables: list[PrefixLru | None] | None,
    names: list[str], continuity: Continuity | None = None,
) -> tuple[PromptKey, tuple[str, ...], tuple[int, ...], bytes, Candidate]:
    """The per-decision work of a ring policy with cache views in one call
    (``ring_keys.KeyedRings.locate`` documents it):

    1. hashes: the prompt's prefix hashes (``prefix_hashes``), uint64 in a bytes object;
    2. the prompt's key (``prompt_key``, reusing hashes);
    3. homes: on the first ring of ``lookups``, the first eligible owner of the key hash; on
       the second (if any), the first eligible owner other than that, each as
       ``names[slot]``;
    4. cached blocks per home: ``tables[slot].cached_blocks(hashes, hint)`` (0 where
       ``tables`` is None or holds None), the hint for the first home being one hot step
       short of a lengthened key, and for each next one the previous answer;
    5. ``candidate``: DualMap's continuity candidate, with ``continuity = (holders, held,
       routable)`` (a ``LastHolderIndex``, each instance's ``PrefixLru`` by id, the
       routable ids) and at least one home; see ``_continuity_candidate``. None without.
    """
    if not isinstance(lookups, tuple):
        raise TypeError("lookups must be a tuple")
    if not isinstance(names, list):
        raise TypeError("names must be a list")
    mask = eligible if type(eligible) is bytes else bytes(_bytes(eligible))
    hot_step = operator.index(hot_step)
    _check_key_args(hot_step, hot, splits)
    if not 1 <= len(lookups) <= 2:
        raise ValueError("locate: one or two rings")
    if not all(isinstance(lookup, RingIndex) for lookup in lookups):
        raise TypeError("lookups must be RingIndex objects")
    if tables is not None and not isinstance(tables, list):
        raise TypeError("tables must be a list or None")
    if continuity is not None and not (
            isinstance(continuity, tuple) and len(continuity) == 3
            and isinstance(continuity[0], LastHolderIndex) and isinstance(continuity[1], dict)
            and isinstance(continuity[2], set | frozenset)):
        raise TypeError("continuity must be None or (LastHolderIndex, dict of PrefixLru, "
                        "set of routable ids)")
    prompt = _Prompt(tokens, mult, salt, None)
    count = prompt.num_tokens // prompt.block_tokens
    if prompt.num_salts < count:
        raise ValueError("locate: the salt table does not cover the prompt")
    hashes = np.empty(count, dtype=_U64_LE)
    if count:
        np.cumsum(_block_values(prompt.tokens, prompt.mult, 0, count) ^ prompt.salt[:count],
                  out=hashes)
    hash_list: list[int] = hashes.tolist()
    prompt.hashes, prompt.num_hashes = hashes, count
    key = _prompt_key(prompt, operator.index(base_length), hot_step,
                      operator.index(max_length), hot, splits)
    found: list[int] = []
    for lookup in lookups:
        if not lookup._count:
            break
        start = bisect_left(lookup._positions, key.hash)
        slot = lookup._first(start, mask, found[-1] if found else -1)
        if slot < 0:
            break
        found.append(slot)
    # Search hint: a lengthened key ends one hot step past the point where the prompts
    # through its prefix diverge, likely where this prompt's cached prefix ends; for the
    # next home, the previous one's answer. (C's division truncates towards zero.)
    hint = int((key.length - hot_step) / prompt.block_tokens) if len(key.chain) > 1 else 0
    homes: list[str] = []
    blocks: list[int] = []
    for slot in found:
        table = tables[slot] if tables is not None and slot < len(tables) else None
        if table is not None and not isinstance(table, PrefixLru):
            raise TypeError("tables must hold PrefixLru objects or None")
        hint = 0 if table is None else table._search(hash_list, count, hint)
        if slot >= len(names):
            raise IndexError("locate: a ring slot has no name")
        homes.append(names[slot])
        blocks.append(hint)
    candidate: Candidate = None
    if continuity is not None and homes:
        candidate = _continuity_candidate(
            continuity, tuple(homes), hash_list, prompt.block_tokens, key.length, max(blocks),
            prompt.num_tokens)
    return key, tuple(homes), tuple(blocks), hashes.tobytes(), candidate


def _continuity_candidate(
    continuity: Continuity, homes: tuple[str, ...], hashes: list[int], block_size: int,
    key_length: int, home_blocks: int, num_tokens: int,
) -> Candidate:
    """DualMap's continuity candidate (``dualmap.py``): the routable instance, not a home,
    that holds a longer cached prefix of the prompt than either home, found through the
    fleet-wide ``holders`` index and checked in its own cache view (``held[id]``), as
    ``(id, cached blocks)``. Its prefix must cover the key (``key_length`` tokens), as a
    home's must to count: a shorter one (a shared system prompt) is no conversation's own.
    None if there is no such instance; when the index names one (the replica of the
    conversation's previous turn, off the homes) that cannot be taken, the decision reason
    that says why: ``holder_unroutable`` (not in ``routable`` or without a view) or
    ``holder_evicted`` (its view no longer holds what the index recorded)."""
    holders, held, routable = continuity
    # Only a prefix deeper than the homes' and than the key can count: the search starts
    # past both (one probe when none is held, as for a new conversation behind a hot
    # system prompt, whose key ends a step past the prefix everyone shares).
    holder, depth = holders._deepest(hashes, max(home_blocks, key_length // block_size))
    if (holder is None or (depth + holders.grid_blocks) * block_size <= key_length
            or holder in homes):
        return None
    # Past the key, the index shows the holder got this conversation's own prefix; a grid
    # step short of the key, only its cache view can tell.
    proven = depth * block_size >= key_length
    table = held.get(holder)
    if table is None or holder not in routable:
        return "holder_unroutable" if proven else None
    if not isinstance(table, PrefixLru):
        raise TypeError("continuity: held must map ids to PrefixLru objects")
    blocks = table._search(hashes, len(hashes), depth)
    if blocks < depth:  # the view lost what the index recorded
        return "holder_evicted" if proven else None
    cached = min(blocks * block_size, max(0, num_tokens - 1))
    if blocks <= home_blocks or cached < key_length:
        return None
    return holder, blocks


def affinity_pick(
    homes: tuple[str, ...], cached_blocks: tuple[int, ...], index: dict[str, int],
    fixed: Buffer, queued: Buffer, slope: Buffer, block_size: int, num_tokens: int,
    key_length: int,
) -> tuple[int, tuple[tuple[int, float], ...]]:
    """DualMap's per-candidate estimates and affinity pick. For each candidate (one to
    three: c1, c2, then the continuity candidate): ``i = index[candidate]``;
    ``cached = min(cached_blocks * block_size, num_tokens - 1)`` (at least 0);
    ``ttft = fixed[i] + (queued[i] + num_tokens - cached) * slope[i]``, the predicted TTFT;
    estimates hold ``(cached, ttft)`` per candidate. The pick is the larger cached prefix,
    ties to the lower TTFT, then the earlier candidate; a cached prefix counts only if it
    covers the key (``cached >= key_length``), else the candidate scores as cold with its
    uncached TTFT. ``fixed``, ``queued`` and ``slope`` are float64 arrays aligned with
    ``index``."""
    if not isinstance(homes, tuple) or not isinstance(cached_blocks, tuple):
        raise TypeError("homes and cached_blocks must be tuples")
    if not isinstance(index, dict):
        raise TypeError("index must be a dict")
    fixed_bytes, queued_bytes, slope_bytes = _bytes(fixed), _bytes(queued), _bytes(slope)
    block_size = operator.index(block_size)
    num_tokens = operator.index(num_tokens)
    key_length = operator.index(key_length)
    count = len(homes)
    size = len(fixed_bytes) // 8
    if (not 1 <= count <= 3 or len(cached_blocks) != count
            or len(queued_bytes) // 8 != size or len(slope_bytes) // 8 != size):
        raise ValueError("affinity_pick: one to three candidates, aligned arrays")
    f = fixed_bytes[: 8 * size].cast("d")
    q = queued_bytes[: 8 * size].cast("d")
    s = slope_bytes[: 8 * size].cast("d")
    most_cached = num_tokens - 1 if num_tokens > 1 else 0
    estimates: list[tuple[int, float]] = []
    scores: list[tuple[float, float]] = []
    for home, held in zip(homes, cached_blocks, strict=True):
        i = operator.index(index[home])
        held = operator.index(held)
        if not 0 <= i < size:
            raise IndexError("affinity_pick: index past the arrays")
        cached = min(held * block_size, most_cached)
        ttft = f[i] + (q[i] + float(num_tokens - cached)) * s[i]
        if cached >= key_length:
            scores.append((-float(cached), ttft))
        else:  # cold for this key: its TTFT as if nothing were cached
            scores.append((0.0, f[i] + (q[i] + float(num_tokens)) * s[i]))
        estimates.append((cached, ttft))
    best = 0
    for k in range(1, count):
        if (scores[k][0] < scores[best][0]
                or (scores[k][0] == scores[best][0] and scores[k][1] < scores[best][1])):
            best = k
    return best, tuple(estimates)
