"""The node's metrics as Prometheus exposes them."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodes.metrics import NodeMetrics, SharedCounts


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


def parsed(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_workers_share_their_counts_through_the_metrics_folder(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    a = NodeMetrics("eu-west", lambda tier: (2, 200) if tier == "memory" else (9, 900))
    b = NodeMetrics("eu-west", lambda tier: (5, 500) if tier == "memory" else (9, 900))
    share_a, share_b = SharedCounts(folder, 0, 2), SharedCounts(folder, 1, 2)
    a.observe("chat", "hit", 0.001)
    b.observe("chat", "hit", 0.002)
    b.observe("chat", "miss", 0.3)
    b.fill("stored")
    b.prefix_bytes_saved += 4096
    assert share_b.publish(b.counts()) and not share_b.publish(b.counts())   # unchanged: not rewritten
    got = parsed(a.exposition(share_a.exchange(a.counts())))
    region = ("region", "eu-west")
    assert got["edgecache_requests_total", (("cache_result", "hit"), ("endpoint", "chat"), region)] == 2
    assert got["edgecache_requests_total", (("cache_result", "miss"), ("endpoint", "chat"), region)] == 1
    assert got["edgecache_request_duration_seconds_count", (("cache_result", "hit"), region)] == 2
    assert abs(got["edgecache_request_duration_seconds_sum", (("cache_result", "hit"), region)] - 0.003) < 1e-9
    assert got["edgecache_origin_fills_total", (("outcome", "stored"), region)] == 1
    assert got["edgecache_prefix_bytes_saved_total", (region,)] == 4096
    assert got["edgecache_tier_entries", (region, ("tier", "memory"))] == 7     # each worker's own
    assert got["edgecache_tier_entries", (region, ("tier", "disk"))] == 9       # one shared disk tier
    # b scraped next sees a's published counts too: the same totals from either worker
    assert parsed(b.exposition(share_b.exchange(b.counts()))) == got


def test_a_missing_or_damaged_worker_file_counts_as_zero(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    metrics = NodeMetrics("eu-west", lambda tier: (0, 0))
    metrics.observe("chat", "hit", 0.001)
    folder.mkdir()
    (folder / "worker-1.json").write_bytes(b"{not json")
    (folder / "worker-2.json").write_bytes(b'{"requests": 3}')
    total = SharedCounts(folder, 0, 4).exchange(metrics.counts())   # worker 3 never wrote
    assert sum(total["requests"].values()) == 1
    SharedCounts.clear(folder)
    assert not list(folder.glob("worker-*.json"))


def test_totals_never_go_backwards_whichever_worker_answers(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    workers = [NodeMetrics("r", lambda tier: (0, 0)) for _ in range(3)]
    shares = [SharedCounts(folder, i, 3) for i in range(3)]
    seen = 0
    for step in range(30):
        workers[step % 3].observe("chat", "hit", 0.001)   # a request lands on one worker
        if step % 4 == 0:
            shares[(step + 1) % 3].publish(workers[(step + 1) % 3].counts())   # a periodic publish
        scraped = step * 7 % 3                            # and a scrape on another
        total = sum(shares[scraped].exchange(workers[scraped].counts())["requests"].values())
        assert total >= seen
        seen = total
    assert seen >= 10
