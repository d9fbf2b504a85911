"""Vector-index benchmark: what the semantic tier's index costs at 1k, 100k and 1M entries.

    python -m bench.semantic_index [--quick] [--sizes 1000,100000] [--compare] [--json OUT]

For each size, twice: all entries in **one scope**, and spread over **many scopes** of four
entries each (the common case: tenant x model x prefix x parameters x earlier turns). It
measures ``edgecache.stores.vectors.VectorIndex`` as the edge uses it (one call per entry,
faiss on one thread): add rate, memory per entry (RSS growth and the index's own estimate),
search latency and recall@1 of near-duplicate queries, single-key removal, save and load
time and file size, and search latency in another thread while a save runs. ``--compare`` also runs the candidate structures on the same data in
one 100k scope (exact flat, IVF, HNSW) — the measurements behind the index's design.

Vectors are synthetic (no model): unit vectors around random topic centres (cosine ~0.64
to their centre, ~0.4 between two of a topic), queries at cosine 0.92 from a stored vector,
like a paraphrase. ``--data random`` uses uniform random unit vectors instead, the worst case
for IVF (no structure to cluster). Recall@1: the index returned a vector at least as close
as the exact nearest one of the scope. Each measurement runs in its own interpreter, so the
RSS growth it reports is its own. ``--quick``: 1k and 100k; full: 1k, 100k and 1M.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import xxhash

from bench.report import finish

__all__ = ["build_parser", "main", "rss_bytes", "run_compare", "run_size", "summarize", "synthetic"]

DIM = 384
QUERY_COS = 0.92


def summarize(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean of durations, in milliseconds."""
    import numpy as np

    if not seconds:
        return {"n": 0}
    a = np.asarray(seconds) * 1e3
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4), "max_ms": round(float(a.max()), 4),
            "mean_ms": round(float(a.mean()), 4)}


