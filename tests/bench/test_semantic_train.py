"""Training helpers of the semantic verifier (not the fit itself: that needs the embedded pairs)."""

from __future__ import annotations

import math

import pytest

np = pytest.importorskip("numpy")

from bench.semantic_train import merge_mlps  # noqa: E402
from edgecache.verifier import FEATURES, MlpModel, features  # noqa: E402


def _mlp(seed: int, hidden: int = 4, dim: int = 8) -> MlpModel:
    rng = np.random.default_rng(seed)
    n_in = len(FEATURES) + 2 * dim
    return MlpModel(FEATURES, ("absdiff", "product"), np.zeros(len(FEATURES), np.float32),
                    np.ones(len(FEATURES), np.float32), rng.normal(size=(n_in, hidden)).astype(np.float32),
                    rng.normal(size=hidden).astype(np.float32), rng.normal(size=hidden).astype(np.float32),
                    float(rng.normal()))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_merged_mlps_score_the_mean_logit_of_their_members() -> None:
    members = [_mlp(s) for s in range(3)]
    merged = merge_mlps(members)
    assert merged.w1.shape == (members[0].w1.shape[0], 12)
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    x = features("How do I reset my password?", "How can I reset my password?", float(u @ v))
    expected = sum(_logit(m.score(x, u, v)) for m in members) / 3
    assert _logit(merged.score(x, u, v)) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_mlps_over_different_inputs_are_not_merged() -> None:
    other = _mlp(1)
    other = MlpModel(other.names, ("absdiff", "sum"), other.mean, other.scale, other.w1, other.b1, other.w2, other.b2)
    with pytest.raises(ValueError, match="same inputs"):
        merge_mlps([_mlp(0), other])
