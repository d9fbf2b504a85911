"""Prometheus metrics under vLLM's names, one registry per simulated server.

Labels are ``model_name`` and ``engine`` ("0"), as vLLM v1 exports them. Prefix-cache
counters count tokens: queries += prompt tokens, hits += cached prompt tokens, so the hit
rate is ``rate(hits) / rate(queries)``. ``kv_cache_usage_perc`` is 0..1 (pinned blocks /
capacity). ``time_to_first_token_seconds`` is measured by the server's clock, queueing
included; with ``time_scale`` below 1 it shrinks accordingly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from origin.sim.engine import Engine

__all__ = ["CONTENT_TYPE", "SimMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LABELS = ("model_name", "engine")
_REASONS = ("stop", "length", "abort")


class SimMetrics:
    """The ``EngineObserver`` that feeds ``/metrics``; ``watch`` binds the engine's gauges."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = (model, "0")
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=r)

        self._queries = counter("vllm:prefix_cache_queries",
                                "Prefix cache queries, in prompt tokens queried.").labels(*labels)
        self._hits = counter("vllm:prefix_cache_hits",
                             "Prefix cache hits, in prompt tokens found cached.").labels(*labels)
        self._prompt = counter("vllm:prompt_tokens",
                               "Prompt tokens of admitted requests.").labels(*labels)
        self._generation = counter("vllm:generation_tokens",
                                   "Generated tokens.").labels(*labels)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          (*_LABELS, "finished_reason"), registry=r)
        self._success = {reason: success.labels(*labels, reason) for reason in _REASONS}
        self._ttft = Histogram("vllm:time_to_first_token_seconds",
                               "Time to first token, queueing included, seconds.", _LABELS,
                               buckets=_TTFT_BUCKETS, registry=r).labels(*labels)
        self._running = Gauge("vllm:num_requests_running", "Sequences running.", _LABELS,
                              registry=r).labels(*labels)
        self._waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting.", _LABELS,
                              registry=r).labels(*labels)
        self._usage = Gauge("vllm:kv_cache_usage_perc",
                            "KV cache usage, 0..1 (1 means full).", _LABELS,
                            registry=r).labels(*labels)

    def watch(self, engine: Engine) -> None:
        self._running.set_function(lambda: engine.num_running)
        self._waiting.set_function(lambda: engine.num_waiting)
        self._usage.set_function(lambda: engine.kv_usage)

    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._queries.inc(prompt_tokens)
        self._hits.inc(cached_tokens)
        self._prompt.inc(prompt_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def on_finish(self, generated_tokens: int, finish_reason: str) -> None:
        self._generation.inc(generated_tokens)
        self._success[finish_reason if finish_reason in self._success else "abort"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
