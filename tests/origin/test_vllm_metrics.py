"""Reading a backend's /metrics: vLLM names summed over label sets, interval hit rate, restarts."""

from __future__ import annotations

import pytest

from origin.vllm_metrics import parse_metrics

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} {queries}
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
vllm:prefix_cache_hits_total{engine="0",model_name="m"} {hits} 1700000000000
vllm:request_success_total{engine="0",finished_reason="stop",model_name="a b"} 7.0
"""


def vllm(queries: float, hits: float) -> str:
    return VLLM.replace("{queries}", str(queries)).replace("{hits}", str(hits))


def test_vllm_gauges_and_counters_are_summed_over_label_sets() -> None:
    m = parse_metrics(vllm(1000, 400), now=5.0)
    assert (m.running, m.waiting, m.kv_usage) == (5.0, 1.0, 0.25)
    assert (m.queries, m.hits) == (1000, 400)
    assert m.hit_rate == pytest.approx(0.4)          # first read: the cumulative rate


def test_hit_rate_is_taken_over_the_interval_since_the_previous_read() -> None:
    first = parse_metrics(vllm(1000, 400), now=5.0)
    second = parse_metrics(vllm(2000, 1300), now=7.0, previous=first)
    assert second.hit_rate == pytest.approx(0.9)
    idle = parse_metrics(vllm(2000, 1300), now=9.0, previous=second)
    assert idle.hit_rate == pytest.approx(0.9)       # no queries since: the last rate stands
    assert idle.as_dict(now=10.0)["age_s"] == 1.0


def test_counters_going_backwards_mean_a_restart() -> None:
    before = parse_metrics(vllm(5000, 4000), now=1.0)
    after = parse_metrics(vllm(100, 10), now=2.0, previous=before)
    assert after.restarted and after.hit_rate == pytest.approx(0.1)


def test_sglang_names_are_understood() -> None:
    text = "sglang:num_running_reqs{model_name=\"m\"} 4\nsglang:num_queue_reqs 2\n" \
           "sglang:token_usage 0.5\nsglang:cache_hit_rate 0.75\n"
    m = parse_metrics(text, now=0.0)
    assert (m.running, m.waiting, m.kv_usage, m.hit_rate) == (4, 2, 0.5, 0.75)


def test_a_page_without_known_metrics_reads_as_idle() -> None:
    m = parse_metrics("# nothing here\ngarbage line\nvllm:num_requests_running{x=\"1\"} NaNx\n", now=0.0)
    assert (m.running, m.queries, m.hit_rate, m.kv_usage) == (0, 0, None, None)
