"""The verifier's features read what separates paraphrases from different questions; models load and score."""

from __future__ import annotations

import math

import pytest

from edgecache.verifier import FEATURES, LinearModel, features, model_from_dict, text_view


def feature(a: str, b: str, name: str, cosine: float = 0.9) -> float:
    return features(a, b, cosine)[FEATURES.index(name)]


def test_features_come_in_the_published_order_and_are_finite() -> None:
    x = features("How do I reset my password?", "How can I reset my password?", 0.97)
    assert len(x) == len(FEATURES)
    assert all(math.isfinite(v) for v in x)
    assert x[FEATURES.index("cos")] == 0.97


def test_overlap_features_rank_a_paraphrase_above_an_unrelated_question() -> None:
    q = "How do I reset my password?"
    para, other = "How can I reset my password?", "What is the best pizza in Naples?"
    for name in ("word_jaccard", "content_jaccard", "char3_jaccard"):
        assert feature(q, para, name) > feature(q, other, name)
    assert feature(q, q, "same_bag") == 1.0
    assert feature(q, "My password: how do I reset?", "same_bag") == 1.0


def test_mismatch_features_flag_question_type_numbers_negation_and_names() -> None:
    assert feature("Why is the sky blue?", "When is the sky blue?", "qword_mismatch") == 1.0
    assert feature("Why is the sky blue?", "Why's the sky blue?", "first_word_same") == 1.0
    assert feature("Top 10 films of 2016", "Top 10 films of 2017", "numbers_diff") == 1.0
    assert feature("Is it legal?", "Is it not legal?", "negation_diff") == 1.0
    assert feature("Who is Donald Trump?", "Who is Hillary Clinton?", "entity_diff") > 0
    assert feature("Who is Donald Trump?", "who is donald trump", "entity_diff") == 0


def test_text_views_are_memoised_per_text() -> None:
    assert text_view("What is edge caching?") is text_view("What is edge caching?")


def linear(weights: dict[str, float], bias: float = 0.0) -> LinearModel:
    return LinearModel(FEATURES, tuple(0.0 for _ in FEATURES), tuple(1.0 for _ in FEATURES),
                       tuple(weights.get(n, 0.0) for n in FEATURES), bias)


def test_linear_model_is_a_logistic_regression_over_standardised_features() -> None:
    model = linear({"cos": 4.0}, bias=-3.0)
    x = features("a b c", "a b d", 0.9)
    assert model.score(x) == pytest.approx(1 / (1 + math.exp(-(4.0 * 0.9 - 3.0))))
    assert model.score(features("a b c", "a b d", 0.99)) > model.score(x)
    again = model_from_dict(model.to_dict())
    assert again == model


def test_models_with_other_features_or_kinds_are_refused() -> None:
    d = linear({}).to_dict()
    with pytest.raises(ValueError, match="features"):
        model_from_dict({**d, "features": ["cos"]})
    with pytest.raises(ValueError, match="kind"):
        model_from_dict({**d, "kind": "forest"})


def test_mlp_model_needs_both_vectors_and_round_trips_through_json() -> None:
    np = pytest.importorskip("numpy")
    from edgecache.verifier import MlpModel

    rng = np.random.default_rng(0)
    n_in, hidden = len(FEATURES) + 2 * 8, 4
    model = MlpModel(FEATURES, ("absdiff", "product"), np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32),
                     rng.normal(size=(n_in, hidden)).astype(np.float32), np.zeros(hidden, np.float32),
                     rng.normal(size=hidden).astype(np.float32), 0.1)
    u = rng.normal(size=8).astype(np.float32)
    u /= np.linalg.norm(u)
    x = features("How do I reset my password?", "How can I reset my password?", 0.95)
    with pytest.raises(ValueError, match="vectors"):
        model.score(x)
    s = model.score(x, u, u)
    assert 0.0 < s < 1.0
    again = model_from_dict(model.to_dict())
    assert again.score(x, u, u) == pytest.approx(s, abs=5e-3)    # weights ship as float16
