"""Closed-loop load: the request under test (``Target``), one run's figures (``LoadResult``),
and the aiohttp load generator used when ``wrk`` is not installed.

Closed loop: each of ``connections`` clients sends its next request as soon as the previous
answer has been read, over one keep-alive connection, for ``duration_s`` seconds. A response
is *good* when its status is 200 and, for a target that expects cache hits, its
``Cache-Status`` header says ``; hit;``; everything else is counted as an error by kind.

The aiohttp generator runs in this process on uvloop and tops out near 9,500 req/s on a
2-core machine: above that it measures itself, which is why ``bench.wrk`` is preferred.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import aiohttp

__all__ = ["LoadResult", "Target", "percentile", "run_aiohttp", "run_aiohttp_sync"]


@dataclass(frozen=True, slots=True)
class Target:
    """One request, sent again and again.

    name: label in tables. url: full URL of the POST. body: the JSON body, bytes.
    authorization: the ``Authorization`` header value. expect_hit: a 200 is good only when
    ``Cache-Status`` contains ``; hit;`` (the edge); otherwise any 200 is good (the backend).
    """

    name: str
    url: str
    body: bytes
    authorization: str
    expect_hit: bool


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One closed-loop run.

    generator: ``wrk`` or ``aiohttp``. connections: concurrent clients. duration_s: measured
    wall time. requests: completed responses. good: 200s (that were hits, when expected).
    non_200: other statuses. non_hits: 200s that were not hits when hits were expected.
    socket_errors: connect/read/write errors and timeouts. Latencies are per request, from
    sending to the whole answer read, in milliseconds.
    """

    generator: str
    connections: int
    duration_s: float
    requests: int
    good: int
    non_200: int
    non_hits: int
    socket_errors: int
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        """Good responses per second (hits/s on the edge)."""
        return self.good / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.non_200 + self.non_hits + self.socket_errors

    def as_dict(self) -> dict[str, float | int | str]:
        out = asdict(self)
        out["rps"] = round(self.rps, 1)
        out["errors"] = self.errors
        return out


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of an ascending sequence; 0 if empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def run_aiohttp(target: Target, *, connections: int, duration_s: float) -> LoadResult:
    """Drive ``target`` with ``connections`` closed-loop clients for ``duration_s`` seconds."""
    headers = {"Content-Type": "application/json", "Authorization": target.authorization}
    latencies: list[float] = []
    counts = {"good": 0, "non_200": 0, "non_hits": 0, "socket_errors": 0}
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def client() -> None:
            while (sent := time.perf_counter()) < deadline:
                try:
                    async with session.post(target.url, data=target.body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                        cache_status = resp.headers.get("Cache-Status", "")
                except (aiohttp.ClientError, OSError, TimeoutError):
                    counts["socket_errors"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                if status != 200:
                    counts["non_200"] += 1
                elif target.expect_hit and "; hit;" not in cache_status:
                    counts["non_hits"] += 1
                else:
                    counts["good"] += 1

        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    ms = [x * 1000 for x in ordered]
    return LoadResult(
        generator="aiohttp", connections=connections, duration_s=elapsed, requests=len(ms),
        p50_ms=percentile(ms, 50), p75_ms=percentile(ms, 75), p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99), max_ms=ms[-1] if ms else 0.0,
        mean_ms=sum(ms) / len(ms) if ms else 0.0, **counts)


def run_aiohttp_sync(target: Target, *, connections: int, duration_s: float) -> LoadResult:
    """``run_aiohttp`` on a fresh uvloop event loop (asyncio's own when uvloop is missing)."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_aiohttp(target, connections=connections, duration_s=duration_s))
