"""The second-stage verifier: does the cached neighbour answer the same question?

The embedder's cosine is one noisy view of "same question". The verifier combines it with
cheap views of the two texts (word and character overlap, length, question word, names,
numbers, negation) into a probability that the pair is a duplicate, with weights learnt
from labeled pairs (``bench/semantic_train.py``) and shipped in
``edgecache/data/semantic_policy.json``.

Two models, one interface (``score(features, u, v) -> float`` in [0, 1]):

- ``LinearModel``: logistic regression over the text features and the cosine. Pure Python,
  for callers that only have the two texts and their cosine.
- ``MlpModel``: a one-hidden-layer network over the same features plus element-wise views
  of the two unit embeddings: ``|u - v|``, ``u * v`` and ``u + v`` (384 values each; the
  last lets the decision depend on the topic, a learnt form of per-region thresholds). It needs both
  vectors and **numpy** (this module is the only core module allowed numpy; it is imported
  only when such a model is loaded).

Features are standardised with the training mean and spread stored with the weights.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any

from edgecache.guards import Facts, entity_mismatches, facts

__all__ = [
    "FEATURES",
    "VECTOR_PARTS",
    "LinearModel",
    "MlpModel",
    "Model",
    "TextView",
    "features",
    "model_from_dict",
    "text_view",
    "vector_input",
]

STOPWORDS = frozenset("""a an the is are was were be been being am do does did doing have has had
i me my we our you your he she it its they them their this that these those of to in on at by for
with from about as into or and but if so than then can could would should will shall may might must
what which who whom whose why how when where there here any some all more most very much many get
one best good way ways s 's 're 've 'll 'd 'm""".split())
QUESTION_WORDS = frozenset({"what", "why", "how", "who", "whom", "whose", "when", "where", "which",
                            "is", "are", "can", "do", "does", "should", "will", "would"})
_PUNCT = re.compile(r"[^\w\s]")

FEATURES: tuple[str, ...] = (
    "cos", "cos_hinge_85", "cos_hinge_95", "word_jaccard", "content_jaccard", "char3_jaccard",
    "bigram_jaccard", "len_ratio", "content_only_min", "content_only_max", "first_word_same",
    "qword_mismatch", "entity_diff", "numbers_diff", "negation_diff", "same_bag", "order_swaps", "short",
)


@dataclass(frozen=True, slots=True)
class TextView:
    """What the verifier reads from one text beyond its guard ``Facts`` (memoised per text)."""

    facts: Facts
    words: frozenset[str]
    content: frozenset[str]
    order: tuple[str, ...]
    bigrams: frozenset[tuple[str, str]]
    char3: frozenset[str]
    first: str
    qwords: frozenset[str]
    length: int


@lru_cache(maxsize=65536)
def text_view(text: str) -> TextView:
    f = facts(text)
    squashed = _PUNCT.sub("", f.folded)
    content = [w for w in f.words if w not in STOPWORDS]
    return TextView(
        facts=f,
        words=frozenset(f.words),
        content=frozenset(content),
        order=tuple(dict.fromkeys(content)),
        bigrams=frozenset(pairwise(f.words)),
        char3=frozenset({squashed[i:i + 3] for i in range(max(1, len(squashed) - 2))}),
        first=f.words[0] if f.words else "",
        qwords=QUESTION_WORDS.intersection(f.words[:3]),
        length=len(squashed),
    )


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _swaps(a: tuple[str, ...], b: tuple[str, ...], shared: frozenset[str]) -> float:
    """Share of out-of-order pairs among the content words both texts have ("A to B" vs "B to A")."""
    rank = {w: i for i, w in enumerate(b) if w in shared}
    seq = [rank[w] for w in a if w in rank]
    n = len(seq)
    if n < 2:
        return 0.0
    inversions = sum(1 for i in range(n) for j in range(i + 1, n) if seq[i] > seq[j])
    return inversions / (n * (n - 1) / 2)


def features(a: str | TextView, b: str | TextView, cosine: float) -> list[float]:
    """The verifier's features of a pair, in ``FEATURES`` order (raw, not standardised).

    Symmetric: ``features(a, b, c) == features(b, a, c)``.
    """
    va = a if isinstance(a, TextView) else text_view(a)
    vb = b if isinstance(b, TextView) else text_view(b)
    fa, fb = va.facts, vb.facts
    shared = va.content & vb.content
    only_a = len(va.content) - len(shared)
    only_b = len(vb.content) - len(shared)
    return [
        cosine,
        max(0.0, cosine - 0.85) * 10.0,
        max(0.0, cosine - 0.95) * 20.0,
        _jaccard(va.words, vb.words),
        _jaccard(va.content, vb.content),
        _jaccard(va.char3, vb.char3),
        _jaccard(va.bigrams, vb.bigrams),
        min(va.length, vb.length) / max(va.length, vb.length, 1),
        math.log1p(min(only_a, only_b)),
        math.log1p(max(only_a, only_b)),
        1.0 if va.first == vb.first else 0.0,
        1.0 if va.qwords != vb.qwords else 0.0,
        math.log1p(entity_mismatches(fa, fb)),
        1.0 if fa.numbers != fb.numbers else 0.0,
        1.0 if (fa.negations - fb.negations) % 2 else 0.0,
        1.0 if sorted(fa.words) == sorted(fb.words) else 0.0,
        min(_swaps(va.order, vb.order, shared), _swaps(vb.order, va.order, shared)),
        1.0 if min(len(fa.words), len(fb.words)) <= 4 else 0.0,
    ]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class LinearModel:
    """Logistic regression over standardised ``FEATURES``: pure Python, no vectors needed."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    needs_vectors = False

    def score(self, x: Sequence[float], u: Any = None, v: Any = None) -> float:
        z = self.bias
        for xi, m, s, w in zip(x, self.mean, self.scale, self.weights, strict=True):
            z += w * (xi - m) / s
        return _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear", "features": list(self.names), "mean": list(self.mean),
                "scale": list(self.scale), "weights": list(self.weights), "bias": self.bias}


