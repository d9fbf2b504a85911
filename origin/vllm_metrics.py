"""What the origin reads from a backend's Prometheus ``/metrics``: load, KV usage, prefix hits.

vLLM (v1) names, with the older v0 and SGLang equivalents understood as well:

| field | vLLM v1 | also |
|---|---|---|
| ``running`` | ``vllm:num_requests_running`` | ``sglang:num_running_reqs`` |
| ``waiting`` | ``vllm:num_requests_waiting`` | ``sglang:num_queue_reqs`` |
| ``kv_usage`` (0..1) | ``vllm:kv_cache_usage_perc`` | ``vllm:gpu_cache_usage_perc``, ``sglang:token_usage`` |
| ``queries`` (tokens) | ``vllm:prefix_cache_queries_total`` | ``vllm:gpu_prefix_cache_queries_total`` |
| ``hits`` (tokens) | ``vllm:prefix_cache_hits_total`` | ``vllm:gpu_prefix_cache_hits_total`` |

Samples of one name are summed over their label sets (several engines or models). The
prefix-cache hit rate is ``Δhits / Δqueries`` between two reads (SGLang: its
``sglang:cache_hit_rate`` gauge). Counters that go backwards mean the server restarted and
lost its cache: ``restarted`` says so, and the rate starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BackendMetrics", "parse_metrics"]

_NAMES = {
    "vllm:num_requests_running": "running",
    "sglang:num_running_reqs": "running",
    "vllm:num_requests_waiting": "waiting",
    "sglang:num_queue_reqs": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "sglang:token_usage": "kv_usage",
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:gpu_prefix_cache_queries_total": "queries",
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:gpu_prefix_cache_hits_total": "hits",
    "sglang:cache_hit_rate": "hit_rate",
}


@dataclass(frozen=True, slots=True)
class BackendMetrics:
    """One read of a backend's ``/metrics``.

    scraped_at: the reader's clock. running, waiting: requests. kv_usage: 0..1 or None.
    queries, hits: prefix-cache counters (prompt tokens), cumulative. hit_rate: hits per
    query over the last interval that saw queries (None before any). restarted: the
    counters went backwards since the previous read.
    """

    scraped_at: float
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None
    queries: float = 0.0
    hits: float = 0.0
    hit_rate: float | None = None
    restarted: bool = False

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "kv_usage": self.kv_usage,
                "prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_hit_rate": self.hit_rate, "age_s": round(now - self.scraped_at, 3)}


def _samples(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        field = _NAMES.get(name.strip())
        if field is None:
            continue
        parts = rest.split()
        try:
            value = float(parts[0])
        except (IndexError, ValueError):
            continue
        found[field] = found.get(field, 0.0) + value
    return found


def parse_metrics(text: str, now: float, previous: BackendMetrics | None = None) -> BackendMetrics:
    """The metrics in a Prometheus text exposition, the hit rate taken against ``previous``."""
    s = _samples(text)
    queries, hits = s.get("queries", 0.0), s.get("hits", 0.0)
    restarted = previous is not None and (queries < previous.queries or hits < previous.hits)
    rate = s.get("hit_rate")
    if rate is None:
        if previous is None or restarted:
            rate = hits / queries if queries > 0 else None
        elif queries > previous.queries:
            rate = (hits - previous.hits) / (queries - previous.queries)
        else:
            rate = previous.hit_rate
    return BackendMetrics(scraped_at=now, running=s.get("running", 0.0), waiting=s.get("waiting", 0.0),
                          kv_usage=s.get("kv_usage"), queries=queries, hits=hits, hit_rate=rate,
                          restarted=restarted)
