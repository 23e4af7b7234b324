"""Common base of the policies: the load board and per-request prompt preparation.

Every policy here keeps the router's own in-flight view (``LoadBoard`` over an
``InflightTracker``) through the three feedback hooks, so load-based rules see requests
dispatched since the last engine report. Work done on a prompt while routing it (token
array, prefix hashes, ring key) is kept until ``on_dispatched`` for the same request so it is
not done twice; that memo is bounded and never changes a decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from router.policy.hashing import PrefixHashes, TokenArray, token_array
from router.policy.interfaces import (
    ClusterSnapshot,
    Decision,
    NoInstanceAvailable,
    RoutingPolicy,
    RoutingRequest,
)
from router.policy.keys import PromptKey
from router.policy.load_board import LoadBoard

_MEMO_LIMIT = 4096  # requests routed and not yet dispatched (LAPS queues hold some)


class PreparedPrompt:
    """A request's prompt with lazily derived forms, computed at most once per request."""

    __slots__ = ("_tokens", "key", "num_tokens", "prefix_hashes", "token_ids")

    def __init__(self, token_ids: Sequence[int] | npt.NDArray[np.integer]) -> None:
        self.token_ids = token_ids
        self.num_tokens = len(token_ids)
        self._tokens: TokenArray | None = None
        self.prefix_hashes: PrefixHashes | None = None  # set by policies with a cache view
        self.key: PromptKey | None = None  # set by ring policies

    @property
    def tokens(self) -> TokenArray:
        if self._tokens is None:
            self._tokens = token_array(self.token_ids)
        return self._tokens


class TrackedPolicy(RoutingPolicy):
    """A policy with a ``LoadBoard``; subclasses implement ``route``.

    Hooks: ``on_dispatched`` records the request on the board with the uncached-token
    estimate from ``uncached_tokens`` (the whole prompt unless a subclass knows better) and
    calls ``after_dispatch``; ``on_first_token`` / ``on_finished`` update the board.
    """

    def __init__(self) -> None:
        self.board = LoadBoard()
        # Insertion-ordered (a dict is): the oldest memo goes first when over the limit.
        self._prepared: dict[str, PreparedPrompt] = {}

    # ---- helpers for route -------------------------------------------------------------

    def adopt(self, snapshot: ClusterSnapshot) -> None:
        if self.board.sync(snapshot):
            self.on_rebuild()

    def sync(self, snapshot: ClusterSnapshot) -> None:
        """Adopt ``snapshot``; raise ``NoInstanceAvailable`` if no instance is routable."""
        self.adopt(snapshot)
        if not self.board.eligible_ids:
            raise NoInstanceAvailable(f"no healthy, non-draining instance (epoch {snapshot.epoch})")

    def on_rebuild(self) -> None:
        """The board rebuilt its arrays from a changed snapshot (membership or reports)."""

    def prepare(self, request: RoutingRequest) -> PreparedPrompt:
        """The request's ``PreparedPrompt``, shared between ``route`` and ``on_dispatched``."""
        memo = self._prepared
        prepared = memo.get(request.request_id)
        if prepared is not None and prepared.token_ids is request.token_ids:
            return prepared
        prepared = memo[request.request_id] = PreparedPrompt(request.token_ids)
        if len(memo) > _MEMO_LIMIT:
            del memo[next(iter(memo))]
        return prepared

    # ---- feedback ----------------------------------------------------------------------

    def uncached_tokens(self, prepared: PreparedPrompt, decision: Decision) -> int:
        """Prompt tokens the chosen instance will have to prefill (no cache knowledge: all)."""
        return prepared.num_tokens

    def after_dispatch(
        self, request: RoutingRequest, prepared: PreparedPrompt, decision: Decision, now: float
    ) -> None:
        """Subclass hook: update cache views, counters, ... after the board was updated."""

    def on_dispatched(self, request: RoutingRequest, decision: Decision, now: float) -> None:
        prepared = self.prepare(request)
        self._prepared.pop(request.request_id, None)
        self.board.dispatched(
            request.request_id,
            decision.instance_id,
            prompt_tokens=prepared.num_tokens,
            uncached_tokens=self.uncached_tokens(prepared, decision),
            max_tokens=request.max_tokens,
            now=now,
        )
        self.after_dispatch(request, prepared, decision, now)

    def on_first_token(
        self, request_id: str, instance_id: str, ttft_s: float, cached_tokens: int | None,
        now: float,
    ) -> None:
        self.board.first_token(request_id)

    def on_finished(self, request_id: str, instance_id: str, now: float) -> None:
        self.board.finished(request_id)
        self._prepared.pop(request_id, None)
