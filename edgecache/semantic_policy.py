"""The semantic hit policy: may the nearest cached question's answer serve this question?

``SemanticPolicy.judge`` decides for one (query, candidate) pair found by the vector index
in the request's scope, in three stages, and says which one decided:

1. the cosine must reach ``min_cosine`` (the index search cut-off) — else ``below_min_cosine``;
2. the guards (``edgecache.guards``) must not refuse — else ``numbers``, ``quoted``,
   ``negation``, ``identifier``…; two texts with the same words in the same order (case,
   spacing and punctuation aside) then hit without asking the verifier;
3. the verifier's score (``edgecache.verifier``, the probability that the two questions are
   duplicates) must exceed ``threshold`` — else ``below_threshold``. With both unit vectors
   the vector verifier decides; with texts and cosine only, the text verifier, which has its
   own threshold (``text_threshold``).

The thresholds are not constants: each verifier ships with a calibration table
(``edgecache.calibration``) and ``load`` takes the loosest threshold whose 95 % upper
confidence bound on the false-hit rate (the share of non-duplicate pairs that would hit)
is within ``max_false_hit_rate``. The shipped tables come from Quora question pairs held
apart from the training pairs (``bench/semantic_train.py``); re-calibrate on your own
traffic with ``edgecache calibrate``.

Cache-Status: ``Verdict.score`` is the verifier's probability and ``Verdict.cosine`` the
embedding similarity; the edge reports the cosine in ``detail="semantic 0.962"`` (the
number operators can compare across policies and models) and may log the score.

The policy is valid only for the vectors it was calibrated on: its file names the embedder
backend (``"embedder"``: ``onnx``, ``onnx-int8`` or ``torch``; ``SemanticPolicy.embedder``), and an
edge embeds with exactly that backend (int8 vectors move pair cosines by about 0.01).

The pair is judged as one bet: an edge that judges several neighbours of one query and
takes the first hit raises its false-hit rate up to that many times; judge the nearest only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecache.calibration import Calibration
from edgecache.guards import ALL_GUARDS, refusal
from edgecache.verifier import Model, features, model_from_dict, text_view

__all__ = [
    "DEFAULT_PATH",
    "EMBEDDERS",
    "LEGACY_EMBEDDER",
    "POLICY_VERSION",
    "SemanticPolicy",
    "Verdict",
    "pair_score",
    "policy_embedder",
]

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "semantic_policy.json"
POLICY_VERSION = 1
EMBEDDERS = ("onnx", "onnx-int8", "torch")   # edgecache.stores.embed.BACKENDS (the core does not import it)
LEGACY_EMBEDDER = "onnx"   # a policy file without "embedder" was calibrated on float32 vectors


def policy_embedder(doc: dict[str, Any]) -> str:
    """The embedder backend a policy document was calibrated on (``"embedder"``; float32
    ``LEGACY_EMBEDDER`` for files written before the field). ValueError for an unknown one."""
    name = doc.get("embedder", LEGACY_EMBEDDER)
    if name not in EMBEDDERS:
        raise ValueError(f"semantic policy embedder {name!r}; known: {', '.join(EMBEDDERS)}")
    return str(name)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one pair.

    hit: serve the candidate's answer. score: the verifier's probability that the two
    questions are duplicates (0.0 when an earlier stage decided). cosine: the embedding
    similarity given to ``judge`` (what Cache-Status reports). reason: ``ok`` on a hit,
    else the stage that refused: ``below_min_cosine``, a guard name (``numbers``,
    ``quoted``, ``negation``, ``identifier``, ``entity``) or ``below_threshold``.
    """

    hit: bool
    score: float
    cosine: float
    reason: str


def pair_score(query: str, candidate: str, cosine: float, model: Model, *, guards: Sequence[str],
               min_cosine: float, query_vec: Any = None, candidate_vec: Any = None) -> tuple[float, str]:
    """The score a policy gives a pair before any threshold, and the stage that set it.

    ``(-inf, "below_min_cosine")`` or ``(-inf, <guard name>)`` when refused outright;
    ``(inf, "same_words")`` when the two texts have the same words in the same order (case,
    spacing and punctuation aside: always a hit); else ``(model score, "verifier")``. The
    calibration tables are built from exactly these scores (``bench/semantic_train.py``,
    ``edgecache calibrate``), so what is calibrated is what ``judge`` does.
    """
    if cosine < min_cosine:
        return -math.inf, "below_min_cosine"
    va, vb = text_view(query), text_view(candidate)
    refused = refusal(va.facts, vb.facts, guards)
    if refused is not None:
        return -math.inf, refused
    if va.facts.words == vb.facts.words:
        return math.inf, "same_words"
    return model.score(features(va, vb, cosine), query_vec, candidate_vec), "verifier"


