"""Prometheus metrics of one edge node, in a registry of its own (several nodes share a test process).

The hit path only adds to plain integers and a bucket list; the Prometheus families are
built when ``/metrics`` is scraped (a custom collector), so a hit takes no lock.

A node with several worker processes on one port (``workers > 1``) answers a scrape from
whichever worker the kernel hands the connection to, so each worker publishes its counts to
``<data_dir>/metrics/worker-<n>.json`` (``SharedCounts``: every second while they change, and
on every scrape) and a scrape answers the sum of every worker's latest file. A worker rewrites
its own file before reading the others, and a file only ever grows, so the totals a scraper
sees never go backwards, whichever worker answers; the other workers' part is at most about a
second old.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["FILL_OUTCOMES", "LATENCY_BUCKETS", "RESULTS", "NodeMetrics", "SharedCounts", "add_counts"]

# Values of the ``cache_result`` label.
RESULTS = ("hit", "semantic_hit", "miss", "collapsed", "stale", "bypass", "error")
FILL_OUTCOMES = ("stored", "not_stored", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ENDPOINTS = ("chat", "completions")


def add_counts(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``total`` plus ``more`` (both ``NodeMetrics.counts()`` documents), as a new document;
    names ``more`` does not know (an older or newer worker) count as zero."""
    out = orjson.loads(orjson.dumps(total))
    for section in ("requests", "sums", "fills"):
        for name in out[section]:
            out[section][name] += more.get(section, {}).get(name, 0)
    for result, counts in out["buckets"].items():
        theirs = more.get("buckets", {}).get(result)
        if theirs and len(theirs) == len(counts):
            out["buckets"][result] = [a + b for a, b in zip(counts, theirs, strict=True)]
    out["prefix_bytes_saved"] += more.get("prefix_bytes_saved", 0)
    entries, nbytes = more.get("memory", (0, 0))
    out["memory"] = [out["memory"][0] + entries, out["memory"][1] + nbytes]
    return out


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

    def counts(self) -> dict[str, Any]:
        """This process's counts as a JSON-able document (what ``SharedCounts`` publishes)."""
        return {"requests": {f"{e}|{r}": n for (e, r), n in self._requests.items()},
                "buckets": {r: list(b) for r, b in self._buckets.items()},
                "sums": dict(self._sums), "fills": dict(self._fills),
                "prefix_bytes_saved": self.prefix_bytes_saved, "memory": list(self._tier_stats("memory"))}

    def render(self, counts: dict[str, Any]) -> Iterator[Metric]:
        """The metric families for ``counts`` (this process's, or every worker's summed)."""
        region = self.region
        requests = CounterMetricFamily("edgecache_requests", "Requests by endpoint and cache result",
                                       labels=["region", "endpoint", "cache_result"])
        for name, count in counts["requests"].items():
            requests.add_metric([region, *name.split("|", 1)], count)
        yield requests
        latency = HistogramMetricFamily("edgecache_request_duration_seconds",
                                        "Time from request to response, by cache result",
                                        labels=["region", "cache_result"])
        for result, per_bucket in counts["buckets"].items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), per_bucket, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([region, result], buckets, counts["sums"][result])
        yield latency
        fills = CounterMetricFamily("edgecache_origin_fills", "Requests sent to the origin, by outcome",
                                    labels=["region", "outcome"])
        for outcome, count in counts["fills"].items():
            fills.add_metric([region, outcome], count)
        yield fills
        saved = CounterMetricFamily("edgecache_prefix_bytes_saved",
                                    "Bytes of prefix text clients referenced by id instead of sending",
                                    labels=["region"])
        saved.add_metric([region], counts["prefix_bytes_saved"])
        yield saved
        entries = GaugeMetricFamily("edgecache_tier_entries", "Entries held, by tier", labels=["region", "tier"])
        size = GaugeMetricFamily("edgecache_tier_bytes", "Bytes held, by tier", labels=["region", "tier"])
        for tier, (count, nbytes) in (("memory", counts["memory"]), ("disk", self._tier_stats("disk"))):
            entries.add_metric([region, tier], count)   # memory: every worker's own; disk: shared
            size.add_metric([region, tier], nbytes)
        yield entries
        yield size

    def collect(self) -> Iterator[Metric]:
        return self.render(self.counts())

    def exposition(self, counts: dict[str, Any]) -> bytes:
        """The Prometheus text format of ``counts``."""
        return generate_latest(_Families(self.render(counts)))   # type: ignore[arg-type]


class _Families:
    """What ``generate_latest`` reads of a registry: ``collect()``."""

    def __init__(self, families: Iterator[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return self._families


class SharedCounts:
    """The counts of a node's worker processes, one JSON file each in ``folder``.

    ``publish`` writes this worker's file (atomically: a temporary file renamed over it);
    ``exchange`` publishes and returns the sum over ``worker-0 … worker-<workers-1>`` (a file
    missing or unreadable, from a worker still starting, counts as zero). Blocking file IO:
    call both from a worker thread. ``clear(folder)`` removes every worker's file: the parent
    process calls it before starting the workers, so no count survives from an earlier run.
    """

    def __init__(self, folder: str | os.PathLike[str], worker: int, workers: int) -> None:
        self.folder = Path(folder)
        self.worker = worker
        self.workers = workers
        self._last: bytes = b""

    def _file(self, worker: int) -> Path:
        return self.folder / f"worker-{worker}.json"

    def publish(self, counts: dict[str, Any]) -> bool:
        """Write ``counts`` unless they are what was written last; True when written."""
        data = orjson.dumps(counts)
        if data == self._last:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".worker-{self.worker}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(temp, self._file(self.worker))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._last = data
        return True

    def exchange(self, counts: dict[str, Any]) -> dict[str, Any]:
        self.publish(counts)
        total = counts
        for worker in range(self.workers):
            if worker == self.worker:
                continue
            try:
                total = add_counts(total, orjson.loads(self._file(worker).read_bytes()))
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue   # not written yet (a worker starting), or not ours
        return total

    @staticmethod
    def clear(folder: str | os.PathLike[str]) -> None:
        for file in Path(folder).glob("worker-*.json"):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
