"""Prompt keys on consistent-hash rings, kept in step with the snapshot's membership.

Shared by ``consistent_hash`` (one ring) and ``dualmap`` (two rings with different seeds).
Rings are built from the snapshot's members and weights only (``rings.HashRing``); the
snapshot's epoch tells gateways *when* membership changed, it does not enter positions, so
an epoch bump with unchanged membership moves no key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from router.policy.base import PreparedPrompt
from router.policy.fastpath import PrefixLru, locate
from router.policy.keys import PrefixKeyBuilder, PromptKey
from router.policy.load_board import LoadBoard
from router.policy.rings import HashRing, members_from

if TYPE_CHECKING:
    from router.policy.fastpath import Candidate, Continuity

# Seeds of ring A and ring B: arbitrary fixed constants every gateway replica shares.
RING_SEEDS: tuple[int, int] = (0x2545_F491_4F6C_DD1D, 0x9FB2_1C65_1E98_DF25)


class KeyedRings:
    """One ring per seed plus the key builder; ``sync`` after each board rebuild."""

    def __init__(
        self, seeds: Sequence[int], vnodes_per_weight: int, keys: PrefixKeyBuilder
    ) -> None:
        self.rings = tuple(HashRing(seed, vnodes_per_weight) for seed in seeds)
        self.keys = keys
        self._membership_version = -1  # the board's, at the last sync
        self._eligibility_version = -1
        # Every ring holds the same members, so slots (sorted member order) agree across
        # rings: one eligibility mask serves them all.
        self._names: list[str] = []
        self._eligible_mask = b""
        self._lookups = tuple(ring.lookup for ring in self.rings)
        self._tables: list[PrefixLru | None] | None = None
        # What locate hands the compiled call, looked up once: the hasher's constants as
        # bytes (the salt table covering _salted_tokens), the detector's hot set and splits
        # (the same objects for the builder's life).
        self._hash_block = keys.hasher.block_size
        self._mult = self._salt = b""
        self._salted_tokens = -1
        self._salt_for(0)
        self._hot = keys.hot_prefixes
        self._splits = keys.key_splits

    def _salt_for(self, num_tokens: int) -> None:
        """Take the hasher's constants, grown to cover ``num_tokens``, as bytes: the
        compiled call reads a bytes object's buffer several times faster than a numpy
        array's (~0.1 against ~0.4 µs each, per decision)."""
        mult, salt = self.keys.hasher.constants(num_tokens)
        self._mult, self._salt = mult.tobytes(), salt.tobytes()
        self._salted_tokens = len(salt) * self._hash_block

    def adopt_hot_keys(self, table: dict[int, int]) -> None:
        """Key prompts by a fleet-wide hot-key table (``PrefixKeyBuilder.adopt_shared``)."""
        self.keys.adopt_shared(table)
        self._hot = self.keys.hot_prefixes
        self._splits = self.keys.key_splits

    @property
    def num_members(self) -> int:
        return len(self.rings[0].members)

    def sync(self, board: LoadBoard, tables: Mapping[str, PrefixLru] | None = None) -> bool:
        """Make every ring hold the board's members and take in which of them are routable
        now; True if membership changed. ``tables``: each instance's cached prefixes (a
        cache view's ``held``) for ``locate``; the objects must stay the same until the
        next membership change."""
        changed = False
        if board.membership_version != self._membership_version:
            self._membership_version = board.membership_version
            members = members_from(board.membership())
            for ring in self.rings:
                changed = ring.update(members) or changed
            self._names = self.rings[0].names
            self._lookups = tuple(ring.lookup for ring in self.rings)
            self._tables = None if tables is None else [tables.get(n) for n in self._names]
            self._eligibility_version = -1
        if board.eligibility_version != self._eligibility_version:
            self._eligibility_version = board.eligibility_version
            self._eligible_mask = self.rings[0].eligibility_mask(board.eligible_set)
        return changed

    def locate(
        self, prepared: PreparedPrompt, continuity: Continuity | None = None,
    ) -> tuple[tuple[str, ...], tuple[int, ...], Candidate]:
        """The prompt's homes (``homes``), per home its cached prefix in blocks, and with a
        ``continuity`` context (holder index, cache views, routable ids) DualMap's
        continuity candidate (``fastpath_py.locate``), in one compiled call
        (``_fastpath.locate``) that also sets ``prepared.prefix_hashes`` (the hash block
        size's, as a bytes buffer) and ``prepared.key``. Same answers as ``key``,
        ``homes`` and the cache view's ``cached_blocks`` called one by one."""
        tokens = prepared.tokens
        num_tokens = len(tokens)
        keys = self.keys
        if num_tokens > self._salted_tokens:  # the salt table must cover the prompt
            self._salt_for(num_tokens)
        key, homes, blocks, hashes, candidate = locate(
            tokens, self._mult, self._salt, keys.base_length(num_tokens),
            keys.hot_step, keys.max_key_tokens, self._hot, self._splits, self._lookups,
            self._eligible_mask, self._tables, self._names, continuity)
        prepared.prefix_hashes = hashes
        prepared.key = key
        return homes, blocks, candidate

    def homes(self, key_hash: int) -> tuple[str, ...]:
        """The routable owners of ``key_hash``: the first on ring A, then on each further
        ring the first that is not already taken (DualMap's ``c1`` and ``c2``). Fewer when
        fewer routable members are on the rings; empty when none is."""
        names, mask = self._names, self._eligible_mask
        lookups = self._lookups
        first = lookups[0].first(key_hash, mask)
        if first < 0:
            return ()
        if len(lookups) == 1:
            return (names[first],)
        second = lookups[1].first(key_hash, mask, first)
        return (names[first],) if second < 0 else (names[first], names[second])

    def key(self, prepared: PreparedPrompt) -> PromptKey:
        """The prompt's key (computed once per request; reuses the prompt's prefix hashes
        if the policy computed them first)."""
        if prepared.key is None:
            prepared.key = self.keys.key(prepared.tokens, prepared.prefix_hashes)
        return prepared.key

    def record(self, prepared: PreparedPrompt) -> None:
        """Feed the hot-prefix detector with a dispatched prompt's key chain."""
        self.keys.record(self.key(prepared), prepared.tokens, self.num_members)
