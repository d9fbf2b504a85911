"""End-to-end benchmark: what edgecache saves on a realistic workload, mode against mode.

    python -m bench.e2e [--quick] [--scenario bench/scenarios/e2e.toml] [--modes ...] [--json OUT]
                        [--report bench/reports/e2e.md]

One seeded scenario file (``bench/scenarios/e2e.toml``; ``[quick]`` overrides it) describes the
traffic: clients in three regions, several tenants (API keys), intents with Zipf popularity
taken from the Quora question pairs of the test split (``bench/data/qqp``): each duplicate pair
is one intent asked in two wordings, each non-duplicate pair two look-alike intents that must
never share an answer; a tenant's static system prompt on most requests; a share of intents
answered from a knowledge-base document (``Cache-Tag: doc:<id>``: the backend retrieves it, so
only the purge keeps the answer fresh); knowledge-base updates through the signed CMS webhook
(``?wait=true``) at a Poisson rate; streaming and non-streaming; Poisson arrivals, open loop
(a request's latency counts from when it was due).

The same trace runs once per mode, each on a fresh topology of real processes on loopback
(``--sims`` simulated GPU servers, the origin, one edge per region), everything else equal:

- ``direct``: clients call the backends themselves (round robin), no edge, no origin;
- ``exact``: edges with exact tiers only, origin round robin, the system prompt sent inline;
- ``semantic``: exact + the semantic tier;
- ``full``: exact + semantic + registered prefixes (clients send ``"prefix": id`` instead of
  the prompt) + ``prefix_aware`` routing.

Per mode: ``edge_answered_ratio`` (exact + semantic hits / requests), hit ratio by tier, GPU
tokens from the backends' metrics (``gpu_prefill_tokens`` = prompt tokens not found in the
prefix cache, i.e. prefill actually computed; ``prompt_tokens``; ``decode_tokens``), latency
p50/p99 for hits, semantic hits and misses (ms, wall), origin requests, bytes from client to
edge, ``stale_served`` (answers served to a request that began after a purge of their tag was
acknowledged, generated before that update was sent: must be 0), ``semantic_false_hits``
(semantic hits whose answer was generated for a different intent) and their rate. A simulated
backend's reply id begins with its generation time (``origin/sim/responses.py``), which is how
an answer's age is known exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.loadgen import percentile
from bench.procs import Services
from bench.stack import free_port
from edgecache.config import AuthConfig
from edgecache.webhook import sign
from origin.sim.responses import Reply

__all__ = ["MODES", "Scenario", "Trace", "build_parser", "build_trace", "load_scenario", "main", "summarize"]

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "scenarios" / "e2e.toml"
MODES = ("direct", "exact", "semantic", "full")
ADMIN = {"Authorization": "Bearer dev-admin-token"}
SECRET = AuthConfig().webhook_secret
MODEL = "sim-llm"


@dataclass(frozen=True)
class Scenario:
    seed: int = 7
    rate_rps: float = 30.0
    duration_s: float = 120.0
    regions: tuple[str, ...] = ("us-east", "eu-west", "ap-south")
    tenants: int = 2
    dup_intents: int = 60
    trap_pairs: int = 30
    zipf_s: float = 1.1
    paraphrase_share: float = 0.35
    prefix_share: float = 0.8
    prefix_chars: int = 6000
    rag_share: float = 0.3
    docs: int = 12
    kb_updates_per_s: float = 0.25
    stream_share: float = 0.5
    max_tokens: int = 16
    sims: int = 2
    time_scale: float = 1.0


def load_scenario(path: Path = SCENARIO, *, quick: bool = False) -> Scenario:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    overrides = raw.pop("quick", {}) if quick else {}
    raw.pop("quick", None)
    raw.update(overrides)
    known = {f.name for f in fields(Scenario)}
    unknown = set(raw) - known
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {sorted(unknown)}")
    if "regions" in raw:
        raw["regions"] = tuple(raw["regions"])
    return Scenario(**raw)


@dataclass(frozen=True)
class Intent:
    id: int
    wordings: tuple[str, ...]      # the first is the usual one
    doc: int | None                # answered from this document (tagged), or not


@dataclass(frozen=True)
class Ask:
    at: float                      # seconds from the start
    region: str
    tenant: int
    intent: int
    text: str
    prefixed: bool
    stream: bool


@dataclass(frozen=True)
class Update:
    at: float
    doc: int


@dataclass
class Trace:
    scenario: Scenario
    intents: list[Intent]
    asks: list[Ask]
    updates: list[Update]
    prefixes: list[str] = field(default_factory=list)    # per tenant


def _intents(s: Scenario, rng: random.Random) -> list[Intent]:
    from bench.qqp import fold, load_pairs

    pairs = [p for p in load_pairs(splits=["test"]) if 12 <= len(p.a) <= 160 and 12 <= len(p.b) <= 160]
    rng.shuffle(pairs)
    seen: set[str] = set()
    wordings: list[tuple[str, ...]] = []
    dups = traps = 0
    for p in pairs:
        if fold(p.a) in seen or fold(p.b) in seen or fold(p.a) == fold(p.b):
            continue
        if p.label == 1 and dups < s.dup_intents:
            wordings.append((p.a, p.b))
            dups += 1
        elif p.label == 0 and traps < s.trap_pairs:
            wordings += [(p.a,), (p.b,)]
            traps += 1
        else:
            continue
        seen.update((fold(p.a), fold(p.b)))
        if dups >= s.dup_intents and traps >= s.trap_pairs:
            break
    rng.shuffle(wordings)    # popularity ranks mix both kinds
    return [Intent(i, w, rng.randrange(s.docs) if rng.random() < s.rag_share else None)
            for i, w in enumerate(wordings)]


def _prefix_text(tenant: int, chars: int) -> str:
    rng = random.Random(f"prefix-{tenant}")
    words = ["refund", "order", "shipping", "warranty", "account", "invoice", "return", "policy", "customer",
             "support", "delivery", "payment", "exchange", "damaged", "replacement", "days", "receipt"]
    out = [f"You are the support assistant of tenant {tenant}. Follow these policies exactly."]
    section = 1
    while sum(len(x) + 1 for x in out) < chars:
        out.append(f"Section {section}: " + " ".join(rng.choice(words) for _ in range(24)) + ".")
        section += 1
    return "\n".join(out)[:chars]


def build_trace(s: Scenario) -> Trace:
    """The whole run, decided up front from the seed."""
    rng = random.Random(s.seed)
    intents = _intents(s, rng)
    weights = [1 / (rank + 1) ** s.zipf_s for rank in range(len(intents))]
    asks, t = [], 0.0
    while True:
        t += rng.expovariate(s.rate_rps)
        if t >= s.duration_s:
            break
        intent = rng.choices(intents, weights)[0]
        text = intent.wordings[1] if len(intent.wordings) > 1 and rng.random() < s.paraphrase_share \
            else intent.wordings[0]
        asks.append(Ask(round(t, 6), rng.choice(s.regions), rng.randrange(s.tenants), intent.id, text,
                        rng.random() < s.prefix_share, rng.random() < s.stream_share))
    updates, t = [], 0.0
    while s.kb_updates_per_s > 0:
        t += rng.expovariate(s.kb_updates_per_s)
        if t >= s.duration_s:
            break
        updates.append(Update(round(t, 6), rng.randrange(s.docs)))
    return Trace(s, intents, asks, updates, [_prefix_text(k, s.prefix_chars) for k in range(s.tenants)])


# -- one mode -------------------------------------------------------------------------------


@dataclass
class Result:
    ask: int
    began: float           # epoch seconds when it was due
    latency_ms: float
    status: int
    kind: str              # hit | semantic | shield (an edge miss the origin's shield answered) | miss | error
    reply_id: str
    sent_bytes: int


@dataclass
class Purge:
    doc: int
    sent: float            # epoch seconds
    acked: float
    complete: bool


def _topology(root: Path, s: Scenario, mode: str, ports: dict[str, Any]) -> Path:
    text = (f'[origin]\nport = {ports["origin"]}\ndata_dir = "{root / "origin"}"\n'
            f'routing = "{"prefix_aware" if mode == "full" else "round_robin"}"\n\n'
            f'[sim]\ncount = {s.sims}\nbase_port = {ports["sim"]}\nmodel = "{MODEL}"\ntime_scale = {s.time_scale!r}\n'
            f'default_max_tokens = {s.max_tokens}\n\n'
            f'[semantic]\nenabled = {"true" if mode in ("semantic", "full") else "false"}\n\n')
    for region in s.regions:
        text += f'[[edges]]\nregion = "{region}"\nport = {ports[region]}\ndata_dir = "{root / region}"\n\n'
    path = root / "topology.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _consecutive_ports(n: int) -> int:
    """A base port with ``n`` free ports after it (the sims take base_port + i)."""
    for _ in range(100):
        base = free_port()
        if base + n < 65000 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            totals[m.group(1)] += float(m.group(3))
    return dict(totals)


def _body(trace: Trace, ask: Ask, mode: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": ask.text}]
    body: dict[str, Any] = {"model": MODEL, "max_tokens": trace.scenario.max_tokens, "stream": ask.stream}
    if ask.prefixed and mode == "full":
        body["prefix"] = f"policy-t{ask.tenant}"
    elif ask.prefixed:
        messages.insert(0, {"role": "system", "content": trace.prefixes[ask.tenant]})
    body["messages"] = messages
    return body


async def _send(session: aiohttp.ClientSession, url: str, trace: Trace, i: int, mode: str,
                due: float) -> Result:
    ask = trace.asks[i]
    intent = trace.intents[ask.intent]
    body = orjson.dumps(_body(trace, ask, mode))
    headers = {"Authorization": f"Bearer sk-bench-tenant-{ask.tenant}", "Content-Type": "application/json"}
    if intent.doc is not None and mode != "direct":
        headers["Cache-Tag"] = f"doc:{intent.doc}"
    reply_id, kind, status = "", "error", 0
    try:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
            status = resp.status
            cache_status = resp.headers.get("Cache-Status", "")
            if ask.stream and status == 200:
                async for line in resp.content:
                    if line.startswith(b"data: {") and not reply_id:
                        reply_id = orjson.loads(line[6:]).get("id", "")
            else:
                payload = await resp.read()
                if status == 200:
                    reply_id = orjson.loads(payload).get("id", "")
        if status == 200:
            kind = ("semantic" if 'detail="semantic' in cache_status
                    else "hit" if "; hit" in cache_status
                    else "shield" if "shield-hit" in cache_status else "miss")
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        pass
    return Result(i, due, (time.time() - due) * 1000, status, kind, reply_id, len(body))


async def _webhook(session: aiohttp.ClientSession, origin: str, update: Update, n: int) -> Purge:
    body = orjson.dumps({"tags": [f"doc:{update.doc}"]})
    msg_id, ts = f"kb-{n}-{update.doc}", int(time.time())
    sent = time.time()
    async with session.post(origin + "/hooks/cms?wait=true&timeout=30", data=body, headers={
            "Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(SECRET, msg_id, ts, body)}) as resp:
        answer = orjson.loads(await resp.read())
    return Purge(update.doc, sent, time.time(), resp.status == 200 and bool(answer.get("complete")))


async def _drive(trace: Trace, mode: str, targets: dict[str, str], sims: list[str], origin: str,
                 progress: Any) -> tuple[list[Result], list[Purge]]:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start_loop, start_wall = loop.time() + 0.2, time.time() + 0.2
        tasks: list[asyncio.Task[Any]] = []
        purges: list[asyncio.Task[Purge]] = []
        events = sorted([(a.at, 0, i) for i, a in enumerate(trace.asks)]
                        + ([(u.at, 1, n) for n, u in enumerate(trace.updates)] if mode != "direct" else []))
        for at, kind, n in events:
            delay = start_loop + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == 1:
                purges.append(asyncio.create_task(_webhook(session, origin, trace.updates[n], n)))
                continue
            ask = trace.asks[n]
            url = sims[n % len(sims)] if mode == "direct" else targets[ask.region]
            task = asyncio.create_task(_send(session, url, trace, n, mode, start_wall + at))
            task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        done = await asyncio.gather(*purges)
    return list(results), list(done)


def run_mode(trace: Trace, mode: str, progress: Any) -> dict[str, Any]:
    s = trace.scenario
    with tempfile.TemporaryDirectory(prefix=f"edgecache-e2e-{mode}-") as tmp:
        root = Path(tmp)
        ports: dict[str, Any] = {"origin": free_port(), "sim": _consecutive_ports(s.sims)}
        ports.update({r: free_port() for r in s.regions})
        topology = _topology(root, s, mode, ports)
        sims = [f"http://127.0.0.1:{ports['sim'] + i}" for i in range(s.sims)]
        origin = f"http://127.0.0.1:{ports['origin']}"
        targets = {r: f"http://127.0.0.1:{ports[r]}" for r in s.regions}
        with Services(root) as services:
            for i, url in enumerate(sims):
                services.start(f"sim{i}", ["sim", "--topology", str(topology), "--index", str(i)], url + "/health")
            if mode != "direct":
                services.start("origin", ["origin", "--topology", str(topology)], origin + "/healthz")
                for r in s.regions:
                    services.spawn(r, ["node", "--topology", str(topology), "--region", r])
                for r in s.regions:
                    services.wait_healthy(r, targets[r] + "/healthz", timeout=180)
            if mode == "full":
                for k, text in enumerate(trace.prefixes):
                    req = urllib.request.Request(origin + "/v1/prefixes", method="POST", headers={
                        **ADMIN, "Content-Type": "application/json"},
                        data=json.dumps({"id": f"policy-t{k}", "text": text, "tags": [f"tenant:{k}"]}).encode())
                    urllib.request.urlopen(req, timeout=30).close()
                _wait_prefixes(targets, len(trace.prefixes))
            before = [_scrape(u) for u in sims]
            wall = time.monotonic()
            results, purges = asyncio.run(_drive(trace, mode, targets, sims, origin, progress))
            wall = time.monotonic() - wall
            after = [_scrape(u) for u in sims]
            origin_requests = _scrape(origin).get("edgecache_origin_requests_total", 0.0) if mode != "direct" else 0
    gpu = {name: sum(a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True))
           for name in ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total", "vllm:generation_tokens_total",
                        "vllm:request_success_total")}
    return {"results": results, "purges": purges, "gpu": gpu, "origin_requests": origin_requests, "wall_s": wall}


def _wait_prefixes(targets: dict[str, str], n: int, timeout: float = 30) -> None:
    """Every edge's replica knows the registered prefixes (it refreshes every few seconds)."""
    deadline = time.monotonic() + timeout
    for url in targets.values():
        while time.monotonic() < deadline:
            body = json.dumps({"model": MODEL, "prefix": f"policy-t{n - 1}", "max_tokens": 1,
                               "messages": [{"role": "user", "content": "warm-up"}]}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": "Bearer sk-bench-warmup",
                "Cache-Control": "no-store"})
            try:
                urllib.request.urlopen(req, timeout=30).close()
                break
            except urllib.error.HTTPError:
                time.sleep(0.2)