def rss_bytes() -> int:
    """Resident memory of this process, after handing freed heap pages back to the system."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unit(x: Any) -> Any:
    import numpy as np

    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n: int, seed: int = 0, kind: str = "topics") -> Any:
    """``n`` unit vectors: around n/100 random topic centres, or uniform random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    centres = _unit(rng.standard_normal((max(1, n // 100), DIM), dtype=np.float32))
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        noise = rng.standard_normal((m, DIM), dtype=np.float32)
        if kind == "topics":
            noise = centres[rng.integers(0, len(centres), m)] + 1.2 * _unit(noise)
        out[start:start + m] = _unit(noise)
    return out


def _near(vectors: Any, cos: float, seed: int) -> Any:
    import numpy as np

    noise = np.random.default_rng(seed).standard_normal(vectors.shape, dtype=np.float32)
    noise -= (noise * vectors).sum(1, keepdims=True) * vectors
    return _unit(cos * vectors + np.sqrt(1 - cos**2) * _unit(noise))


def run_size(n: int, layout: str, data: Any, queries: int, directory: Path) -> dict[str, Any]:
    """Build an index of ``data`` in one scope or many, and measure it."""
    import faiss
    import numpy as np

    from edgecache.stores.vectors import VectorIndex

    rng = np.random.default_rng(n)
    raw = rng.bytes(16 * n)
    keys = [raw[16 * i:16 * i + 16] for i in range(n)]
    per_scope = n if layout == "one scope" else 4
    scope_names = [xxhash.xxh3_128_digest(i.to_bytes(8, "little")) for i in range(-(-n // per_scope))]
    scopes = [scope_names[i // per_scope] for i in range(n)]
    gc.collect()
    rss0 = rss_bytes()
    index = VectorIndex(directory)
    t0 = time.perf_counter()
    for i in range(n):
        index.add(scopes[i], keys[i], data[i])
    add_s = time.perf_counter() - t0
    index.wait_idle()
    settle_s = time.perf_counter() - t0 - add_s
    gc.collect()
    rss = rss_bytes() - rss0

    picks = rng.choice(n, min(queries, n), replace=False)
    q = _near(data[picks], QUERY_COS, seed=n + 1)
    if layout == "one scope":
        exact, _ = faiss.knn(q, data, 1, metric=faiss.METRIC_INNER_PRODUCT)
        exact = exact[:, 0]
    else:
        exact = np.array([max(float(data[j] @ q[t]) for j in range(p - p % per_scope, min(n, p - p % per_scope + per_scope)))
                          for t, p in enumerate(picks)])
    times, hits = [], 0
    for t, p in enumerate(picks):
        s = time.perf_counter()
        found = index.search(scopes[p], q[t], k=4)
        times.append(time.perf_counter() - s)
        hits += bool(found) and found[0].score >= exact[t] - 1e-5

    gone = rng.choice(n, max(1, min(1000, n // 100)), replace=False)
    removes = []
    for j in gone:
        s = time.perf_counter()
        index.remove([keys[j]])
        removes.append(time.perf_counter() - s)
    still = sum(any(nb.key == keys[j] for nb in index.search(scopes[j], data[j], k=4)) for j in gone[:100])

    during: list[float] = []
    saving = threading.Event()

    def search_while_saving(index: VectorIndex = index) -> None:   # what a save costs lookups
        t = 0
        while not saving.is_set():
            p = picks[t % len(picks)]
            s = time.perf_counter()
            index.search(scopes[p], q[t % len(picks)], k=4)
            during.append(time.perf_counter() - s)
            t += 1
            time.sleep(0.002)   # a lookup rate (~400/s), not a tight loop fighting for the GIL

    searcher = threading.Thread(target=search_while_saving)
    s = time.perf_counter()
    searcher.start()
    index.save()
    save_s = time.perf_counter() - s
    saving.set()
    searcher.join()
    size = index.path.stat().st_size
    estimate = index.memory_bytes()
    index.close()
    del index
    gc.collect()
    s = time.perf_counter()
    loaded = VectorIndex(directory)
    load_s = time.perf_counter() - s
    loaded_ok = len(loaded) == n - len(gone)
    loaded.close()
    (directory / "vectors.ecv").unlink()
    return {"entries": n, "layout": layout, "scopes": len(scope_names), "add_per_s": round(n / add_s),
            "add_us": round(1e6 * add_s / n, 2), "settle_s": round(settle_s, 2),
            "memory_bytes_per_entry_rss": round(rss / n), "memory_bytes_per_entry_estimate": round(estimate / n),
            "search": summarize(times), "recall_at_1": round(hits / len(picks), 4),
            "remove": summarize(removes), "removed_still_found": int(still),
            "search_during_save": summarize(during), "save_s": round(save_s, 3), "load_s": round(load_s, 3), "file_bytes": size,
            "file_bytes_per_entry": round(size / max(1, n - len(gone))), "loaded_ok": loaded_ok}


COMPARE = [("flat", 0, 0), ("ivf", 1024, 8), ("ivf", 1024, 16), ("ivf", 2048, 16),
           ("hnsw", 16, 64), ("hnsw", 32, 32), ("hnsw", 32, 64)]


def run_compare(data: Any, queries: int, kind: str, a: int, b: int) -> dict[str, Any]:
    """One candidate structure for a large scope: ``flat``, ``ivf`` (nlist a, nprobe b) or
    ``hnsw`` (M a, efSearch b), all searched for the same near-duplicate queries."""
    import faiss
    import numpy as np

    n = len(data)
    rng = np.random.default_rng(7)
    q = _near(data[rng.choice(n, queries, replace=False)], QUERY_COS, seed=8)
    exact, _ = faiss.knn(q, data, 1, metric=faiss.METRIC_INNER_PRODUCT)
    gc.collect()
    rss0 = rss_bytes()
    t = time.perf_counter()
    if kind == "flat":
        name, deletion, index = "flat, exact (faiss.knn)", "yes (swap-remove)", data.copy()

        def search(x: Any) -> float:
            return float(faiss.knn(x, index, 1, metric=faiss.METRIC_INNER_PRODUCT)[0][0, 0])
    else:
        if kind == "ivf":
            name, deletion = f"IVF{a} nprobe {b} (train + add)", "yes (remove_ids, hashtable direct map)"
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, a, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter, index.cp.min_points_per_centroid, index.cp.max_points_per_centroid = 10, 1, 40
            index.train(data[np.sort(rng.choice(n, min(n, 40 * a), replace=False))])
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.add_with_ids(data, np.arange(n, dtype=np.int64))
            index.nprobe = b
        else:
            name, deletion = f"HNSW{a} efSearch {b}", "no (tombstones + rebuilds)"
            index = faiss.IndexHNSWFlat(DIM, a, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction, index.hnsw.efSearch = 40, b
            index.add(data)

        def search(x: Any) -> float:
            return float(index.search(x, 1)[0][0, 0])
    build_s = time.perf_counter() - t
    rss = rss_bytes() - rss0
    times, hits = [], 0
    for j in range(len(q)):
        s = time.perf_counter()
        best = search(q[j:j + 1])
        times.append(time.perf_counter() - s)
        hits += best >= exact[j, 0] - 1e-5
    return {"structure": name, "entries": n, "build_s": round(build_s, 2), "add_per_s": round(n / max(build_s, 1e-9)),
            "memory_bytes_per_entry_rss": round(rss / n), "search": summarize(times),
            "recall_at_1": round(hits / len(q), 4), "deletion": deletion}


def format_tables(report: dict[str, Any]) -> str:
    head = (f"{'entries':>9} {'layout':<12} {'scopes':>7} {'adds/s':>8} {'B/entry':>8} {'est B/e':>8} "
            f"{'srch p50':>9} {'p99 ms':>7} {'recall':>6} {'rm p50':>7} {'rm p99':>7} {'save s':>7} "
            f"{'load s':>7} {'file MB':>8} {'srch p99 in save':>16}")
    lines = [head, "-" * len(head)]
    for r in report["runs"]:
        lines.append(f"{r['entries']:>9,} {r['layout']:<12} {r['scopes']:>7,} {r['add_per_s']:>8,} "
                     f"{r['memory_bytes_per_entry_rss']:>8,} {r['memory_bytes_per_entry_estimate']:>8,} "
                     f"{r['search']['p50_ms']:>9.3f} {r['search']['p99_ms']:>7.3f} {r['recall_at_1']:>6.3f} "
                     f"{r['remove']['p50_ms']:>7.3f} {r['remove']['p99_ms']:>7.3f} {r['save_s']:>7.2f} "
                     f"{r['load_s']:>7.2f} {r['file_bytes'] / 1e6:>8.1f} "
                     f"{r['search_during_save'].get('p99_ms', 0):>16.3f}")
    if report.get("compare"):
        head = f"{'structure':<38} {'build s':>8} {'adds/s':>9} {'B/entry':>8} {'p50 ms':>7} {'p99 ms':>7} {'recall':>6}  deletion"
        lines += ["", head, "-" * len(head)]
        for r in report["compare"]:
            lines.append(f"{r['structure']:<38} {r['build_s']:>8.1f} {r['add_per_s']:>9,} "
                         f"{r['memory_bytes_per_entry_rss']:>8,} {r['search']['p50_ms']:>7.3f} "
                         f"{r['search']['p99_ms']:>7.3f} {r['recall_at_1']:>6.3f}  {r['deletion']}")
    return "\n".join(lines)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter, so its RSS growth is its own."""
    out = subprocess.run([sys.executable, "-m", "bench.semantic_index", "--child", json.dumps(job)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 100k entries only")
    parser.add_argument("--sizes", help="comma-separated entry counts (overrides --quick)")
    parser.add_argument("--layouts", default="one,many", help="one (one scope), many (scopes of 4), or both")
    parser.add_argument("--queries", type=int, default=500, help="searches per run")
    parser.add_argument("--data", choices=("topics", "random"), default="topics")
    parser.add_argument("--compare", action="store_true", help="also compare flat, IVF and HNSW on one 100k scope")
    parser.add_argument("--compare-size", type=int, default=100_000)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edgecache.stores.embed import require_semantic

    require_semantic("faiss", "numpy")
    import faiss

    from bench.hit_path import machine_facts

    faiss.omp_set_num_threads(1)

    if args.child:
        job = json.loads(args.child)
        faiss.omp_set_num_threads(1)
        if job["what"] == "size":
            with tempfile.TemporaryDirectory(prefix="bench-vectors-") as tmp:
                row = run_size(job["n"], job["layout"], synthetic(job["n"], kind=job["data"]), job["queries"], Path(tmp))
        else:
            row = run_compare(synthetic(job["n"], seed=3, kind=job["data"]), job["queries"], *job["structure"])
        print(json.dumps(row))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000])
    layouts = [{"one": "one scope", "many": "many scopes"}[x] for x in args.layouts.split(",")]
    report: dict[str, Any] = {"machine": machine_facts(), "data": args.data, "query_cosine": QUERY_COS,
                              "faiss_threads": 1, "runs": [], "compare": []}
    for n in sizes:
        for layout in layouts:
            row = _child({"what": "size", "n": n, "layout": layout, "data": args.data, "queries": args.queries})
            report["runs"].append(row)
            print(f"{n:,} entries, {layout}: search p50 {row['search']['p50_ms']:.3f} ms, "
                  f"recall {row['recall_at_1']:.3f}, {row['memory_bytes_per_entry_rss']} B/entry", flush=True)
    if args.compare:
        for structure in COMPARE:
            row = _child({"what": "compare", "n": args.compare_size, "data": args.data, "queries": args.queries,
                          "structure": structure})
            report["compare"].append(row)
            print(f"{row['structure']}: search p50 {row['search']['p50_ms']:.3f} ms, recall {row['recall_at_1']:.3f}",
                  flush=True)
    return finish(report, format_tables(report), args.json, module="bench.semantic_index", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