class SemanticPolicy:
    """Guards, verifiers and thresholds for one target false-hit rate; immutable after load.

    min_cosine: neighbours below this cosine are never verified (use it as the index search
    cut-off). threshold: the vector verifier's threshold (the text verifier's when the policy
    has no vector verifier). text_threshold: the text verifier's. max_false_hit_rate: the
    target the thresholds were picked for. embedder: the embedder backend (``onnx``,
    ``onnx-int8``, ``torch``) whose vectors the verifier was trained and calibrated on: cosines
    and vectors from another backend void the bound (int8 vectors move pair cosines by ~0.01),
    so an edge embeds with exactly this backend (``onnx`` and ``torch`` are the same float32
    vectors, either serves a float32 policy).
    """

    __slots__ = ("_text", "_vector", "embedder", "guards", "max_false_hit_rate", "min_cosine",
                 "text_threshold", "threshold")

    def __init__(self, *, text: tuple[Model, Calibration], vector: tuple[Model, Calibration] | None,
                 guards: Sequence[str], min_cosine: float, max_false_hit_rate: float = 0.01,
                 embedder: str = LEGACY_EMBEDDER) -> None:
        if embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {embedder!r}; known: {', '.join(EMBEDDERS)}")
        self.embedder = embedder
        if not 0.0 < max_false_hit_rate < 1.0:
            raise ValueError(f"max_false_hit_rate must be in (0, 1), got {max_false_hit_rate}")
        unknown = [g for g in guards if g not in ALL_GUARDS]
        if unknown:
            raise ValueError(f"unknown guards {unknown}; known: {sorted(ALL_GUARDS)}")
        if text[0].needs_vectors:
            raise ValueError("the text verifier must not need vectors")
        self.guards = tuple(guards)
        self.min_cosine = float(min_cosine)
        self.max_false_hit_rate = float(max_false_hit_rate)
        self._text = text[0]
        self.text_threshold = text[1].threshold_for(max_false_hit_rate)
        self._vector = None
        self.threshold = self.text_threshold
        if vector is not None:
            self._vector = (vector[0], vector[1].threshold_for(max_false_hit_rate))
            self.threshold = self._vector[1]

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, max_false_hit_rate: float = 0.01) -> SemanticPolicy:
        """A policy from the JSON document ``bench/semantic_train.py`` and ``edgecache calibrate`` write
        (``"embedder"``: the backend it was calibrated on; absent in older files: float32)."""
        if doc.get("version") != POLICY_VERSION:
            raise ValueError(f"semantic policy version {doc.get('version')!r}, this code reads {POLICY_VERSION}")
        parts = {name: (model_from_dict(v["model"]), Calibration.from_dict(v["calibration"]))
                 for name, v in doc["verifiers"].items()}
        if "text" not in parts:
            raise ValueError("a semantic policy needs a text verifier")
        return cls(text=parts["text"], vector=parts.get("vector"), guards=doc["guards"],
                   min_cosine=doc["min_cosine"], max_false_hit_rate=max_false_hit_rate,
                   embedder=policy_embedder(doc))

    @classmethod
    def load(cls, path: str | Path | None = None, *, max_false_hit_rate: float = 0.01) -> SemanticPolicy:
        """The policy in ``path`` (default: the one shipped with edgecache) for a target rate.

        ValueError when the target is below what the calibration table supports.
        """
        raw = Path(path or DEFAULT_PATH).read_bytes()
        return cls.from_dict(json.loads(raw), max_false_hit_rate=max_false_hit_rate)

    def prepare(self, text: str) -> None:
        """Parse a stored question ahead of time (memoised), so judging it later costs less;
        call it when an answer is stored."""
        text_view(text)

    @property
    def has_vector_verifier(self) -> bool:
        return self._vector is not None

    def judge(self, query: str, candidate: str, cosine: float,
              query_vec: Any = None, candidate_vec: Any = None) -> Verdict:
        """Decide whether ``candidate``'s cached answer may serve ``query``.

        ``cosine`` is their embedding similarity; the vectors, when given, are unit-norm
        float32 numpy arrays of the embedder's dimension (both or neither).
        """
        cosine = float(cosine)
        use_vectors = self._vector is not None and query_vec is not None and candidate_vec is not None
        model, threshold = self._vector if use_vectors else (self._text, self.text_threshold)
        score, stage = pair_score(query, candidate, cosine, model, guards=self.guards, min_cosine=self.min_cosine,
                                  query_vec=query_vec, candidate_vec=candidate_vec)
        if stage == "same_words":
            return Verdict(True, 1.0, cosine, "ok")
        if stage != "verifier":
            return Verdict(False, 0.0, cosine, stage)
        return Verdict(score > threshold, score, cosine, "ok" if score > threshold else "below_threshold")

    def __repr__(self) -> str:
        return (f"SemanticPolicy(embedder={self.embedder!r}, max_false_hit_rate={self.max_false_hit_rate}, "
                f"threshold={self.threshold:.4f}, "
                f"text_threshold={self.text_threshold:.4f}, min_cosine={self.min_cosine}, guards={self.guards})")
