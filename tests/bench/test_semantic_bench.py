"""The semantic benchmarks' plumbing: what they count and report, never how fast anything is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("faiss")

from bench import semantic_index, semantic_latency  # noqa: E402
from edgecache.stores.vectors import VectorIndex  # noqa: E402


def test_index_benchmark_reports_every_size_and_layout(tmp_path: Path, capsys) -> None:
    out = tmp_path / "index.json"

    assert semantic_index.main(["--sizes", "300", "--queries", "20", "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    assert [(r["entries"], r["layout"]) for r in report["runs"]] == [(300, "one scope"), (300, "many scopes")]
    for run in report["runs"]:
        assert run["recall_at_1"] == 1.0             # exact at this size
        assert run["removed_still_found"] == 0
        assert run["loaded_ok"] is True
        assert run["file_bytes"] > 300 * 384 * 4 * 0.9
        assert {"p50_ms", "p99_ms", "max_ms"} <= run["search"].keys()
    assert report["command"].startswith("python -m bench.semantic_index")
    assert "many scopes" in capsys.readouterr().out


def test_synthetic_queries_are_paraphrase_close() -> None:
    data = semantic_index.synthetic(500)
    near = semantic_index._near(data[:10], semantic_index.QUERY_COS, seed=1)

    assert np.allclose(np.linalg.norm(data, axis=1), 1, atol=1e-5)
    assert np.allclose((near * data[:10]).sum(1), semantic_index.QUERY_COS, atol=1e-4)


def test_latency_questions_are_distinct() -> None:
    texts = semantic_latency.questions(10_000)

    assert len(set(texts)) == 10_000
    assert all(20 <= len(t) <= 100 for t in texts)


class FakeEmbedder:
    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([semantic_index.synthetic(1, seed=len(t))[0] for t in texts])


@pytest.mark.parametrize("mode", semantic_latency.MODES)
async def test_latency_cell_times_every_lookup_it_offers(mode: str) -> None:
    index = VectorIndex(None)
    for i, v in enumerate(semantic_index.synthetic(50)):
        index.add(semantic_latency.SCOPE, i.to_bytes(16, "big"), v)

    cell = await asyncio.wait_for(semantic_latency.run_cell(
        mode, rate=200, duration_s=0.2, embedder=FakeEmbedder(), index=index,
        texts=semantic_latency.questions(100), seed=1), 30)

    assert cell["offered"] > 0
    assert cell["completed"] + cell["rejected"] + cell["timed_out"] == cell["offered"]
    assert cell["latency"]["n"] == cell["completed"]
    index.close()
