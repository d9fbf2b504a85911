"""Prefix-routing benchmark: which backend should a prompt go to, measured on four simulated GPUs.

    python -m bench.prefix_routing [--quick] [--json OUT] [--chart PNG] [--sweep]

Four simulated vLLM-like servers (``origin.sim``, one subprocess on loopback) whose KV caches
are too small to hold every group's prefix, so placement matters. For each workload and each
policy, the caches are reset and a closed loop of ``--concurrency`` clients sends every
prompt (shuffled) through a ``BackendPool`` using that policy, streaming the answers: the
origin's routing layer in this process, without the origin's HTTP hop. Policies:
``round_robin``, ``least_loaded``, ``prefix_aware`` and ``oracle`` (knows each prompt's group
and gives every backend the same number of groups, each group one backend).

Workloads (token counts scaled down for this 2-core machine, ratios kept; the prefill rate
is scaled by the same factor so a miss costs the same simulated time as unscaled):

- ``generated_shared_prefix``: SGLang's generated-shared-prefix shape, 64 groups x 16
  prompts, 2048-token shared prefix, 128-token question, 256 output tokens (scaled 1/8).
- ``large_prefix_pool``: llm-d's harder shape, 150 groups x 5 prompts, 6000/1200/1000
  tokens (scaled 1/20): the resident prefixes are about three times one backend's KV cache
  but fit the four.

Per policy: ``prefix_hit_rate`` (the servers' ``vllm:prefix_cache_hits_total`` /
``..._queries_total`` deltas), ``ttft_*_s`` (client side, request sent to first content
token, wall seconds: simulated seconds times ``time_scale``), ``throughput_rps``,
``max_load_ratio`` (busiest backend's requests / mean). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.cpu import cpu_sample, cpu_usage
from bench.hit_path import machine_facts
from bench.loadgen import percentile
from bench.stack import StackError, free_port
from edgecache.config import BackendConfig, OriginConfig, SimConfig
from origin.backends import BackendPool
from origin.routing import Decision, PrefixAwareParams, Router, make_router

__all__ = [
    "CHART",
    "GOALS",
    "POLICIES",
    "OracleRouter",
    "Prompt",
    "Workload",
    "build_parser",
    "build_prompts",
    "format_table",
    "main",
    "run_benchmark",
    "run_policy",
    "serve_sims",
    "workloads",
    "write_chart",
]

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "oracle")
PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}
CHART = Path(__file__).parent / "reports" / "prefix_routing.png"
BACKENDS = 4
GOALS = {"hit_vs_oracle": 0.9, "hit_vs_round_robin": 2.0, "ttft_p50_vs_round_robin": 0.5, "max_load_ratio": 1.3}


@dataclass(frozen=True, slots=True)
class Workload:
    """A shared-prefix workload and the simulated servers it runs on (tokens already scaled)."""

    name: str
    groups: int
    prompts_per_group: int
    prefix_tokens: int
    question_tokens: int
    output_tokens: int
    scale: int                  # unscaled tokens per scaled token
    kv_capacity_blocks: int     # per backend, blocks of 16 tokens
    seed: int = 7

    def sim(self, time_scale: float, max_running: int) -> SimConfig:
        return SimConfig(count=0, kv_capacity_blocks=self.kv_capacity_blocks, block_size=16,
                         prefill_tokens_per_s=20000.0 / self.scale, decode_step_s=0.01,
                         decode_step_per_seq_s=0.0005, max_running=max_running, max_waiting=100_000,
                         max_model_len=32768, time_scale=time_scale)


def workloads(size: str = "quick") -> list[Workload]:
    """The two shapes: ``quick``; ``full`` halves the scale-down (twice the tokens per prompt);
    ``tiny`` is a seconds-long run of the same plumbing, for tests."""
    if size == "tiny":
        return [Workload("generated_shared_prefix", groups=8, prompts_per_group=4, prefix_tokens=64,
                         question_tokens=4, output_tokens=4, scale=32, kv_capacity_blocks=40),
                Workload("large_prefix_pool", groups=12, prompts_per_group=3, prefix_tokens=64,
                         question_tokens=12, output_tokens=10, scale=100, kv_capacity_blocks=40)]
    k = 1 if size == "quick" else 2
    return [
        Workload("generated_shared_prefix", groups=64, prompts_per_group=16, prefix_tokens=256 * k,
                 question_tokens=16 * k, output_tokens=32 * k, scale=8 // k, kv_capacity_blocks=400 * k),
        Workload("large_prefix_pool", groups=150, prompts_per_group=5, prefix_tokens=300 * k,
                 question_tokens=60 * k, output_tokens=50 * k, scale=20 // k, kv_capacity_blocks=1100 * k),
    ]


@dataclass(frozen=True, slots=True)
class Prompt:
    group: int
    route: str      # what the origin routes on: the message contents joined, prefix first
    body: bytes


def build_prompts(w: Workload) -> list[Prompt]:
    """Every prompt of the workload, shuffled: random words (one simulated token each)."""
    rng = random.Random(w.seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fu", "ga", "hi", "jo"]
    vocab = sorted({"".join(rng.choices(syllables, k=3)) for _ in range(4000)})
    prompts = []
    for g in range(w.groups):
        system = " ".join(rng.choices(vocab, k=w.prefix_tokens))
        for _ in range(w.prompts_per_group):
            question = " ".join(rng.choices(vocab, k=w.question_tokens))
            body = orjson.dumps({"model": "sim-llm", "max_tokens": w.output_tokens, "temperature": 0,
                                 "stream": True, "stream_options": {"include_usage": True},
                                 "messages": [{"role": "system", "content": system},
                                              {"role": "user", "content": question}]})
            prompts.append(Prompt(g, system + "\n" + question, body))
    rng.shuffle(prompts)
    return prompts


class OracleRouter:
    """The bound: each group's home is fixed in advance, groups spread evenly over backends."""

    name = "oracle"

    def __init__(self, prompts: Sequence[Prompt], size: int) -> None:
        self._size = size
        self._home = {p.route: p.group % size for p in prompts}

    def decide(self, route: str | None, loads: Sequence[int], allowed: Sequence[int]) -> Decision:
        home = self._home[route or ""]
        return Decision((home, *sorted((i for i in allowed if i != home), key=lambda i: loads[i])), "oracle")

    def record(self, route: str | None, index: int) -> None:
        pass

    def forget(self, index: int) -> None:
        pass


