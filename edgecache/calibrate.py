"""``edgecache calibrate``: re-calibrate the semantic hit policy on your own labeled pairs.

    python -m edgecache.calibrate PAIRS [--policy IN.json] [--out OUT.json] [--confidence 0.95]
                                        [--method clopper-pearson|wilson] [--targets 0.005,0.01,0.02]
                                        [--check] [--max-pairs N] [--seed 0] [--embedder onnx|onnx-int8|torch]

PAIRS is a JSON Lines file (``.gz`` allowed) of labeled question pairs, one object a line:
``{"a": "...", "b": "...", "label": 1}`` (label 1: the cached answer of one may serve the
other; ``text_a``/``text_b`` are accepted too, and a JSON array of such objects). A
``"cosine"`` field, when present, is used as is; otherwise the tool embeds the questions
with the edge's embedder (``pip install edgecache[semantic]``): the backend the policy names
(``"embedder"``: ``onnx``, ``onnx-int8`` or ``torch``), or ``--embedder``. The written policy
records the backend it was calibrated on, and an edge running it embeds with that backend
(cosines given in the file must come from it too).

It keeps the shipped verifier weights and guards, scores every pair, and replaces each
verifier's calibration table with one built from these pairs (a verifier that needs vectors
is dropped when the pairs carry cosines only). Point ``semantic.policy_path`` at ``--out`` to
use it. Calibrate on pairs that look like your traffic and that were not used for anything
else; the bound on the false-hit rate holds for traffic distributed like them.

``--check`` only evaluates the policy (shipped or ``--policy``) on the pairs: for each target,
the threshold, hit rate on duplicates and false-hit rate on non-duplicates it gives there.
Exit status: 0 done, 1 a check found a false-hit rate above its target, 2 bad input.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from edgecache.calibration import calibrate
from edgecache.semantic_policy import (
    DEFAULT_PATH,
    EMBEDDERS,
    SemanticPolicy,
    pair_score,
    policy_embedder,
)
from edgecache.verifier import model_from_dict

__all__ = ["LabeledPair", "main", "read_pairs", "score_pairs"]

DEFAULT_TARGETS = (0.005, 0.01, 0.02, 0.05)


class LabeledPair:
    """One labeled pair as read from the file (vectors filled in when embedded)."""

    __slots__ = ("a", "b", "cosine", "label", "u", "v")

    def __init__(self, a: str, b: str, label: int, cosine: float | None = None) -> None:
        self.a, self.b, self.label, self.cosine = a, b, label, cosine
        self.u: Any = None
        self.v: Any = None


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_pairs(path: Path) -> list[LabeledPair]:
    """Labeled pairs from JSON Lines or a JSON array; ValueError naming the bad line."""
    with _open(path) as fh:
        text = fh.read()
    rows: list[Any]
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        where = [f"item {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
                where.append(f"line {n}")
    pairs = []
    for row, at in zip(rows, where, strict=True):
        a, b = row.get("a", row.get("text_a")), row.get("b", row.get("text_b"))
        label, cosine = row.get("label"), row.get("cosine")
        if not isinstance(a, str) or not isinstance(b, str) or label not in (0, 1, True, False):
            raise ValueError(f"{path}: {at}: need string fields a and b and a label of 0 or 1")
        if cosine is not None and not isinstance(cosine, int | float):
            raise ValueError(f"{path}: {at}: cosine must be a number")
        pairs.append(LabeledPair(a, b, int(label), None if cosine is None else float(cosine)))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _embed(pairs: list[LabeledPair], backend: str) -> None:
    from edgecache.stores.embed import Embedder  # the edge's own embedder: same vectors as served

    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    print(f"embedding {len(texts)} questions ({backend})…", file=sys.stderr)
    embedder = Embedder(backend=backend)
    rows: dict[str, Any] = {}
    for start in range(0, len(texts), 256):
        chunk = texts[start:start + 256]
        rows.update(zip(chunk, embedder.encode(chunk), strict=True))
    for p in pairs:
        p.u, p.v = rows[p.a], rows[p.b]
        if p.cosine is None:
            p.cosine = float(p.u @ p.v)


def score_pairs(doc: dict[str, Any], pairs: Sequence[LabeledPair], verifier: str) -> list[float]:
    """Each pair's policy score under one verifier of ``doc`` (``pair_score``: -inf where
    min_cosine or a guard refuses, inf for the same words)."""
    model = model_from_dict(doc["verifiers"][verifier]["model"])
    out = []
    for p in pairs:
        assert p.cosine is not None
        score, _ = pair_score(p.a, p.b, p.cosine, model, guards=doc["guards"], min_cosine=doc["min_cosine"],
                              query_vec=p.u, candidate_vec=p.v)
        out.append(score)
    return out


def _report(doc: dict[str, Any], pairs: Sequence[LabeledPair], targets: Sequence[float], out: TextIO) -> bool:
    """Print what each target gives on the pairs; False when a false-hit rate exceeds its target."""
    n_pos = sum(p.label for p in pairs)
    n_neg = len(pairs) - n_pos
    ok = True
    print(f"{'verifier':8} {'target':>7} {'threshold':>9} {'hit rate':>9} {'false hits':>11} {'rate':>7}", file=out)
    for name in doc["verifiers"]:
        scores = score_pairs(doc, pairs, name)
        for target in targets:
            try:
                policy = SemanticPolicy.from_dict(doc, max_false_hit_rate=target)
            except ValueError as exc:
                print(f"{name:8} {target:7.3%}  unsupported: {exc}", file=out)
                continue
            t = policy.threshold if name == "vector" else policy.text_threshold
            hits = sum(1 for s, p in zip(scores, pairs, strict=True) if p.label and s > t)
            false = sum(1 for s, p in zip(scores, pairs, strict=True) if not p.label and s > t)
            rate = false / n_neg if n_neg else 0.0
            ok &= rate <= target
            print(f"{name:8} {target:7.3%} {t:9.4f} {hits / max(n_pos, 1):9.1%} {false:5}/{n_neg:<5} {rate:7.3%}",
                  file=out)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgecache calibrate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, help="labeled pairs: JSON Lines (.gz allowed) or a JSON array")
    parser.add_argument("--policy", type=Path, default=DEFAULT_PATH, help="the policy to start from (shipped)")
    parser.add_argument("--out", type=Path, help="where to write the calibrated policy (required unless --check)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the upper bound (0.95)")
    parser.add_argument("--method", choices=("clopper-pearson", "wilson"), default="clopper-pearson")
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                        help="false-hit rates to report, comma-separated")
    parser.add_argument("--check", action="store_true", help="only report how the policy does on the pairs")
    parser.add_argument("--max-pairs", type=int, help="use a seeded sample of this many pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedder", choices=EMBEDDERS, default=None,
                        help="embedder backend to calibrate on (default: the one --policy names); written to --out")
    args = parser.parse_args(argv)
    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
        doc = json.loads(args.policy.read_text(encoding="utf-8"))
        SemanticPolicy.from_dict(doc, max_false_hit_rate=0.5)
        embedder = args.embedder or policy_embedder(doc)
        pairs = read_pairs(args.pairs)
    except (OSError, ValueError, KeyError) as exc:
        print(f"edgecache calibrate: {exc}", file=sys.stderr)
        return 2
    if args.max_pairs and len(pairs) > args.max_pairs:
        pairs = random.Random(args.seed).sample(pairs, args.max_pairs)
    if not args.check and args.out is None:
        print("edgecache calibrate: --out is required (or --check)", file=sys.stderr)
        return 2
    if any(p.cosine is None for p in pairs) or "vector" in doc["verifiers"]:
        try:
            _embed(pairs, embedder)
        except ImportError as exc:
            if any(p.cosine is None for p in pairs):
                print(f"edgecache calibrate: the pairs carry no cosines and {exc}", file=sys.stderr)
                return 2
            print(f"calibrating the text verifier only ({exc})", file=sys.stderr)
            doc = {**doc, "verifiers": {k: v for k, v in doc["verifiers"].items() if k != "vector"}}
    if args.check:
        return 0 if _report({**doc, "embedder": embedder}, pairs, targets, sys.stdout) else 1
    verifiers = {}
    for name, part in doc["verifiers"].items():
        cal = calibrate(score_pairs(doc, pairs, name), [p.label for p in pairs],
                        confidence=args.confidence, method=args.method)
        verifiers[name] = {**part, "calibration": cal.to_dict()}
    new = {**doc, "embedder": embedder, "verifiers": verifiers, "calibrated_on": str(args.pairs)}
    try:
        SemanticPolicy.from_dict(new, max_false_hit_rate=max(targets))
    except ValueError as exc:
        print(f"edgecache calibrate: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(new, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out}; on the calibration pairs themselves:", file=sys.stderr)
    _report(new, pairs, targets, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
