"""Multi-tenant approximate radix tree over token ids (the SGLang router's cache model).

One tree holds the prompts routed to every instance ("tenant"). Each node is an edge label
(a run of token ids) and records, per tenant that routed a prompt through it, when it last
did; tenants are kept in recency order (re-inserting moves a tenant to the end), so "the
most recent tenant of a node" is O(1). A tenant's size is the number of tokens on the nodes
it holds. Eviction drops a tenant's least recently used leaves until its size fits.

Edge labels are int32 numpy arrays: matching an edge compares whole runs in C (``memcmp``
for the usual full match), so walking an 8k-token prompt costs a few node visits, not
8k Python steps.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from router.policy.hashing import TokenArray, common_prefix_length


class _Node:
    __slots__ = ("children", "parent", "tenants", "tokens")

    def __init__(self, tokens: TokenArray, parent: _Node | None) -> None:
        self.tokens = tokens
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.tenants: dict[str, float] = {}  # tenant -> last access; insertion = recency order


def _touch(node: _Node, tenant: str, now: float) -> bool:
    """Mark ``tenant`` as most recent on ``node``; True if it was not there before."""
    present = node.tenants.pop(tenant, None) is not None
    node.tenants[tenant] = now
    return not present


class ApproxRadixTree:
    """Which tenant routed the longest prefix of a prompt (see the module docstring)."""

    def __init__(self) -> None:
        self.root = _Node(np.empty(0, dtype=np.int32), None)
        self._size: dict[str, int] = {}

    def size(self, tenant: str) -> int:
        """Tokens held by ``tenant``."""
        return self._size.get(tenant, 0)

    def tenants(self) -> list[str]:
        return list(self._size)

    def insert(self, tokens: TokenArray, tenant: str, now: float) -> None:
        """Record that ``tokens`` were routed to ``tenant`` at ``now``."""
        node = self.root
        _touch(node, tenant, now)
        size = self._size.get(tenant, 0)
        pos, end = 0, len(tokens)
        while pos < end:
            first = int(tokens[pos])
            child = node.children.get(first)
            if child is None:
                leaf = _Node(np.array(tokens[pos:], dtype=np.int32), node)
                node.children[first] = leaf
                leaf.tenants[tenant] = now
                size += end - pos
                break
            matched = common_prefix_length(child.tokens, tokens[pos:])
            if matched < len(child.tokens):
                child = self._split(child, matched)
            if _touch(child, tenant, now):
                size += len(child.tokens)
            node = child
            pos += matched
        self._size[tenant] = size

    @staticmethod
    def _split(node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` tokens; returns the new upper node."""
        parent = node.parent
        assert parent is not None
        upper = _Node(node.tokens[:at], parent)
        upper.tenants = dict(node.tenants)
        parent.children[int(node.tokens[0])] = upper
        node.tokens = node.tokens[at:]
        node.parent = upper
        upper.children[int(node.tokens[0])] = node
        return upper

    def prefix_match(
        self, tokens: TokenArray, accept: Callable[[str], bool] | None = None
    ) -> tuple[int, str | None]:
        """Longest routed prefix of ``tokens`` and the tenant that routed it most recently.

        Only tenants ``accept`` returns True for count. Returns ``(matched tokens, tenant)``;
        ``(0, None)`` if no accepted tenant shares a first token with ``tokens``.
        """
        node = self.root
        pos, end = 0, len(tokens)
        best_len, best_node = 0, None
        while pos < end:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            matched = common_prefix_length(child.tokens, tokens[pos:])
            pos += matched
            node = child
            if accept is None or any(accept(t) for t in child.tenants):
                best_len, best_node = pos, child
            if matched < len(child.tokens):
                break
        if best_node is None:
            return 0, None
        for tenant in reversed(best_node.tenants):
            if accept is None or accept(tenant):
                return best_len, tenant
        return 0, None  # unreachable: best_node has an accepted tenant

    def evict_tenant_by_size(self, max_size: Callable[[str], int]) -> list[str]:
        """Drop LRU leaves of every tenant over ``max_size(tenant)`` tokens until it fits.

        Returns the tenants whose size changed.
        """
        over = {t for t, s in self._size.items() if s > max_size(t)}
        if not over:
            return []
        leaves: dict[str, list[tuple[float, int, _Node]]] = {t: [] for t in over}
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root:
                continue
            for tenant in over.intersection(node.tenants):
                if not any(tenant in c.tenants for c in node.children.values()):
                    leaves[tenant].append((node.tenants[tenant], id(node), node))
        for tenant, heap in leaves.items():
            heapq.heapify(heap)
            limit = max_size(tenant)
            while self._size[tenant] > limit and heap:
                _, _, node = heapq.heappop(heap)
                self._drop(node, tenant)
                parent = node.parent
                if (
                    parent is not None and parent is not self.root and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())
                ):
                    heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        return sorted(over)

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything ``tenant`` holds."""
        stack = [self.root]
        doomed: list[_Node] = []
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if tenant in node.tenants and node is not self.root:
                doomed.append(node)
        for node in reversed(doomed):  # children before parents
            self._drop(node, tenant)
        self.root.tenants.pop(tenant, None)
        self._size.pop(tenant, None)

    def _drop(self, node: _Node, tenant: str) -> None:
        del node.tenants[tenant]
        self._size[tenant] -= len(node.tokens)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[int(node.tokens[0])]