# -- the simulated servers, in one subprocess ------------------------------------------------

def _run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (as the services run), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def serve_sims(config: SimConfig, ports: Sequence[int]) -> None:
    """Run one simulated server per port until killed (the subprocess's body)."""
    from aiohttp import web

    from origin.sim.app import create_sim_app

    async def run() -> None:
        runners = []
        for port in ports:
            runner = web.AppRunner(create_sim_app(config), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        await asyncio.Event().wait()

    _run(run())


@contextlib.contextmanager
def sims_running(config: SimConfig, n: int) -> Iterator[tuple[list[str], int]]:
    """Start ``n`` simulated servers in one subprocess; yields their URLs and its pid."""
    ports = [free_port() for _ in range(n)]
    argv = [sys.executable, "-m", "bench.prefix_routing", "--serve-sims", orjson.dumps(asdict(config)).decode(),
            "--ports", ",".join(map(str, ports))]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise StackError(f"simulated servers exited: {log.read().decode(errors='replace')}")
                with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise StackError(f"{url} not healthy within 60 s")
                time.sleep(0.05)
        yield urls, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# -- one policy ------------------------------------------------------------------------------

async def run_policy(policy: str, prompts: Sequence[Prompt], urls: Sequence[str], *, concurrency: int,
                     params: PrefixAwareParams | None = None, sim_pid: int = 0,
                     router: Router | None = None) -> dict[str, Any]:
    """Send every prompt through a pool routing with ``policy`` (or ``router``, for experiments);
    the figures of that run."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in urls:
            async with session.post(url + "/reset_prefix_cache") as resp:
                if resp.status != 200:
                    raise StackError(f"{url} refused to reset its prefix cache: {await resp.text()}")
        config = OriginConfig(routing="round_robin" if policy == "oracle" else policy, retries=1,
                              first_byte_timeout_s=120, health_interval_s=0, metrics_interval_s=0)
        backends = tuple(BackendConfig(url=u, name=f"sim-{i + 1}") for i, u in enumerate(urls))
        if router is None:
            router = OracleRouter(prompts, len(urls)) if policy == "oracle" else make_router(policy, len(urls), params)
        pool = BackendPool(backends, config, session, router=router)
        await pool.scrape_metrics()
        before = [(b.metrics.queries, b.metrics.hits) if b.metrics else (0.0, 0.0) for b in pool.backends]
        queue: asyncio.Queue[Prompt] = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        ttfts: list[float] = []
        latencies: list[float] = []
        usage = {"prompt_tokens": 0, "cached_tokens": 0}
        errors = 0

        async def client() -> None:
            nonlocal errors
            while not queue.empty():
                prompt = queue.get_nowait()
                start = time.perf_counter()
                first = None
                try:
                    async with pool.request("POST", PATH, prompt.body, HEADERS, route=prompt.route) as (_, resp):
                        if resp.status != 200:
                            errors += 1
                            await resp.read()
                            continue
                        async for line in resp.content:
                            if first is None and b'"delta":{"content":' in line:
                                first = time.perf_counter() - start
                            elif line.startswith(b'data: {') and b'"usage":{' in line:
                                u = orjson.loads(line[6:])["usage"]
                                usage["prompt_tokens"] += u["prompt_tokens"]
                                usage["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
                except Exception:
                    errors += 1
                    continue
                if first is None:
                    errors += 1
                    continue
                ttfts.append(first)
                latencies.append(time.perf_counter() - start)

        pids = [sim_pid] if sim_pid else []
        cpu_before = await asyncio.to_thread(cpu_sample, pids)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = cpu_usage(cpu_before, await asyncio.to_thread(cpu_sample, pids), wall, len(ttfts)).as_dict()
        await pool.scrape_metrics()
        after = [(b.metrics.queries, b.metrics.hits) if b.metrics else (0.0, 0.0) for b in pool.backends]
        queries = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
        hits = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        per_backend = [b.requests for b in pool.backends]
        reasons: dict[str, int] = {}
        for b in pool.backends:
            for reason, n in b.routed.items():
                reasons[reason] = reasons.get(reason, 0) + n
    ttfts.sort()
    latencies.sort()
    mean = sum(per_backend) / len(per_backend)
    return {
        "prefix_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "ttft_p50_s": round(percentile(ttfts, 50), 5),
        "ttft_p90_s": round(percentile(ttfts, 90), 5),
        "ttft_p99_s": round(percentile(ttfts, 99), 5),
        "ttft_max_s": round(ttfts[-1], 5) if ttfts else 0.0,
        "latency_p50_s": round(percentile(latencies, 50), 5),
        "latency_p99_s": round(percentile(latencies, 99), 5),
        "throughput_rps": round(len(ttfts) / wall, 2),
        "max_load_ratio": round(max(per_backend) / mean, 3) if mean else 0.0,
        "requests": len(ttfts), "errors": errors, "wall_s": round(wall, 2),
        "requests_per_backend": per_backend, "decisions": reasons,
        "cpu": {"sims_pct": cpu["server_pct"], "harness_pct": cpu["loadgen_pct"], "other_pct": cpu["other_pct"],
                "idle_pct": cpu["idle_pct"]},
        "cached_token_share": round(usage["cached_tokens"] / usage["prompt_tokens"], 4)
        if usage["prompt_tokens"] else 0.0,
    }


def goals(policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pa, rr, oracle = policies["prefix_aware"], policies["round_robin"], policies["oracle"]
    checks = {
        "hit_vs_oracle": pa["prefix_hit_rate"] / oracle["prefix_hit_rate"] if oracle["prefix_hit_rate"] else 0.0,
        "hit_vs_round_robin": pa["prefix_hit_rate"] / rr["prefix_hit_rate"] if rr["prefix_hit_rate"] else float("inf"),
        "ttft_p50_vs_round_robin": pa["ttft_p50_s"] / rr["ttft_p50_s"] if rr["ttft_p50_s"] else 0.0,
        "max_load_ratio": pa["max_load_ratio"],
    }
    met = {
        "hit_vs_oracle": checks["hit_vs_oracle"] >= GOALS["hit_vs_oracle"],
        "hit_vs_round_robin": checks["hit_vs_round_robin"] >= GOALS["hit_vs_round_robin"],
        "ttft_p50_vs_round_robin": checks["ttft_p50_vs_round_robin"] <= GOALS["ttft_p50_vs_round_robin"],
        "max_load_ratio": checks["max_load_ratio"] <= GOALS["max_load_ratio"],
    }
    return {"ratios": {k: round(v, 3) for k, v in checks.items()}, "met": met, "all_met": all(met.values())}


async def run_workload(w: Workload, urls: Sequence[str], sim_pid: int, policies: Sequence[str],
                       concurrency: int) -> dict[str, dict[str, Any]]:
    prompts = build_prompts(w)
    out = {}
    for policy in policies:
        r = out[policy] = await run_policy(policy, prompts, urls, concurrency=concurrency, sim_pid=sim_pid)
        print(f"  {w.name:<24} {policy:<13} hit {r['prefix_hit_rate']:.3f}  ttft p50 {r['ttft_p50_s'] * 1000:.1f} ms"
              f"  {r['wall_s']:.1f} s  cpu other {r['cpu']['other_pct']:.0f}%", flush=True)
    return out


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    command = "python -m bench.prefix_routing " + " ".join(argv)
    report: dict[str, Any] = {"workloads": {}, "machine": machine_facts(), "command": command.strip(),
                              "time_scale": args.time_scale, "concurrency": args.concurrency,
                              "max_running": args.max_running, "backends": BACKENDS,
                              "routing_params": asdict(PrefixAwareParams()), "goal": GOALS}
    started = time.perf_counter()
    for w in workloads("tiny" if args.tiny else "quick" if args.quick else "full"):
        if args.workload and w.name not in args.workload:
            continue
        config = w.sim(args.time_scale, args.max_running)
        with sims_running(config, BACKENDS) as (urls, pid):
            if args.sweep:
                results = _run(_sweep(w, urls, pid, args.concurrency))
                report["workloads"][w.name] = {"workload": asdict(w), "sweep": results}
                continue
            policies = _run(run_workload(w, urls, pid, args.policies, args.concurrency))
        entry = {"workload": asdict(w), "sim": asdict(config), "policies": policies}
        if set(POLICIES) <= set(policies):
            entry["goal"] = goals(policies)
        report["workloads"][w.name] = entry
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    first = next(iter(report["workloads"].values()), {})
    if "policies" in first:
        report["policies"] = first["policies"]      # the SGLang shape, as the issue asks
        report["policies_workload"] = next(iter(report["workloads"]))
    return report


SWEEP = [{"cache_threshold": t} for t in (0.2, 0.8)] + \
        [{"balance_abs_threshold": a} for a in (2, 4, 16, 64)] + \
        [{"balance_rel_threshold": r} for r in (1.0, 3.0)] + \
        [{"tree_chars": c} for c in (50_000,)]


async def _sweep(w: Workload, urls: Sequence[str], sim_pid: int, concurrency: int) -> list[dict[str, Any]]:
    prompts = build_prompts(w)
    rows = []
    for change in [{}, *SWEEP]:
        params = replace(PrefixAwareParams(), **change)
        r = await run_policy("prefix_aware", prompts, urls, concurrency=concurrency, params=params, sim_pid=sim_pid)
        rows.append({"change": change, **r})
        print(f"  {w.name:<24} {change!s:<32} hit {r['prefix_hit_rate']:.3f}  ttft p50 "
              f"{r['ttft_p50_s'] * 1000:6.1f} p99 {r['ttft_p99_s'] * 1000:6.1f} ms  max load "
              f"{r['max_load_ratio']:.2f}  {r['throughput_rps']:.1f} rps  {r['decisions']}", flush=True)
    return rows


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'workload':<24} {'policy':<13} {'hit rate':>8} {'ttft p50':>9} {'ttft p99':>9} {'req/s':>7} "
            f"{'max load':>8} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for name, entry in report["workloads"].items():
        for policy, r in entry.get("policies", {}).items():
            lines.append(f"{name:<24} {policy:<13} {r['prefix_hit_rate']:>8.3f} {r['ttft_p50_s'] * 1000:>6.1f} ms "
                         f"{r['ttft_p99_s'] * 1000:>6.1f} ms {r['throughput_rps']:>7.1f} {r['max_load_ratio']:>8.2f} "
                         f"{r['errors']:>6}")
        if "goal" in entry:
            g = entry["goal"]
            lines.append("  goal: " + ", ".join(f"{k} {v} {'ok' if g['met'][k] else 'MISSED'}"
                                                for k, v in g["ratios"].items()))
    lines.append(f"(TTFT in wall ms with time_scale {report['time_scale']}; simulated ms = wall / time_scale)")
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in report["workloads"].items() if "policies" in e]
    fig, axes = plt.subplots(len(names), 4, figsize=(16, 3.6 * len(names)), squeeze=False)
    colours = {"round_robin": "#999999", "least_loaded": "#6a8fc7", "prefix_aware": "#d9822b", "oracle": "#4a9a5b"}
    for row, name in zip(axes, names, strict=True):
        pol = report["workloads"][name]["policies"]
        keys = list(pol)
        c = [colours.get(k, "#555555") for k in keys]
        row[0].bar(keys, [pol[k]["prefix_hit_rate"] for k in keys], color=c)
        row[0].set_title(f"{name}\nprefix-cache hit rate")
        x = range(len(keys))
        row[1].bar([i - 0.2 for i in x], [pol[k]["ttft_p50_s"] * 1000 for k in keys], 0.4, color=c, label="p50")
        row[1].bar([i + 0.2 for i in x], [pol[k]["ttft_p99_s"] * 1000 for k in keys], 0.4, color=c, alpha=0.45,
                   label="p99")
        row[1].set_xticks(list(x), keys)
        row[1].set_title("TTFT p50 / p99 (wall ms)")
        row[1].legend(fontsize=8)
        row[2].bar(keys, [pol[k]["throughput_rps"] for k in keys], color=c)
        row[2].set_title("throughput (req/s)")
        row[3].bar(keys, [pol[k]["max_load_ratio"] for k in keys], color=c)
        row[3].axhline(GOALS["max_load_ratio"], color="red", linestyle="--", linewidth=1)
        row[3].set_title("busiest backend / mean requests")
        for ax in row:
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"prefix routing on {report['backends']} simulated backends ({report['command']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_routing", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="scaled-down tokens (the whole run about 2 minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny workloads: checks the plumbing in seconds")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--chart", metavar="PNG", default=str(CHART), help=f"chart path (default {CHART})")
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p.add_argument("--workload", action="append", help="run only this workload (repeatable)")
    p.add_argument("--concurrency", type=int, default=24, help="closed-loop clients (24)")
    p.add_argument("--max-running", type=int, default=8, help="running sequences per backend (8)")
    p.add_argument("--time-scale", type=float, default=0.5, help="simulated delay multiplier (0.5)")
    p.add_argument("--sweep", action="store_true", help="prefix_aware under each threshold in turn")
    p.add_argument("--serve-sims", help=argparse.SUPPRESS)
    p.add_argument("--ports", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.serve_sims:
        serve_sims(SimConfig(**json.loads(args.serve_sims)), [int(p) for p in args.ports.split(",")])
        return 0
    report = run_benchmark(args, argv)
    print(format_table(report))
    if any("policies" in e for e in report["workloads"].values()) and args.chart:
        write_chart(report, Path(args.chart))
        print(f"chart: {args.chart}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print(f"json: {args.json}")
    errors = sum(r["errors"] for e in report["workloads"].values() for r in e.get("policies", {}).values())
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
