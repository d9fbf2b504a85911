"""Hit-path benchmark: how many exact cache hits one edge node serves, and how fast.

    python -m bench.hit_path [--quick] [--workers 1,2] [--generator auto|wrk|aiohttp] [--json OUT]

For each edge worker count it starts its own stack (one simulated GPU server with
``time_scale = 0``, the origin, one edge node; ``bench.stack``), fills the cache with one
request, checks that the next ones are hits, then runs closed-loop load on that one request:
``--connections`` clients (32) for throughput and tail latency, and one client for the
latency of an unloaded hit. The same load straight to the simulated server's
``/v1/chat/completions`` is the *backend* row (an aiohttp service with ``time_scale = 0``),
and the same load on ``bench.floor`` (aiohttp answering fixed bytes, as many workers as the
last edge run) is the *floor* row: what any aiohttp edge could reach on this machine.

The load generator is ``wrk`` when it is on PATH, else an aiohttp one (which tops out near
9,500 req/s on 2 cores and then measures itself); the table and JSON say which ran.
See bench/README.md for what each figure means and reference figures of other caches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.cpu import cpu_sample, cpu_usage
from bench.floor import FloorServer
from bench.loadgen import LoadResult, Target, run_aiohttp_sync
from bench.stack import BenchStack, StackError
from bench.wrk import WrkError, run_wrk, wrk_path, wrk_version

__all__ = ["AUTHORIZATION", "BUSY_OTHER_PCT", "GOAL_P99_MS", "GOAL_RPS", "PATH", "REFERENCE", "REQUEST", "build_parser", "format_table",
           "machine_facts", "main", "measure", "run_benchmark"]

PATH = "/v1/chat/completions"
AUTHORIZATION = "Bearer sk-bench-hit-path"
REQUEST: dict[str, Any] = {
    "model": "sim-llm",
    "temperature": 0,
    "messages": [
        {"role": "system", "content": (
            "You are the support assistant of Acme Cloud. Answer in at most three sentences, "
            "cite the help-centre article you used, and never ask for a password. If the "
            "question is about billing, point to the billing portal; if it is about an outage, "
            "point to the status page.")},
        {"role": "user", "content": "How do I reset my password?"},
    ],
}
GOAL_RPS = 10_000
BUSY_OTHER_PCT = 10.0     # a run where other processes took more of the machine is flagged
GOAL_P99_MS = 5.0
# Measured by the same method on the same kind of machine (2 cores), quoted in the issue.
REFERENCE = {
    "nginx proxy_cache": {"rps": 63_000, "p99_ms": 3.5},
    "GPTCache server": {"rps": 3_300, "p99_ms": 17.0},
    "LiteLLM proxy": {"rps": "110-170"},
}

Runner = Callable[[Target, int, float], LoadResult]


def _runner(generator: str, threads: int) -> Runner:
    if generator == "wrk":
        return lambda t, c, d: run_wrk(t, connections=c, duration_s=d, threads=threads if c > 1 else 1)
    return lambda t, c, d: run_aiohttp_sync(t, connections=c, duration_s=d)


def measure(run: Runner, target: Target, connections: int, duration_s: float,
            server_pids: Sequence[int]) -> dict[str, Any]:
    """One run, as a flat dict: the load figures and where the CPU went."""
    before, wall = cpu_sample(server_pids), time.perf_counter()
    result = run(target, connections, duration_s)
    wall = time.perf_counter() - wall
    usage = cpu_usage(before, cpu_sample(server_pids), wall, result.good)
    return {**result.as_dict(), "cpu": usage.as_dict()}


def _pair(run: Runner, target: Target, connections: int, duration_s: float, pids: Sequence[int],
          log: Callable[[str], None]) -> dict[str, Any]:
    """The throughput run, then the single-connection run (its keys prefixed ``c1_``)."""
    log(f"  {target.name}: {connections} connections, {duration_s:g} s")
    row = measure(run, target, connections, duration_s, pids)
    log(f"  {target.name}: 1 connection, {duration_s:g} s")
    row.update({f"c1_{k}": v for k, v in measure(run, target, 1, duration_s, pids).items()})
    return row


def run_benchmark(*, workers: Sequence[int], connections: int, duration_s: float, generator: str,
                  threads: int, stream: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Every run; returns the report (without the command line and machine facts).

    ``edge`` is the run with the last worker count of ``workers``; ``floor`` runs with as many."""
    body = orjson.dumps({**REQUEST, "stream": True} if stream else REQUEST)
    run = _runner(generator, threads)
    edges: dict[str, dict[str, Any]] = {}
    backend: dict[str, Any] = {}
    warm_status: dict[str, str] = {}
    answer_bytes = 0
    for n in workers:
        log(f"starting a stack with {n} edge worker(s)…")
        with BenchStack(workers=n) as stack:
            warm_status[str(n)] = stack.warm(PATH, body, AUTHORIZATION)
            answer_bytes = len(stack.answer)
            edge = Target(f"edge ({n} worker{'s' if n > 1 else ''})", stack.edge_url + PATH, body,
                          AUTHORIZATION, expect_hit=True)
            edges[str(n)] = _pair(run, edge, connections, duration_s, stack.edge_pids(), log)
            if not backend:
                sim = Target("backend (sim)", stack.sim_url + PATH, body, AUTHORIZATION, expect_hit=False)
                backend = _pair(run, sim, connections, duration_s, [stack.procs["sim"].pid], log)
    chosen = workers[-1]
    log(f"starting the aiohttp floor with {chosen} worker(s)…")
    with FloorServer(workers=chosen, body_bytes=answer_bytes) as server:
        floor = Target("aiohttp floor", server.url + PATH, body, AUTHORIZATION, expect_hit=True)
        floor_row = _pair(run, floor, connections, duration_s, server.pids(), log)
    edge_row = edges[str(chosen)]
    return {
        "benchmark": "hit_path",
        "load_generator": generator,
        "workers": chosen,
        "duration_s": duration_s,
        "connections": connections,
        "stream": stream,
        "edge": edge_row,
        "backend": backend,
        "floor": floor_row,
        "edge_by_workers": edges,
        "warm_cache_status": warm_status,
        "goal": {"rps": GOAL_RPS, "p99_ms": GOAL_P99_MS,
                 "met": edge_row["rps"] >= GOAL_RPS and edge_row["p99_ms"] < GOAL_P99_MS and edge_row["errors"] == 0},
        "reference": REFERENCE,
    }


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent, check=False).stdout.strip()
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "git_commit": commit,
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'target':<20} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
            f"{'max ms':>7} {'requests':>9} {'errors':>6} {'non-hit':>7} {'srv cpu%':>8} "
            f"{'gen cpu%':>8} {'other%':>6} {'µs cpu/req':>10}")
    lines = [head, "-" * len(head)]
    rows = [(f"edge ({n} w)", r) for n, r in report["edge_by_workers"].items()]
    rows.append((f"aiohttp floor ({report['workers']} w)", report["floor"]))
    rows.append(("backend (sim)", report["backend"]))
    for name, row in rows:
        for prefix in ("", "c1_"):
            def g(k: str, row: dict[str, Any] = row, prefix: str = prefix) -> Any:
                return row[prefix + k]
            cpu = g("cpu")
            non_hits = g("non_hits") if not name.startswith("backend") else "-"
            lines.append(
                f"{name:<20} {g('connections'):>5} {g('rps'):>8,.0f} {g('p50_ms'):>7.2f} {g('p90_ms'):>7.2f} "
                f"{g('p99_ms'):>7.2f} {g('max_ms'):>7.1f} {g('requests'):>9,} {g('errors'):>6} {non_hits:>7} "
                f"{cpu['server_pct']:>8.0f} {cpu['loadgen_pct']:>8.0f} {cpu['other_pct']:>6.0f} "
                f"{cpu['server_us_per_request']:>10.0f}")
    edge, goal = report["edge"], report["goal"]
    lines.append("")
    lines.append(f"goal (edge, {report['workers']} worker(s), {report['connections']} connections): "
                 f">= {goal['rps']:,} hits/s with p99 < {goal['p99_ms']:g} ms -> "
                 f"{edge['rps']:,.0f} hits/s, p99 {edge['p99_ms']:.2f} ms: {'met' if goal['met'] else 'NOT met'}")
    lines.append("reference, same method and machine kind: nginx proxy_cache 63,000 hits/s (p99 3.5 ms), "
                 "GPTCache 3,300 (p99 17 ms), LiteLLM proxy 110-170")
    busiest = max(row[p + "cpu"]["other_pct"] for _, row in rows for p in ("", "c1_"))
    if busiest > BUSY_OTHER_PCT:
        lines.append(f"warning: other processes took up to {busiest:.0f}% of the machine during a run; "
                     "those figures understate the edge (see 'other%')")
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.hit_path", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 10 s")
    parser.add_argument("--duration", type=float, help="seconds per run (overrides --quick)")
    parser.add_argument("--connections", type=int, default=32, help="clients of the throughput run (32)")
    parser.add_argument("--workers", default="1,2",
                        help="edge worker processes to try, comma-separated; the last one is 'edge' in the JSON (1,2)")
    parser.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="load generator: wrk when on PATH (auto), or force one")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk threads for the throughput run (1; the single-connection run uses 1)")
    parser.add_argument("--stream", action="store_true", help='ask for SSE replays ("stream": true)')
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 1:
        print(f"--workers: expected positive integers separated by commas, got {args.workers!r}", file=sys.stderr)
        return 2
    duration = args.duration or (3.0 if args.quick else 10.0)
    generator, note = args.generator, ""
    wrk = wrk_path()
    if generator == "auto":
        generator = "wrk" if wrk else "aiohttp"
        if not wrk:
            note = "wrk not on PATH: using the aiohttp load generator, which tops out near 9,500 req/s"
    elif generator == "wrk" and not wrk:
        print("--generator wrk: wrk is not on PATH (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    if generator == "wrk" and duration < 1:
        duration = 1.0
    version = wrk_version(wrk) if generator == "wrk" and wrk else "aiohttp (bench.loadgen)"
    facts = machine_facts()
    print(f"load generator: {version}" + (f" ({note})" if note else ""), flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every stack's services are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = run_benchmark(workers=workers, connections=args.connections, duration_s=duration,
                               generator=generator, threads=args.threads, stream=args.stream, log=log)
    except (StackError, WrkError) as exc:
        print(f"hit_path: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hit_path: interrupted; services stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    facts["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    runs = [*report["edge_by_workers"].values(), report["backend"], report["floor"]]
    facts["max_other_pct"] = max(r[p + "cpu"]["other_pct"] for r in runs for p in ("", "c1_"))
    report = {**report, "load_generator_version": version, "wrk_threads": args.threads if generator == "wrk" else None,
              "machine": facts, "command": shlex.join(["python", "-m", "bench.hit_path", *argv])}
    print()
    print(f"hit path, {report['load_generator_version']}, {duration:g} s per run, "
          f"{facts['cpu_count']} CPUs, load average before {facts['loadavg_before'][0]}")
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nJSON: {args.json}")
    errors = [r["errors"] + r["c1_errors"] for r in runs]
    if any(errors):
        print("some responses were errors or non-hits: the figures do not measure the hit path alone",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
