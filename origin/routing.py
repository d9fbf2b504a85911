"""Which backend gets a request: round robin, least loaded, or prefix (KV-cache) aware.

A ``Router`` orders the backends that may take a request, best first; the pool tries them in
that order (failover before the first byte) and calls ``record`` for the backend that took
it. Routers do no I/O and read no clock: the pool passes each backend's load (requests in
flight from this origin) and which backends are available (healthy, circuit not open).

``prefix_aware`` follows the cache-aware policy of the SGLang router, with our own
thresholds (measured with ``bench/prefix_routing.py``, see bench/README.md):

1. Match the routing text (the prompt as the backend will see it, in characters) against a
   bounded, LRU-evicted ``RadixTree`` per backend of the prompts routed there. The backend
   with the longest match wins; ties go to the lower load.
2. A *short match* (matched / text length below ``cache_threshold``) means no backend is
   likely to hold the prompt's prefix: among the backends not out of balance with the
   least-loaded one (within ``balance_abs_threshold`` requests of it), take the one whose
   tree is smallest (the most room for a new prefix), then the less loaded, then in turn.
   Spreading new prefixes by room rather than by momentary load keeps the resident prefixes
   even across backends (in the manner of the SGLang router's older smallest-tree rule).
3. An *overloaded* winner, whose load exceeds the least-loaded backend's by more than
   ``balance_abs_threshold`` requests *and* more than ``balance_rel_threshold`` times, gives
   way to the least-loaded backend. Unlike the SGLang router, which switches to shortest
   queue whenever any two backends are out of balance, only the winner's own load is
   compared: a hot prefix on one backend does not scatter every other prefix.

Routing on characters rather than tokens: matching a 12,500-character prompt in a tree
holding 16 such groups takes about 5 µs; tokenising it alone (a cheap regex tokeniser)
takes 360-540 µs, and the character match ratio tracks the token match ratio closely.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edgecache.radix import RadixTree

__all__ = [
    "POLICIES",
    "Decision",
    "LeastLoaded",
    "PrefixAware",
    "PrefixAwareParams",
    "RoundRobin",
    "Router",
    "make_router",
]

POLICIES = ("round_robin", "least_loaded", "prefix_aware")


@dataclass(frozen=True, slots=True)
class Decision:
    """Backends to try, best first (indices into the pool), and why the first one.

    reason: ``round_robin``, ``least_loaded``, ``affinity`` (longest prefix match),
    ``short_match`` (no useful match: least loaded), ``imbalance`` (the best match was
    overloaded: least loaded). matched: characters of the route matched on ``order[0]``.
    """

    order: tuple[int, ...]
    reason: str
    matched: int = 0


@dataclass(frozen=True, slots=True)
class PrefixAwareParams:
    """Thresholds of ``prefix_aware`` (defaults chosen by measurement, bench/README.md).

    cache_threshold: a match shorter than this share of the routing text is *short* (0.5).
    balance_abs_threshold: the best match is overloaded only when its load exceeds the
    least-loaded backend's by more than this many requests (8) ...
    balance_rel_threshold: ... and more than this many times (1.5).
    tree_chars: characters of routed prompts remembered per backend (4,000,000, about a
    million tokens: at least one backend's KV cache, so the tree forgets after the backend).
    """

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    tree_chars: int = 4_000_000


class Router(Protocol):
    name: str

    def decide(self, route: str | None, loads: Sequence[int], allowed: Sequence[int]) -> Decision:
        """Order ``allowed`` (non-empty backend indices) for a request; ``loads[i]`` is
        backend ``i``'s requests in flight."""
        ...

    def record(self, route: str | None, index: int) -> None:
        """Backend ``index`` took a request routed on ``route``."""
        ...

    def forget(self, index: int) -> None:
        """Backend ``index`` lost its cache (it restarted, or came back from being down)."""
        ...


def _by_load(allowed: Sequence[int], loads: Sequence[int], start: int) -> list[int]:
    """``allowed`` by load, equal loads in turn from ``start``."""
    n = max(len(loads), 1)
    return sorted(allowed, key=lambda i: (loads[i], (i - start) % n))


class RoundRobin:
    """Each request to the next available backend."""

    name = "round_robin"

    def __init__(self, size: int) -> None:
        self._size = size
        self._turn = itertools.count()

    def decide(self, route: str | None, loads: Sequence[int], allowed: Sequence[int]) -> Decision:
        ordered = sorted(allowed)
        k = next(self._turn) % len(ordered)
        return Decision((*ordered[k:], *ordered[:k]), "round_robin")

    def record(self, route: str | None, index: int) -> None:
        pass

    def forget(self, index: int) -> None:
        pass


class LeastLoaded:
    """The available backend with the fewest requests in flight; ties in turn."""

    name = "least_loaded"

    def __init__(self, size: int) -> None:
        self._size = size
        self._turn = itertools.count()

    def decide(self, route: str | None, loads: Sequence[int], allowed: Sequence[int]) -> Decision:
        order = _by_load(allowed, loads, next(self._turn) % self._size)
        return Decision(tuple(order), "least_loaded")

    def record(self, route: str | None, index: int) -> None:
        pass

    def forget(self, index: int) -> None:
        pass


class PrefixAware:
    """Longest prefix match over per-backend radix trees, least loaded when the match is short
    or the best match is overloaded (see the module docstring)."""

    name = "prefix_aware"

    def __init__(self, size: int, params: PrefixAwareParams | None = None) -> None:
        self.params = params or PrefixAwareParams()
        self.trees = [RadixTree(self.params.tree_chars) for _ in range(size)]
        self._turn = itertools.count()

    def overloaded(self, load: int, least: int) -> bool:
        p = self.params
        return load - least > p.balance_abs_threshold and load > p.balance_rel_threshold * least

    def decide(self, route: str | None, loads: Sequence[int], allowed: Sequence[int]) -> Decision:
        start = next(self._turn) % len(self.trees)
        trees = self.trees
        by_load = sorted(allowed, key=lambda i: (loads[i], trees[i].size, (i - start) % len(trees)))
        least = by_load[0]
        if not route:
            return Decision(tuple(by_load), "least_loaded")
        matches = {i: trees[i].match(route) for i in allowed}
        best = max(by_load, key=lambda i: matches[i])   # max keeps the first of equals: lower load
        if matches[best] < self.params.cache_threshold * len(route):
            band = loads[least] + self.params.balance_abs_threshold
            reason = "short_match"
            first = min((i for i in by_load if loads[i] <= band), key=lambda i: trees[i].size)
        elif best != least and self.overloaded(loads[best], loads[least]):
            reason, first = "imbalance", least
        else:
            reason, first = "affinity", best
        rest = sorted((i for i in allowed if i != first), key=lambda i: (-matches[i], loads[i]))
        return Decision((first, *rest), reason, matches[first])

    def record(self, route: str | None, index: int) -> None:
        if route:
            self.trees[index].insert(route)

    def forget(self, index: int) -> None:
        self.trees[index].clear()


def make_router(policy: str, size: int, params: PrefixAwareParams | None = None) -> Router:
    """The router named ``policy`` (one of ``POLICIES``) over ``size`` backends."""
    if policy == "round_robin":
        return RoundRobin(size)
    if policy == "least_loaded":
        return LeastLoaded(size)
    if policy == "prefix_aware":
        return PrefixAware(size, params)
    raise ValueError(f"unknown routing policy {policy!r} (expected one of {', '.join(POLICIES)})")
