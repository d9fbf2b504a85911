"""An approximate radix tree of the prompts routed to one backend: bounded and LRU-evicted.

The origin keeps one ``RadixTree`` per backend and inserts every prompt it sends there; the
longest prefix of a new prompt found in a backend's tree estimates how much of that prompt
the backend still holds in its KV cache. It is approximate twice over: it records what was
*routed*, not what the backend really cached, and it forgets on its own schedule (LRU over
``capacity`` elements), not the backend's.

Sequences are any sliceable sequence whose slices compare in C: ``str`` (route on
characters), ``tuple[int, ...]`` (route on token ids), ``bytes``. The tree is a compressed
trie: each node holds a non-empty edge label, children are keyed by their label's first
element, and the sum of label lengths (``size``) never exceeds ``capacity`` after an insert.

Recency needs no clock: nodes sit in one ordered map, and an insert moves the nodes of its
path to the most-recent end leaf first, parents after. A parent therefore always ranks as
more recent than every child, so the least recently used node is always a leaf. Eviction
trims that leaf from its tail (as vLLM frees a finished sequence's blocks tail first) or
drops it whole, and repeats until the tree is within bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

__all__ = ["RadixTree", "common_prefix_length"]


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``.

    Binary search over slice comparisons, so the element-wise work runs in C: about
    ``log2(n)`` comparisons of shrinking segments instead of a Python loop over ``n``.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n   # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    __slots__ = ("children", "key", "parent")

    def __init__(self, key: Sequence[Any], parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[Hashable, _Node] = {}


class RadixTree:
    """Prefixes of the sequences inserted, at most ``capacity`` elements, least recent out first.

    ``match(seq)`` is the length of the longest prefix of ``seq`` the tree holds (no side
    effect); ``insert(seq)`` returns the same length, then records ``seq`` as the most
    recent and evicts down to ``capacity``.
    """

    __slots__ = ("_lru", "_root", "capacity", "inserts", "size")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self.inserts = 0
        self._root = _Node((), None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    @property
    def nodes(self) -> int:
        """Nodes below the root (each holds at least one element)."""
        return len(self._lru)

    def clear(self) -> None:
        """Forget everything (the backend restarted or reset its prefix cache)."""
        self._root = _Node((), None)
        self._lru.clear()
        self.size = 0

    def match(self, seq: Sequence[Any]) -> int:
        """The length of the longest prefix of ``seq`` held in the tree."""
        node, matched = self._root, 0
        n = len(seq)
        while matched < n:
            child = node.children.get(seq[matched])
            if child is None:
                break
            key = child.key
            common = common_prefix_length(key, seq[matched:matched + len(key)])
            matched += common
            if common < len(key):
                break
            node = child
        return matched

    def insert(self, seq: Sequence[Any]) -> int:
        """Record ``seq`` as the most recently used; returns what ``match`` returned before."""
        self.inserts += 1
        node, matched = self._root, 0
        n = len(seq)
        path: list[_Node] = []
        while matched < n:
            child = node.children.get(seq[matched])
            if child is None:
                leaf = _Node(seq[matched:], node)
                node.children[seq[matched]] = leaf
                self.size += n - matched
                path.append(leaf)
                break
            key = child.key
            common = common_prefix_length(key, seq[matched:matched + len(key)])
            if common < len(key):
                child = self._split(child, common)
            matched += common
            path.append(child)
            node = child
        before = matched
        for visited in reversed(path):   # leaf first: every parent ends up more recent
            self._lru[visited] = None
            self._lru.move_to_end(visited)
        self._evict()
        return before

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s label at ``at``: a new parent takes the head, ``node`` keeps the tail
        (and its children and its place in the recency order)."""
        parent = node.parent
        assert parent is not None
        head = _Node(node.key[:at], parent)
        parent.children[node.key[0]] = head
        node.key = node.key[at:]
        node.parent = head
        head.children[node.key[0]] = node
        self._lru[head] = None
        return head

    def _evict(self) -> None:
        while self.size > self.capacity:
            leaf = next(iter(self._lru))
            excess = self.size - self.capacity
            if len(leaf.key) > excess:
                leaf.key = leaf.key[:len(leaf.key) - excess]
                self.size -= excess
                return
            parent = leaf.parent
            assert parent is not None and not leaf.children
            del parent.children[leaf.key[0]]
            del self._lru[leaf]
            self.size -= len(leaf.key)