# -- figures -------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(percentile(sorted(values), q), 2) if values else None


def summarize(trace: Trace, raw: dict[str, Any]) -> dict[str, Any]:
    results: list[Result] = raw["results"]
    purges: list[Purge] = raw["purges"]
    n = len(results)
    kinds = Counter(r.kind for r in results)
    made_for: dict[str, int] = {}          # reply id -> the intent of the request that made it
    for r in results:
        if r.kind in ("miss", "shield") and r.reply_id:
            made_for.setdefault(r.reply_id, trace.asks[r.ask].intent)
    semantic = [r for r in results if r.kind == "semantic"]
    false_hits = [r for r in semantic if made_for.get(r.reply_id, trace.asks[r.ask].intent) != trace.asks[r.ask].intent]
    acks: dict[int, list[Purge]] = {}
    for p in purges:
        acks.setdefault(p.doc, []).append(p)
    stale = 0
    for r in results:
        doc = trace.intents[trace.asks[r.ask].intent].doc
        if r.kind not in ("hit", "semantic") or doc is None:
            continue
        generated = Reply.generated_at(r.reply_id)
        # the latest update of its document acknowledged before this request began
        earlier = [p for p in acks.get(doc, []) if p.acked < r.began]
        if earlier and generated is not None and generated < max(p.sent for p in earlier):
            stale += 1
    gpu = raw["gpu"]
    computed = gpu["vllm:prompt_tokens_total"] - gpu["vllm:prefix_cache_hits_total"]

    def lat(kind: str) -> dict[str, float | None]:
        values = [r.latency_ms for r in results if r.kind == kind]
        return {"count": len(values), "p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99)}

    ok = [r.latency_ms for r in results if r.kind != "error"]
    half = trace.scenario.duration_s / 2
    warm = [r for r in results if trace.asks[r.ask].at >= half]
    return {
        "requests": n,
        "errors": kinds["error"],
        "edge_answered_ratio": round((kinds["hit"] + kinds["semantic"]) / n, 4) if n else 0.0,
        "hit_ratio": {"exact": round(kinds["hit"] / n, 4), "semantic": round(kinds["semantic"] / n, 4),
                      "origin_shield": round(kinds["shield"] / n, 4), "miss": round(kinds["miss"] / n, 4)},
        # the second half of the run, caches warm: closer to a long-running deployment
        "warm_edge_answered_ratio": round(sum(r.kind in ("hit", "semantic") for r in warm) / len(warm), 4)
        if warm else 0.0,
        # vLLM's own count of prefill tokens processed (vllm:prompt_tokens_total)
        "gpu_prefill_tokens": int(gpu["vllm:prompt_tokens_total"]),
        # of those, the ones not found in the backends' prefix cache: the prefill actually computed
        "gpu_prefill_computed_tokens": int(computed),
        "decode_tokens": int(gpu["vllm:generation_tokens_total"]),
        "p50_ms": _pct(ok, 50),
        "p99_ms": _pct(ok, 99),
        "latency": {"hit": lat("hit"), "semantic": lat("semantic"), "shield": lat("shield"), "miss": lat("miss")},
        "origin_requests": int(raw["origin_requests"]),
        "gpu_requests": int(gpu.get("vllm:request_success_total", 0)),
        "client_bytes": sum(r.sent_bytes for r in results),
        "kb_updates": len(purges),
        "kb_updates_acknowledged": sum(p.complete for p in purges),
        "stale_served": stale,
        "semantic_hits": len(semantic),
        "semantic_false_hits": len(false_hits),
        "semantic_false_hit_rate": round(len(false_hits) / len(semantic), 4) if semantic else 0.0,
        "wall_s": round(raw["wall_s"], 1),
    }


def goals(modes: dict[str, dict[str, Any]], bound: float = 0.01) -> dict[str, Any]:
    full, direct = modes.get("full"), modes.get("direct")
    out: dict[str, Any] = {}
    if full and direct and direct["gpu_prefill_tokens"]:
        out["gpu_prefill_reduction"] = round(1 - full["gpu_prefill_tokens"] / direct["gpu_prefill_tokens"], 4)
        out["gpu_prefill_computed_reduction"] = round(
            1 - full["gpu_prefill_computed_tokens"] / direct["gpu_prefill_computed_tokens"], 4)
        out["gpu_decode_reduction"] = round(1 - full["decode_tokens"] / direct["decode_tokens"], 4)
    if full:
        out["goals"] = {
            "edge_answered_ratio >= 0.60": full["edge_answered_ratio"] >= 0.60,
            "gpu_prefill_reduction >= 0.80": out.get("gpu_prefill_reduction", 0) >= 0.80,
            "stale_served == 0": all(m["stale_served"] == 0 for m in modes.values()),
            f"semantic false-hit rate <= {bound}": full["semantic_false_hit_rate"] <= bound,
        }
    return out


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'mode':<9} {'reqs':>5} {'edge':>6} {'warm':>6} {'exact':>6} {'sem':>6} {'shield':>6} "
            f"{'prefill tok':>11} {'computed':>8} {'decode':>7} {'p50 ms':>7} {'p99 ms':>7} {'hit p50':>7} "
            f"{'sem p50':>7} {'miss p50':>8} {'gpu req':>7} {'sent kB':>8} {'stale':>5} {'false':>5}")
    lines = [head, "-" * len(head)]
    for mode, m in report["modes"].items():
        lat = m["latency"]
        lines.append(
            f"{mode:<9} {m['requests']:>5} {m['edge_answered_ratio']:>6.1%} {m['warm_edge_answered_ratio']:>6.1%} "
            f"{m['hit_ratio']['exact']:>6.1%} {m['hit_ratio']['semantic']:>6.1%} {m['hit_ratio']['origin_shield']:>6.1%} "
            f"{m['gpu_prefill_tokens']:>11,} {m['gpu_prefill_computed_tokens']:>8,} {m['decode_tokens']:>7,} "
            f"{m['p50_ms'] or 0:>7.1f} {m['p99_ms'] or 0:>7.1f} "
            f"{lat['hit']['p50_ms'] or 0:>7.1f} {lat['semantic']['p50_ms'] or 0:>7.1f} {lat['miss']['p50_ms'] or 0:>8.1f} "
            f"{m['gpu_requests']:>7} {m['client_bytes'] / 1e3:>8.0f} {m['stale_served']:>5} {m['semantic_false_hits']:>5}")
    if "gpu_prefill_reduction" in report:
        lines.append(f"full vs direct: GPU prefill tokens -{report['gpu_prefill_reduction']:.1%} (of which computed, "
                     f"not in the prefix cache: -{report['gpu_prefill_computed_reduction']:.1%}), "
                     f"decode -{report['gpu_decode_reduction']:.1%}")
    for goal, met in report.get("goals", {}).items():
        lines.append(f"  {'met ' if met else 'MISS'} {goal}")
    return "\n".join(lines)


