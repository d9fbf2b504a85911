"""Prometheus metrics of one edge node, in a registry of its own (several nodes share a test process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RESULTS", "NodeMetrics"]

# Values of the ``cache_result`` label.
RESULTS = ("hit", "miss", "collapsed", "stale", "bypass", "error")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetrics:
    """``edgecache_*`` metrics; label children are bound once so the hit path only increments."""

    def __init__(self, region: str, tier_stats: Callable[[str], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgecache_requests", "Requests by endpoint and cache result",
                                ["region", "endpoint", "cache_result"], registry=self.registry)
        self.latency = Histogram("edgecache_request_duration_seconds",
                                 "Time from request to the last byte written, by cache result",
                                 ["region", "cache_result"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.fills = Counter("edgecache_origin_fills", "Requests sent to the origin, by outcome",
                             ["region", "outcome"], registry=self.registry)
        entries = Gauge("edgecache_tier_entries", "Entries held, by tier", ["region", "tier"], registry=self.registry)
        size = Gauge("edgecache_tier_bytes", "Bytes held, by tier", ["region", "tier"], registry=self.registry)
        for tier in ("memory", "disk"):
            entries.labels(region, tier).set_function(lambda t=tier: tier_stats(t)[0])
            size.labels(region, tier).set_function(lambda t=tier: tier_stats(t)[1])
        self._requests = {(e, r): self.requests.labels(region, e, r) for e in ("chat", "completions") for r in RESULTS}
        self._latency = {r: self.latency.labels(region, r) for r in RESULTS}
        self._fills = {o: self.fills.labels(region, o) for o in ("stored", "not_stored", "error", "cancelled")}

    def observe(self, endpoint: str, result: str, seconds: float) -> None:
        self._requests[endpoint, result].inc()
        self._latency[result].observe(seconds)

    def fill(self, outcome: str) -> None:
        self._fills[outcome].inc()
