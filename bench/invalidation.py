"""Invalidation latency: from a signed CMS webhook reaching the origin to every edge having applied it.

    python -m bench.invalidation [--quick] [--edges 3,10] [--buses embedded,nats] [--events N] [--json OUT]

For each bus and edge count, a throw-away topology runs as real processes on loopback (the
origin and N edge nodes, each ``python -m edgecache.cli``; the NATS bus uses the server at
``--nats-url`` with a stream of its own, deleted afterwards). Then ``--events`` webhooks are
sent one after another, signed, each with ``?wait=true``: the origin answers once every edge
has reported applying the event, so the time from sending to the answer is an upper bound on
"webhook receipt to every edge applied" (it adds one loopback round trip and the edges' report).
Each answer is checked: complete, every edge listed, each at or past the event's sequence.

Prints a table and writes JSON ``{"embedded": {"edges_3": {"p50_ms", "p99_ms", ...}, ...}, "nats": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadgen import percentile
from bench.procs import Services
from bench.stack import StackError, free_port
from edgecache.config import AuthConfig
from edgecache.webhook import sign

__all__ = ["build_parser", "main", "run_cell"]

SECRET = AuthConfig().webhook_secret


def _deliver(origin: str, n: int, run: str) -> tuple[float, dict[str, Any]]:
    body = json.dumps({"tags": [f"doc:{n}"]}).encode()
    msg_id, ts = f"bench-{run}-{n}", int(time.time())
    req = urllib.request.Request(origin + "/hooks/cms?wait=true&timeout=10", data=body, method="POST", headers={
        "Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
        "webhook-signature": sign(SECRET, msg_id, ts, body)})
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as exc:
        raise StackError(f"webhook {n}: {exc.code} {exc.read()[:300]!r}") from None
    elapsed = time.perf_counter() - began
    answer["status"] = status
    return elapsed, answer


def run_cell(bus: str, edges: int, events: int, nats_url: str) -> dict[str, Any]:
    """One topology: ``edges`` edge processes on ``bus``; ``events`` webhooks timed."""
    run = f"{os.getpid()}{int(time.time() * 1000) % 10**8}"
    stream = f"BENCH{run}"
    with tempfile.TemporaryDirectory(prefix="edgecache-bench-inv-") as tmp:
        root = Path(tmp)
        origin_port, sim_port = free_port(), free_port()
        ports = [free_port() for _ in range(edges)]
        text = (f'[origin]\nport = {origin_port}\ndata_dir = "{root / "origin"}"\nwarm_prefixes = false\n\n'
                f'[sim]\ncount = 1\nbase_port = {sim_port}\n\n[bus]\nkind = "{bus}"\nnats_url = "{nats_url}"\nstream = "{stream}"\n'
                f'subject = "bench{run}.events"\n\n')
        for i, port in enumerate(ports):
            text += f'[[edges]]\nregion = "r{i}"\nport = {port}\ndata_dir = "{root / f"r{i}"}"\n\n'
        topology = root / "topology.toml"
        topology.write_text(text, encoding="utf-8")
        try:
            with Services(root) as services:
                services.start("sim", ["sim", "--topology", str(topology), "--index", "0"],
                               f"http://127.0.0.1:{sim_port}/health")
                services.start("origin", ["origin", "--topology", str(topology)], f"http://127.0.0.1:{origin_port}/healthz")
                for i in range(edges):
                    services.spawn(f"r{i}", ["node", "--topology", str(topology), "--region", f"r{i}"])
                for i, port in enumerate(ports):
                    services.wait_healthy(f"r{i}", f"http://127.0.0.1:{port}/healthz")
                times = _time_webhooks(f"http://127.0.0.1:{origin_port}", edges, events, run)
            warnings = [line for log in sorted(root.glob("*.log"))
                        for line in log.read_text(errors="replace").splitlines() if " WARNING " in line or " ERROR " in line]
        finally:
            if bus == "nats":
                _delete_stream(nats_url, stream)
    times.sort()
    return {"events": len(times), "p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
            "max_ms": round(times[-1], 2), "mean_ms": round(sum(times) / len(times), 2),
            "log_warnings": len(warnings), "first_warnings": warnings[:5]}


def _time_webhooks(origin: str, edges: int, events: int, run: str) -> list[float]:
    for n in range(3):   # warm-up: every edge registered and caught up
        _deliver(origin, -1 - n, run)
    times = []
    for n in range(events):
        elapsed, answer = _deliver(origin, n, run)
        listed = answer.get("edges", [])
        if not answer.get("complete") or len(listed) != edges or any(e["applied_seq"] < answer["seq"] for e in listed):
            raise StackError(f"webhook {n} not applied everywhere: {answer}")
        times.append(elapsed * 1000)
        time.sleep(0.01)
    return times


def _delete_stream(nats_url: str, stream: str) -> None:
    import asyncio

    import nats

    async def delete() -> None:
        nc = await nats.connect(nats_url)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
        await nc.close()

    with contextlib.suppress(Exception):
        asyncio.run(delete())


def _nats_up(url: str) -> bool:
    host, _, port = url.removeprefix("nats://").partition(":")
    try:
        with socket.create_connection((host, int(port or 4222)), timeout=1):
            return True
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.invalidation", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100 events per cell (default 500)")
    p.add_argument("--edges", default="3,10", help="edge counts, comma-separated")
    p.add_argument("--buses", default="embedded,nats")
    p.add_argument("--events", type=int, default=0)
    p.add_argument("--nats-url", default=os.environ.get("EDGECACHE_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    events = args.events or (100 if args.quick else 500)
    results: dict[str, Any] = {}
    rows = []
    for bus in args.buses.split(","):
        if bus == "nats" and not _nats_up(args.nats_url):
            print(f"NATS at {args.nats_url} is not reachable: skipping the nats bus", file=sys.stderr)
            results[bus] = {"skipped": f"NATS at {args.nats_url} not reachable"}
            continue
        for n in (int(x) for x in args.edges.split(",")):
            cell = run_cell(bus, n, events, args.nats_url)
            results.setdefault(bus, {})[f"edges_{n}"] = cell
            rows.append((bus, n, cell))
    results["meta"] = {"events_per_cell": events, "command": "python -m bench.invalidation " + " ".join(argv or sys.argv[1:]),
                       "measure": "signed webhook with ?wait=true: send -> answer once every edge reported applying"}
    print(f"{'bus':<10} {'edges':>5} {'events':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'warnings':>8}")
    for bus, n, cell in rows:
        print(f"{bus:<10} {n:>5} {cell['events']:>6} {cell['p50_ms']:>8.2f} {cell['p99_ms']:>8.2f} {cell['max_ms']:>8.2f} "
              f"{cell['log_warnings']:>8}")
        for line in cell["first_warnings"]:
            print(f"    {line[:160]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