def write_charts(report: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    ms = [report["modes"][m] for m in modes]
    directory.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bottom = [0.0] * len(ms)
    for tier, colour in (("exact", "#2b8cbe"), ("semantic", "#7bccc4"), ("origin_shield", "#ccebc5")):
        values = [m["hit_ratio"][tier] * 100 for m in ms]
        axes[0].bar(modes, values, bottom=bottom, label=tier, color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[0].axhline(60, ls="--", color="grey", lw=1)
    axes[0].set(title="answered without a GPU (%)", ylim=(0, 100))
    axes[0].legend()
    axes[1].bar(modes, [m["gpu_prefill_tokens"] for m in ms], color="#e34a33", label="prefill")
    axes[1].bar(modes, [m["decode_tokens"] for m in ms], bottom=[m["gpu_prefill_tokens"] for m in ms],
                color="#fdbb84", label="decode")
    axes[1].set(title="GPU tokens at the backends")
    axes[1].legend()
    x = range(len(modes))
    axes[2].bar([i - 0.2 for i in x], [m["p50_ms"] or 0 for m in ms], width=0.4, label="p50")
    axes[2].bar([i + 0.2 for i in x], [m["p99_ms"] or 0 for m in ms], width=0.4, label="p99")
    axes[2].set_xticks(list(x), modes)
    axes[2].set(title="latency, all requests (ms)")
    axes[2].legend()
    fig.tight_layout()
    path = directory / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_markdown(report: dict[str, Any], path: Path, charts: Sequence[Path]) -> None:
    s = report["scenario"]
    lines = ["# End-to-end benchmark", "",
             f"Command: `{report['command']}`; {report['machine'].get('cpu_count')} CPUs "
             f"({report['machine'].get('cpu_model')}), commit {report['machine'].get('git_commit')}, load average "
             f"before {report['machine'].get('loadavg_before')}.", "",
             f"Scenario: {s['rate_rps']} requests/s for {s['duration_s']} s (Poisson, open loop), "
             f"{len(s['regions'])} regions, {s['tenants']} tenants, {report['intents']} intents (Zipf s={s['zipf_s']}; "
             f"{s['dup_intents']} asked in two wordings, {2 * s['trap_pairs']} look-alike traps), "
             f"{s['prefix_share']:.0%} with a {s['prefix_chars']}-character system prompt, "
             f"{s['rag_share']:.0%} of intents tagged by a document, {s['kb_updates_per_s']} KB updates/s "
             f"(signed webhook, wait=true), {s['stream_share']:.0%} streaming, {s['sims']} simulated GPUs.", "",
             "```", format_table(report), "```", ""]
    lines += [f"![{c.stem}]({c.name})" for c in charts]
    lines += ["", "Columns: `edge` = answered at the edge (exact + semantic hits); `warm` = the same over the "
              "second half of the run; `shield` = edge misses the origin's shield answered without a GPU; "
              "`prefill tok` = the backends' `vllm:prompt_tokens_total` (vLLM's \"prefill tokens processed\"); "
              "`computed` = those not found in their prefix cache (the prefill compute left after vLLM's own "
              "prefix caching); `gpu req` = requests that reached a backend; latencies in ms from when a "
              "request was due; `sent kB` = bytes from clients; `stale` = answers served "
              "after their document's update was acknowledged, generated before it was sent; `false` = "
              "semantic hits whose answer was generated for another intent.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] overrides (a run under 3 minutes)")
    p.add_argument("--scenario", type=Path, default=SCENARIO)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", help="write the report here")
    p.add_argument("--report", type=Path, help="Markdown report (charts beside it); default bench/reports/e2e.md, "
                                              "bench/out/e2e_quick.md with --quick")
    p.add_argument("--no-report", action="store_true", help="no Markdown or charts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from bench.hit_path import machine_facts

    args = build_parser().parse_args(argv)
    scenario = load_scenario(args.scenario, quick=args.quick)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r} (expected {', '.join(MODES)})")
    trace = build_trace(scenario)
    report: dict[str, Any] = {"command": "python -m bench.e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "machine": machine_facts(), "scenario": asdict(scenario), "intents": len(trace.intents),
                              "requests": len(trace.asks), "modes": {}}
    with tqdm(total=len(trace.asks) * len(modes), unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
        for mode in modes:
            bar.set_description(mode)
            report["modes"][mode] = summarize(trace, run_mode(trace, mode, bar))
    report.update(goals(report["modes"]))
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if not args.no_report:
        # a quick run (cold caches, 20 s) never overwrites the full run's report
        path = args.report or (HERE / "out" / "e2e_quick.md" if args.quick else HERE / "reports" / "e2e.md")
        write_markdown(report, path, write_charts(report, path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
