"""Does fine-tuning the embedder on Quora pairs raise the hit rate at a 1 % false-hit bound?

    python -m bench.semantic_finetune --layers 2 --json bench/out/semantic_finetune_l2.json
    python -m bench.semantic_finetune --layers 6 --lr 3e-5 --json bench/out/semantic_finetune_l6.json
    python -m bench.semantic_finetune --quick --json OUT        # 2,000 train / 3,000 calib pairs

An experiment, not something the edge runs. It fine-tunes the top ``--layers`` transformer
layers of all-MiniLM-L6-v2 (the rest frozen) on the ``train`` split of ``bench/data/qqp`` with
a CoSENT ranking loss over the labeled pairs (every non-duplicate should score below every
duplicate in the batch) plus in-batch negatives on the duplicates, then embeds the ``calib``
split with the base and the tuned model and reports, for each, the hit rate on duplicates at
the loosest cosine threshold whose false-hit rate on those same pairs is within 0.5, 1, 2 and
5 % (an oracle threshold on both sides, so the two rows compare like for like). The ``test``
split is never read.

It runs torch directly on float32 weights (mean pooling, unit norm: the edge's vectors up to
float32/onnx rounding); a full run takes 12 min (2 layers) to 25 min (6 layers) on 2 shared
cores, plus about 3 min to embed the calibration questions twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.qqp import Pair, fold, load_pairs, question_groups, sample_pairs
from bench.report import finish

__all__ = ["hit_rates", "main"]

BOUNDS = (0.005, 0.01, 0.02, 0.05)
SCALE = 20.0         # cosine -> logit scale of both losses
QUICK_TRAIN, QUICK_CALIB = 2000, 3000


def hit_rates(cos: Sequence[float], labels: Sequence[int], bounds: Sequence[float] = BOUNDS) -> dict[str, Any]:
    """Hit rate on duplicates at the loosest threshold keeping the false-hit rate within each bound."""
    import numpy as np

    cos, labels = np.asarray(cos, dtype=np.float64), np.asarray(labels)
    neg = np.sort(cos[labels == 0])[::-1]
    pos = cos[labels == 1]
    out = {}
    for bound in bounds:
        allowed = math.floor(bound * len(neg))        # false hits within the bound
        threshold = float(np.nextafter(neg[allowed], 2.0)) if allowed < len(neg) else float(neg[-1])
        out[f"{bound:g}"] = {"hit_rate": float((pos >= threshold).mean()),
                             "false_hit_rate": float((neg >= threshold).mean()), "threshold": threshold}
    return out


class _Vectors:
    """Unit vectors of texts: ``matrix(texts)`` (what ``bench.semantic_train.PairSet`` reads)."""

    def __init__(self, texts: Sequence[str], rows: Any) -> None:
        self._row = {t: i for i, t in enumerate(texts)}
        self._rows = rows

    def matrix(self, texts: Sequence[str]) -> Any:
        return self._rows[[self._row[t] for t in texts]]

    def cosines(self, pairs: Sequence[Pair]) -> list[float]:
        return [float(self._rows[self._row[p.a]] @ self._rows[self._row[p.b]]) for p in pairs]


def verifier_rates(pairs: Sequence[Pair], vectors: _Vectors, log: Any) -> dict[str, Any]:
    """The policy's pipeline on these vectors, cross-fitted: guards and the MLP verifier
    (``bench.semantic_train.fit_mlp``) fitted on one half of the question groups and scoring
    the other, both ways; hit rate at each bound over all pairs (oracle threshold), and the
    same for the cosine behind the guards alone."""
    import zlib

    import numpy as np

    from bench.semantic_train import PairSet, fit_mlp, scores_of, tpr_at

    group = question_groups((p.a, p.b) for p in pairs)
    half = np.array([zlib.crc32(group(fold(p.a)).encode()) % 2 for p in pairs])
    whole = PairSet(pairs, vectors)
    scores = np.full(len(pairs), -np.inf)
    for k in (0, 1):
        model = fit_mlp(whole.subset(half != k), log=log)
        scores[half == k] = scores_of(model, whole.subset(half == k), 0.65)
    guarded = np.where([r is None for r in whole.refusal], whole.cos, -np.inf)
    return {f"{b:g}": {"verifier": tpr_at(scores, whole.labels, b), "guards_cosine": tpr_at(guarded, whole.labels, b)}
            for b in BOUNDS}


class _Model:
    """all-MiniLM-L6-v2's transformer with mean pooling and unit norm, in torch."""

    def __init__(self, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from edgecache.stores.embed import model_path

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
        self.net = AutoModel.from_pretrained(model_path(), local_files_only=True)

    def vectors(self, texts: Sequence[str]) -> Any:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = self.net(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.torch.nn.functional.normalize(pooled, dim=-1)

    def embed(self, pairs: Sequence[Pair]) -> _Vectors:
        import numpy as np

        texts = sorted({t for p in pairs for t in (p.a, p.b)}, key=len)
        out = np.zeros((len(texts), self.net.config.hidden_size), dtype=np.float32)
        self.net.eval()
        with self.torch.inference_mode():
            for start in range(0, len(texts), 256):
                out[start:start + 256] = self.vectors(texts[start:start + 256]).numpy()
        return _Vectors(texts, out)

    def save(self, folder: Path) -> None:
        """A sentence-transformers folder: the package's files with the tuned weights."""
        import shutil

        from edgecache.stores.embed import model_path

        shutil.copytree(model_path(), folder, dirs_exist_ok=True)
        self.net.save_pretrained(folder)

    def tune(self, pairs: Sequence[Pair], *, layers: int, epochs: float, lr: float, batch: int,
             log: Any) -> dict[str, Any]:
        torch = self.torch
        blocks = self.net.encoder.layer
        for param in self.net.parameters():
            param.requires_grad = False
        for block in blocks[len(blocks) - layers:]:
            for param in block.parameters():
                param.requires_grad = True
        params = [p for p in self.net.parameters() if p.requires_grad]
        steps = max(1, int(len(pairs) / batch * epochs))
        warmup = max(1, steps // 10)
        opt = torch.optim.AdamW(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
        rng, step, started, losses = random.Random(0), 0, time.perf_counter(), []
        self.net.train()
        while step < steps:
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order) - batch + 1, batch):
                if step >= steps:
                    break
                chunk = [pairs[i] for i in order[start:start + batch]]
                u, v = self.vectors([p.a for p in chunk]), self.vectors([p.b for p in chunk])
                labels = torch.tensor([p.label for p in chunk], dtype=torch.bool)
                score = (u * v).sum(-1) * SCALE
                # CoSENT: log(1 + sum over (non-duplicate i, duplicate j) of exp(s_i - s_j))
                gaps = (score[:, None] - score[None, :])[~labels[:, None] & labels[None, :]]
                loss = torch.logsumexp(torch.cat([torch.zeros(1), gaps]), 0)
                if int(labels.sum()) > 1:   # each duplicate's partner against the batch's other questions
                    logits = u[labels] @ v.T * SCALE
                    loss = loss + 0.5 * torch.nn.functional.cross_entropy(logits, torch.nonzero(labels).flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                if step % 50 == 0 or step == steps:
                    log(f"step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                        f"{time.perf_counter() - started:.0f} s")
        return {"steps": steps, "seconds": round(time.perf_counter() - started, 1),
                "trainable_params": sum(p.numel() for p in params)}


def _table(report: dict[str, Any]) -> str:
    lines = ["| calib pairs, oracle threshold | " + " | ".join(f"hits @ {float(b):.1%} FHR" for b in report["base"])
             + " |", "|---|" + "---:|" * len(report["base"])]
    for name in ("base", "tuned"):
        cells = [f"{row['hit_rate']:.1%} (cos ≥ {row['threshold']:.4f})" for row in report[name].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, rows in report.get("verifier", {}).items():
        lines.append(f"| {name}: guards + cosine | " + " | ".join(f"{r['guards_cosine']:.1%}" for r in rows.values()) + " |")
        lines.append(f"| {name}: guards + MLP verifier (cross-fitted) | "
                     + " | ".join(f"{r['verifier']:.1%}" for r in rows.values()) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="top transformer layers to tune (1-6; default 2)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN:,} train / {QUICK_CALIB:,} calib pairs")
    parser.add_argument("--save", type=Path, help="write the tuned model here (a sentence-transformers folder)")
    parser.add_argument("--verifier", action="store_true",
                        help="also compare the guards + MLP verifier on base and tuned vectors (cross-fitted on calib)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= 6:
        parser.error("--layers must be between 1 and 6")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    train, calib = load_pairs(splits=["train"]), load_pairs(splits=["calib"])
    if args.quick:
        train, calib = sample_pairs(train, QUICK_TRAIN), sample_pairs(calib, QUICK_CALIB)
    labels = [p.label for p in calib]
    model = _Model(args.threads)
    log(f"embedding {len(calib):,} calib pairs with the base model")
    report: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                           if k != "json"} | {"train_pairs": len(train), "calib_pairs": len(calib)}}
    base = model.embed(calib)
    report["base"] = hit_rates(base.cosines(calib), labels)
    report["training"] = model.tune(train, layers=args.layers, epochs=args.epochs, lr=args.lr,
                                    batch=args.batch, log=log)
    if args.save:
        model.save(args.save)
    log("embedding the calib pairs with the tuned model")
    tuned = model.embed(calib)
    report["tuned"] = hit_rates(tuned.cosines(calib), labels)
    if args.verifier:
        report["verifier"] = {name: verifier_rates(calib, vectors, log) for name, vectors in
                              (("base", base), ("tuned", tuned))}
    print(json.dumps(report, indent=2))
    return finish(report, _table(report), args.json, module="bench.semantic_finetune", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
