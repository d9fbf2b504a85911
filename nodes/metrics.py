"""Prometheus metrics of one edge node, in a registry of its own (several nodes share a test process).

The hit path only adds to plain integers and a bucket list; the Prometheus families are
built when ``/metrics`` is scraped (a custom collector), so a hit takes no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["FILL_OUTCOMES", "LATENCY_BUCKETS", "RESULTS", "NodeMetrics"]

# Values of the ``cache_result`` label.
RESULTS = ("hit", "semantic_hit", "miss", "collapsed", "stale", "bypass", "error")
FILL_OUTCOMES = ("stored", "not_stored", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ENDPOINTS = ("chat", "completions")


class NodeMetrics(Collector):
    """``edgecache_*`` metrics: requests by cache result, latency, tier sizes, origin fills."""

    def __init__(self, region: str, tier_stats: Callable[[str], tuple[int, int]]) -> None:
        self.region = region
        self._tier_stats = tier_stats
        self._requests = {(e, r): 0 for e in _ENDPOINTS for r in RESULTS}
        self._buckets = {r: [0] * (len(LATENCY_BUCKETS) + 1) for r in RESULTS}
        self._sums = dict.fromkeys(RESULTS, 0.0)
        self._fills = dict.fromkeys(FILL_OUTCOMES, 0)
        self.prefix_bytes_saved = 0   # prefix text the clients did not send
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, endpoint: str, result: str, seconds: float) -> None:
        self._requests[endpoint, result] += 1
        self._buckets[result][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sums[result] += seconds

    def fill(self, outcome: str) -> None:
        self._fills[outcome] += 1

    def collect(self) -> Iterator[Metric]:
        region = self.region
        requests = CounterMetricFamily("edgecache_requests", "Requests by endpoint and cache result",
                                       labels=["region", "endpoint", "cache_result"])
        for (endpoint, result), count in self._requests.items():
            requests.add_metric([region, endpoint, result], count)
        yield requests
        latency = HistogramMetricFamily("edgecache_request_duration_seconds",
                                        "Time from request to response, by cache result",
                                        labels=["region", "cache_result"])
        for result, counts in self._buckets.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([region, result], buckets, self._sums[result])
        yield latency
        fills = CounterMetricFamily("edgecache_origin_fills", "Requests sent to the origin, by outcome",
                                    labels=["region", "outcome"])
        for outcome, count in self._fills.items():
            fills.add_metric([region, outcome], count)
        yield fills
        saved = CounterMetricFamily("edgecache_prefix_bytes_saved",
                                    "Bytes of prefix text clients referenced by id instead of sending",
                                    labels=["region"])
        saved.add_metric([region], self.prefix_bytes_saved)
        yield saved
        entries = GaugeMetricFamily("edgecache_tier_entries", "Entries held, by tier", labels=["region", "tier"])
        size = GaugeMetricFamily("edgecache_tier_bytes", "Bytes held, by tier", labels=["region", "tier"])
        for tier in ("memory", "disk"):
            count, nbytes = self._tier_stats(tier)
            entries.add_metric([region, tier], count)
            size.add_metric([region, tier], nbytes)
        yield entries
        yield size
