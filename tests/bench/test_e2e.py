"""bench.e2e: the seeded trace, the figures it derives (stale answers, false semantic hits), a short run."""

from __future__ import annotations

import json
from dataclasses import replace

from bench import e2e
from bench.e2e import Purge, Result, Scenario, build_trace, summarize

SMALL = Scenario(rate_rps=20.0, duration_s=5.0, dup_intents=6, trap_pairs=3, docs=3, kb_updates_per_s=1.0,
                 rag_share=0.5, tenants=2, sims=1, time_scale=0.0)


def test_the_trace_is_seeded_and_follows_the_scenario() -> None:
    a, b = build_trace(SMALL), build_trace(SMALL)
    assert a.asks == b.asks and a.updates == b.updates and a.intents == b.intents
    assert build_trace(replace(SMALL, seed=8)).asks != a.asks
    assert len(a.intents) == 6 + 2 * 3
    assert all(0 <= x.at < SMALL.duration_s for x in a.asks) and 50 <= len(a.asks) <= 150
    assert {x.region for x in a.asks} == set(SMALL.regions)
    assert any(len(i.wordings) == 2 for i in a.intents) and any(i.doc is not None for i in a.intents)
    for ask in a.asks:   # every ask uses one of its intent's wordings
        assert ask.text in a.intents[ask.intent].wordings


def _raw(results: list[Result], purges: list[Purge]) -> dict:
    gpu = {"vllm:prompt_tokens_total": 100.0, "vllm:prefix_cache_hits_total": 40.0, "vllm:generation_tokens_total": 9.0}
    return {"results": results, "purges": purges, "gpu": gpu, "origin_requests": 1, "wall_s": 1.0}


def _reply_id(at: float) -> str:
    return f"chatcmpl-{int(at * 1e6):014x}{'0' * 18}"


def test_stale_answers_and_false_semantic_hits_are_counted() -> None:
    trace = build_trace(SMALL)
    tagged = next(i for i, a in enumerate(trace.asks) if trace.intents[a.intent].doc is not None)
    doc = trace.intents[trace.asks[tagged].intent].doc
    other = next(i for i, a in enumerate(trace.asks) if a.intent != trace.asks[tagged].intent)
    old = _reply_id(1000.0)
    results = [
        Result(tagged, 999.0, 5, 200, "miss", old, 10),
        Result(tagged, 1005.0, 1, 200, "hit", old, 10),            # after the purge: stale
        Result(tagged, 1003.0, 1, 200, "hit", old, 10),            # before it was acknowledged: fine
        Result(tagged, 1006.0, 1, 200, "hit", _reply_id(1004.5), 10),   # generated after the update: fine
        Result(other, 1007.0, 1, 200, "semantic", old, 10),        # another intent's answer: a false hit
    ]
    purges = [Purge(doc, sent=1004.0, acked=1004.1, complete=True)]
    m = summarize(trace, _raw(results, purges))
    assert m["stale_served"] == 1
    assert m["semantic_false_hits"] == 1 and m["semantic_false_hit_rate"] == 1.0
    assert m["gpu_prefill_tokens"] == 100 and m["gpu_prefill_computed_tokens"] == 60
    assert m["edge_answered_ratio"] == 0.8


def test_a_short_run_writes_every_mode_figure(tmp_path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text("rate_rps = 15.0\nduration_s = 3.0\ndup_intents = 4\ntrap_pairs = 2\ndocs = 2\n"
                        "kb_updates_per_s = 1.0\nsims = 1\ntime_scale = 0.0\n")
    out = tmp_path / "e2e.json"
    assert e2e.main(["--scenario", str(scenario), "--modes", "direct,exact", "--json", str(out), "--no-report"]) == 0
    report = json.loads(out.read_text())
    for mode in ("direct", "exact"):
        m = report["modes"][mode]
        assert m["errors"] == 0 and m["requests"] == report["requests"] > 0
        for key in ("edge_answered_ratio", "gpu_prefill_tokens", "p50_ms", "p99_ms", "stale_served",
                    "semantic_false_hits"):
            assert key in m
        assert m["stale_served"] == 0
    assert report["modes"]["direct"]["edge_answered_ratio"] == 0
    assert report["modes"]["exact"]["origin_requests"] < report["requests"]   # some answered at the edge
    assert "gpu_prefill_reduction" not in report     # only with both direct and full