def _encode(array: Any) -> dict[str, Any]:
    import numpy as np

    a = np.ascontiguousarray(array, dtype="<f2")
    return {"shape": list(a.shape), "dtype": "float16", "b64": base64.b64encode(a.tobytes()).decode()}


def _decode(blob: dict[str, Any]) -> Any:
    import numpy as np

    raw = base64.b64decode(blob["b64"])
    return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(blob["shape"])


VECTOR_PARTS = {
    "absdiff": lambda u, v: abs(u - v),    # where the two questions differ
    "product": lambda u, v: u * v,         # where they agree (sums to the cosine)
    "sum": lambda u, v: u + v,             # what they are about: lets the bar move by topic
}


def vector_input(u: Any, v: Any, parts: Sequence[str]) -> Any:
    """The embedding part of the MLP's input: ``parts`` of ``VECTOR_PARTS``, concatenated on
    the last axis (one pair as (dim,) arrays, or many as (n, dim))."""
    import numpy as np

    return np.concatenate([VECTOR_PARTS[p](u, v) for p in parts], axis=-1)


@dataclass(frozen=True, slots=True)
class MlpModel:
    """One hidden layer (ReLU) over standardised ``FEATURES`` and the ``vector_parts`` of the
    two unit embeddings (``|u - v|``, ``u * v``, ``u + v``); numpy.

    w1: (n_in, hidden) float32, b1: (hidden,), w2: (hidden,), b2: float. ``mean``/``scale``
    standardise the text features only (the vector parts are used raw).
    """

    names: tuple[str, ...]
    vector_parts: tuple[str, ...]
    mean: Any
    scale: Any
    w1: Any
    b1: Any
    w2: Any
    b2: float
    needs_vectors = True

    def score(self, x: Sequence[float], u: Any = None, v: Any = None) -> float:
        import numpy as np

        if u is None or v is None:
            raise ValueError("this verifier needs both embedding vectors")
        xs = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        h = np.concatenate((xs, vector_input(u, v, self.vector_parts))) @ self.w1 + self.b1
        z = float(np.maximum(h, 0.0, out=h) @ self.w2) + self.b2
        return _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "mlp", "features": list(self.names), "vector_parts": list(self.vector_parts),
                "mean": [float(m) for m in self.mean], "scale": [float(s) for s in self.scale],
                "w1": _encode(self.w1), "b1": _encode(self.b1), "w2": _encode(self.w2), "b2": float(self.b2)}


Model = LinearModel | MlpModel


def model_from_dict(data: dict[str, Any]) -> Model:
    """A model from its JSON form; ValueError when its features are not this module's."""
    names = tuple(data["features"])
    if names != FEATURES:
        raise ValueError(f"model features {names} differ from this version's {FEATURES}")
    if data["kind"] == "linear":
        return LinearModel(names, tuple(map(float, data["mean"])), tuple(map(float, data["scale"])),
                           tuple(map(float, data["weights"])), float(data["bias"]))
    if data["kind"] == "mlp":
        import numpy as np

        parts = tuple(data["vector_parts"])
        if not set(parts) <= set(VECTOR_PARTS):
            raise ValueError(f"unknown vector parts {parts}")
        return MlpModel(names, parts, np.asarray(data["mean"], dtype=np.float32),
                        np.asarray(data["scale"], dtype=np.float32), _decode(data["w1"]),
                        _decode(data["b1"]), _decode(data["w2"]), float(data["b2"]))
    raise ValueError(f"unknown verifier kind {data['kind']!r}")
