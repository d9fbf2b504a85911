"""The node's metrics as Prometheus exposes them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodes.metrics import NodeMetrics


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_latency_fills_and_tiers_are_exposed() -> None:
    metrics = NodeMetrics("us-east", lambda tier: (3, 300) if tier == "memory" else (7, 7000))
    metrics.observe("chat", "hit", 0.0004)
    metrics.observe("chat", "hit", 0.003)
    metrics.observe("completions", "miss", 0.2)
    metrics.fill("stored")
    got = samples(metrics)
    region = ("region", "us-east")
    assert got["edgecache_requests_total", (("cache_result", "hit"), ("endpoint", "chat"), region)] == 2
    assert got["edgecache_requests_total", (("cache_result", "miss"), ("endpoint", "completions"), region)] == 1
    hit = (("cache_result", "hit"), region)
    assert got["edgecache_request_duration_seconds_bucket", (*hit[:1], ("le", "0.0005"), region)] == 1
    assert got["edgecache_request_duration_seconds_bucket", (*hit[:1], ("le", "0.005"), region)] == 2
    assert got["edgecache_request_duration_seconds_count", hit] == 2
    assert abs(got["edgecache_request_duration_seconds_sum", hit] - 0.0034) < 1e-9
    assert got["edgecache_origin_fills_total", (("outcome", "stored"), region)] == 1
    assert got["edgecache_tier_entries", (region, ("tier", "disk"))] == 7
    assert got["edgecache_tier_bytes", (region, ("tier", "memory"))] == 300
