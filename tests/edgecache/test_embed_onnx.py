"""The onnxruntime embedder: exported from the package's own weights, atomically, once per model;
the same word pieces and the same vectors as sentence-transformers; an int8 copy on request."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("onnxruntime")

from edgecache.stores.embed import Embedder, model_path  # noqa: E402
from edgecache.stores.embed_onnx import (  # noqa: E402
    MIN_EXPORT_COSINE,
    OnnxEncoder,
    export_model,
    exported_path,
    length_chunks,
    plain_mean_pooling,
)

MIXED = ["How do I reset my password?", "word " * 400, "x", "", "Où est la gare ? naïve café",
         "東京で一番おいしいラーメンは\uff1f 🙂", "What's 2+2? Account #1234, not 5678.", "   spaced\tout\n text  "]




@pytest.fixture(scope="module")
def encoder(model_cache: str) -> OnnxEncoder:
    return OnnxEncoder(model_path(), cache_dir=model_cache)


def test_length_chunks_never_pad_a_text_to_over_twice_its_length() -> None:
    lengths = [12, 3, 40, 9, 25, 11, 80]

    chunks = length_chunks(lengths)

    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in c) <= 2 * max(min(lengths[i] for i in c), 8) for c in chunks)
    assert length_chunks([]) == []


def test_export_writes_a_checked_file_atomically(tmp_path: Path) -> None:
    target = str(tmp_path / "cache" / "model.onnx")

    worst = export_model(model_path(), target)

    assert worst >= MIN_EXPORT_COSINE
    assert os.listdir(tmp_path / "cache") == ["model.onnx"]          # no temporary file left behind
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert OnnxEncoder(model_path(), onnx_path=target).encode(["hello"]).shape == (1, 384)


def test_a_cached_export_is_reused_not_rewritten(encoder: OnnxEncoder, model_cache: str) -> None:
    before = os.stat(encoder.onnx_path).st_mtime_ns

    again = OnnxEncoder(model_path(), cache_dir=model_cache)

    assert again.onnx_path == encoder.onnx_path == exported_path(model_path(), model_cache)
    assert os.stat(again.onnx_path).st_mtime_ns == before


def test_the_cache_file_is_named_after_the_model_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 384}')
    (folder / "model.safetensors").write_bytes(b"weights-1")
    first = exported_path(str(folder), "/cache")

    (folder / "model.safetensors").write_bytes(b"weights-2")

    assert exported_path(str(folder), "/cache") != first
    assert exported_path(str(folder), "/cache", quantized=True).endswith("-int8.onnx")
    assert os.path.dirname(first) == "/cache"


def test_only_mean_pooling_pipelines_are_exported(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    modules = json.loads(Path(model_path(), "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                    "pooling_mode_mean_tokens": False}))

    assert plain_mean_pooling(model_path())
    assert not plain_mean_pooling(str(tmp_path))
    assert not plain_mean_pooling(str(tmp_path / "missing"))


def test_word_pieces_match_the_sentence_transformers_tokenizer(encoder: OnnxEncoder) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)

    ours = encoder.token_ids(MIXED)

    assert ours == [hf(t, truncation=True, max_length=256)["input_ids"] for t in MIXED]
    assert len(ours[1]) == 256 == encoder.max_tokens


def test_the_edge_falls_back_to_torch_when_it_cannot_export(tmp_path: Path, caplog) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    with caplog.at_level(logging.WARNING, logger="edgecache.stores.embed"):
        embedder = Embedder(cache_dir=str(not_a_folder / "models"))

    assert embedder.backend == "torch"
    assert "running torch" in caplog.text
    assert embedder.encode(["hello"]).shape == (1, 384)
    with pytest.raises(OSError):                      # asked for by name, it fails loudly
        Embedder(backend="onnx", cache_dir=str(not_a_folder / "models"))


def test_int8_copy_moves_vectors_a_little_and_keeps_paraphrases_close(encoder: OnnxEncoder, model_cache: str) -> None:
    quantized = Embedder(backend="onnx-int8", cache_dir=model_cache)
    texts = ["How do I reset my password?", "How can I reset my password?", "What is the capital of France?"]

    full, small = encoder.encode(texts), quantized.encode(texts)

    assert quantized.backend == "onnx-int8" and quantized._onnx.onnx_path.endswith("-int8.onnx")
    assert np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    assert np.sum(full * small, axis=1).min() > 0.95
    assert float(small[0] @ small[1]) > 0.9 > 0.5 > float(small[0] @ small[2])
