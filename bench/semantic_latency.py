"""Semantic lookup latency: embed a question and search its scope, under open-loop load.

    python -m bench.semantic_latency [--quick] [--rates 50,200,400] [--modes ...] [--backends onnx,torch]
                                     [--json OUT]      # backends default: the shipped policy's embedder

One process, as an edge node runs it: an event loop (uvloop when installed) receiving lookups
at a fixed mean rate (Poisson arrivals, open loop: a lookup's latency counts from when it was
due, so a backlog shows), each lookup = embed the question with the real all-MiniLM-L6-v2 on
the CPU, then ``VectorIndex.search`` in a scope of ``--entries`` vectors (synthetic, IVF) via
``asyncio.to_thread``, as the edge will. Modes:

- ``to_thread``: no batcher; every lookup calls ``Embedder.encode([text])`` through
  ``asyncio.to_thread`` (the default executor's threads run the model concurrently);
- ``serial``: ``MicroBatcher(max_batch=1)``: one text per call, one worker thread;
- ``batch``: ``MicroBatcher(window_s=0)``: whatever queued while the previous batch ran;
- ``batch2ms``: ``MicroBatcher(window_s=0.002)``: also waits 2 ms for company when idle.

After the timed cells, ``--agreement N`` (default 300) embeds N Quora pairs (``bench/qqp.py``,
a seeded sample) with every backend and with the torch reference the policy was calibrated
on, and reports how far each backend's vectors are from it: the cosine between a question's
two vectors (min, mean) and the change of each pair's cosine (mean, p99, max).

Backends (``Embedder(backend=...)``, each a peer in the same run; by default the one the
shipped policy was calibrated on, which is what an edge runs): ``onnx`` (the model exported to
onnxruntime, float32, the same vectors as torch), ``torch`` (sentence-transformers' model run
directly), ``onnx-int8`` (quantised: faster, its vectors move by ~0.01 in pair cosine, so it
needs a policy calibrated on int8 vectors: the shipped one is). Every question is distinct (neither the
batcher's de-duplication nor its memo ever helps). The model runs one intra-op thread. Lookups
refused by a full queue (``Overloaded``) are counted, not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.cpu import cpu_sample, cpu_usage
from bench.report import finish
from bench.semantic_index import summarize, synthetic

__all__ = ["BACKENDS", "MODES", "agreement", "build_parser", "main", "questions", "run_cell"]

MODES = ("to_thread", "serial", "batch", "batch2ms")
BACKENDS = ("onnx", "torch", "onnx-int8")
SCOPE = b"bench-semantic-latency"

_ASK = ["How do I", "How can I", "What is the best way to", "Is it possible to", "Why can't I",
        "Where do I go to", "Can someone explain how to", "What happens if I"]
_DO = ["reset", "change", "recover", "delete", "update", "export", "share", "lock", "transfer", "verify"]
_WHAT = ["my password", "my account", "the billing address", "a shared folder", "my API key",
         "the two-factor settings", "an old invoice", "my email address", "a team workspace",
         "the subscription plan", "a support ticket", "my profile picture"]
_WHERE = ["", " on the mobile app", " from the web dashboard", " without losing my data",
          " after the last update", " for my whole team", " if I forgot my login", " on Linux"]


def questions(n: int) -> list[str]:
    """``n`` distinct support-style questions, 30-90 characters, in a fixed mixed order."""
    out = [f"{a} {d} {w}{x}?" for x in _WHERE for w in _WHAT for d in _DO for a in _ASK]
    base = [out[i] for i in sorted(range(len(out)), key=lambda i: (i * 7919) % len(out))]
    return [base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})") for i in range(n)]


async def run_cell(mode: str, rate: float, duration_s: float, embedder: Any, index: Any,
                   texts: list[str], seed: int) -> dict[str, Any]:
    """Open-loop load at ``rate`` lookups/s for ``duration_s``; latencies from the due time."""
    import numpy as np

    from edgecache.errors import Overloaded
    from edgecache.stores.embed import MicroBatcher

    batcher = None
    if mode != "to_thread":
        window, max_batch = {"serial": (0.0, 1), "batch": (0.0, 32), "batch2ms": (0.002, 32)}[mode]
        batcher = MicroBatcher(embedder.encode, window_s=window, max_batch=max_batch, max_queue=1024)
        await batcher.start()

    async def embed(text: str) -> Any:
        if batcher is None:
            return (await asyncio.to_thread(embedder.encode, [text]))[0]
        return await batcher.embed(text)

    total: list[float] = []
    embed_s: list[float] = []
    search_s: list[float] = []
    rejected = 0

    async def lookup(text: str, due: float) -> None:
        nonlocal rejected
        try:
            vector = await embed(text)
        except Overloaded:
            rejected += 1
            return
        embedded = time.perf_counter()
        await asyncio.to_thread(index.search, SCOPE, vector, 4)
        done = time.perf_counter()
        total.append(done - due)
        embed_s.append(embedded - due)
        search_s.append(done - embedded)

    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration_s * 1.5) + 10))
    arrivals = arrivals[arrivals < duration_s]
    tasks = []
    cpu0 = await asyncio.to_thread(cpu_sample, [])
    start = time.perf_counter()
    for i, offset in enumerate(arrivals):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(lookup(texts[i % len(texts)], due)))
    _, late = await asyncio.wait(tasks, timeout=60) if tasks else (set(), set())
    for task in late:
        task.cancel()
    wall = time.perf_counter() - start
    usage = cpu_usage(cpu0, await asyncio.to_thread(cpu_sample, []), wall, len(total))
    stats = batcher.stats if batcher else None
    if batcher:
        await batcher.close()
    return {"mode": mode, "rate": rate, "offered": len(arrivals), "completed": len(total), "rejected": rejected,
            "timed_out": len(late), "achieved_per_s": round(len(total) / wall, 1),
            "latency": summarize(total), "embed": summarize(embed_s), "search": summarize(search_s),
            "mean_batch": round(stats.mean_batch, 2) if stats else 1.0, "memo_hits": stats.memo_hits if stats else 0,
            "cpu_pct": round(usage.loadgen_pct, 1), "other_pct": round(usage.other_pct, 1)}


def agreement(embedders: dict[str, Any], reference: Any, n: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """How far each embedder's vectors are from ``reference``'s on ``n`` Quora pairs."""
    import numpy as np

    from bench.qqp import load_pairs, sample_pairs

    pairs = sample_pairs(load_pairs(), n, seed=seed)
    a, b = [p.a for p in pairs], [p.b for p in pairs]
    ra, rb = reference.encode(a), reference.encode(b)
    want = np.sum(ra * rb, axis=1)
    out = {}
    for name, embedder in embedders.items():
        ea = np.concatenate([embedder.encode([t]) for t in a])      # one at a time, as lookups run
        eb = embedder.encode(b)                                     # and batched
        same = np.concatenate([np.sum(ra * ea, axis=1), np.sum(rb * eb, axis=1)])
        delta = np.abs(np.sum(ea * eb, axis=1) - want)
        out[name] = {"pairs": len(pairs), "self_cos_min": round(float(same.min()), 6),
                     "self_cos_mean": round(float(same.mean()), 6),
                     "pair_cos_delta_mean": round(float(delta.mean()), 5),
                     "pair_cos_delta_p99": round(float(np.quantile(delta, 0.99)), 5),
                     "pair_cos_delta_max": round(float(delta.max()), 5)}
    return out


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'backend':<9} {'mode':<10} {'rate/s':>6} {'done/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>9} {'max ms':>9} "
            f"{'embed p50':>9} {'search p50':>10} {'batch':>6} {'rejected':>8} {'cpu%':>5} {'other%':>6}")
    lines = [head, "-" * len(head)]
    for r in report["cells"]:
        lat = r["latency"]
        lines.append(f"{r.get('backend', '?'):<9} {r['mode']:<10} {r['rate']:>6g} {r['achieved_per_s']:>7.1f} {lat.get('p50_ms', 0):>8.2f} "
                     f"{lat.get('p90_ms', 0):>8.2f} {lat.get('p99_ms', 0):>9.2f} {lat.get('max_ms', 0):>9.2f} "
                     f"{r['embed'].get('p50_ms', 0):>9.2f} {r['search'].get('p50_ms', 0):>10.3f} "
                     f"{r['mean_batch']:>6.2f} {r['rejected'] + r['timed_out']:>8} {r['cpu_pct']:>5.1f} "
                     f"{r['other_pct']:>6.1f}")
    if report.get("agreement"):
        lines += ["", f"{'backend':<9} {'pairs':>5} {'self cos min':>12} {'mean':>9} {'pair cos delta mean':>19} "
                      f"{'p99':>8} {'max':>8}   (vs sentence-transformers float32)"]
        for name, a in report["agreement"].items():
            lines.append(f"{name:<9} {a['pairs']:>5} {a['self_cos_min']:>12.6f} {a['self_cos_mean']:>9.6f} "
                         f"{a['pair_cos_delta_mean']:>19.5f} {a['pair_cos_delta_p99']:>8.5f} "
                         f"{a['pair_cos_delta_max']:>8.5f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.semantic_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per cell instead of 15 s")
    parser.add_argument("--duration", type=float, help="seconds per cell (overrides --quick)")
    parser.add_argument("--rates", default="50,200,400", help="lookups per second to offer")
    parser.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("--entries", type=int, default=100_000, help="vectors in the searched scope")
    parser.add_argument("--backends", default=None,
                        help=f"any of {', '.join(BACKENDS)}, each a peer in this run (default: the shipped policy's)")
    parser.add_argument("--threads", type=int, default=1, help="the model's intra-op threads")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model weights (bfloat16: torch backend only)")
    parser.add_argument("--cache-dir", help="folder of the exported onnx model (default: the user cache folder)")
    parser.add_argument("--agreement", type=int, default=300,
                        help="Quora pairs to compare every backend's vectors with torch float32 on (0: skip)")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.hit_path import machine_facts
    from bench.qqp import default_embedder
    from edgecache.stores.embed import Embedder
    from edgecache.stores.vectors import VectorIndex

    backends = args.backends.split(",") if args.backends else [default_embedder()]
    if unknown := set(backends) - set(BACKENDS):
        raise SystemExit(f"unknown backends: {', '.join(sorted(unknown))}")
    embedders = {}
    for backend in backends:
        started = time.perf_counter()
        embedders[backend] = await asyncio.to_thread(Embedder, threads=args.threads, dtype=args.dtype,
                                                     backend=backend, cache_dir=args.cache_dir)
        print(f"{backend}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
    index = VectorIndex(None)
    data = synthetic(args.entries, seed=11)
    keys = os.urandom(16 * args.entries)
    for i in range(args.entries):
        index.add(SCOPE, keys[16 * i:16 * i + 16], data[i])
    await asyncio.to_thread(index.wait_idle)
    texts = questions(20_000)
    for embedder in embedders.values():
        await asyncio.to_thread(embedder.encode, texts[:64])   # warm the model up
    duration = args.duration or (5.0 if args.quick else 15.0)
    report: dict[str, Any] = {"machine": machine_facts(), "duration_s": duration, "entries": args.entries,
                              "threads": args.threads, "dtype": args.dtype, "backends": backends,
                              "loop": type(asyncio.get_running_loop()).__module__, "cells": []}
    offset = 0
    for rate in (float(r) for r in args.rates.split(",")):
        for mode in args.modes.split(","):
            offered = 0
            for backend, embedder in embedders.items():   # peers: the same arrivals and questions
                cell = await run_cell(mode, rate, duration, embedder, index, texts[offset:] + texts[:offset],
                                      seed=offset)
                cell = {"backend": backend, **cell}
                offered = max(offered, cell["offered"])
                report["cells"].append(cell)
                print(f"{backend} {mode} at {rate:g}/s: p50 {cell['latency'].get('p50_ms', 0):.2f} ms, "
                      f"p99 {cell['latency'].get('p99_ms', 0):.2f} ms", flush=True)
            offset = (offset + offered) % len(texts)
    index.close()
    if args.agreement:
        reference = embedders.get("torch") if args.dtype == "float32" else None
        if reference is None:
            reference = await asyncio.to_thread(Embedder, threads=args.threads, backend="torch")
        report["agreement"] = await asyncio.to_thread(agreement, embedders, reference, args.agreement)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edgecache.stores.embed import require_semantic

    require_semantic()
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(_run(args))
    else:
        report = uvloop.run(_run(args))
    return finish(report, format_table(report), args.json, module="bench.semantic_latency", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
