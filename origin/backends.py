"""The inference servers behind the origin, and how a request reaches one of them.

``BackendPool.open`` asks the routing policy (``origin.routing``) for the available backends
in order and sends the request to the first; the response is returned as soon as its
headers arrive. Before that first byte, a connection failure, a timeout or a 502/503/504
moves on to the next candidate (up to ``retries`` more); a 429 moves on too, without
counting against the backend. After the first byte nothing is retried: the answer is
already flowing to the client.

Back-pressure: a backend holds at most ``max_in_flight_per_backend`` requests; routing only
considers backends with room. When every usable one is full, the request waits in a FIFO
queue (at most ``queue_size`` requests, each at most ``queue_timeout_s``) for a slot; beyond
that, or when every backend tried answered 429, ``open`` raises :class:`OriginOverloaded`
(429 ``origin_overloaded``, with the ``Retry-After`` to send) instead of queueing unboundedly.

Each backend has:

- a **health check**: a background task GETs ``/health`` every ``health_interval_s``; a
  failed check marks the backend down and routing skips it until a check succeeds;
- a **circuit breaker**: ``breaker_failures`` consecutive failed requests open it; after
  ``breaker_cooldown_s`` one request is let through (half-open) and its outcome closes or
  re-opens it;
- **metrics**: a background task reads its ``/metrics`` every ``metrics_interval_s`` (vLLM
  names; SGLang's are understood too) for running and waiting requests, KV-cache usage and
  the prefix-cache hit rate it observed since the last read.

When every backend is down or open, all of them are tried anyway, in policy order: a wrong
health verdict must not turn into an outage.

In-flight accounting: ``open`` counts the request against its backend from the moment it is
sent; the caller calls ``release(backend)`` once the answer is finished (or uses the
``request`` context manager, which does both releases).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from edgecache.config import BackendConfig, OriginConfig
from edgecache.errors import Overloaded, UpstreamTimeout, UpstreamUnavailable
from origin.routing import Decision, PrefixAwareParams, Router, make_router
from origin.vllm_metrics import BackendMetrics, parse_metrics

__all__ = ["Backend", "BackendPool", "CircuitBreaker", "OriginOverloaded"]

log = logging.getLogger("edgecache.origin")

_FAILED = frozenset({502, 503, 504})   # the backend is broken: try another, count a failure
_BUSY = frozenset({429})                # the backend is full: try another, no failure


class OriginOverloaded(Overloaded):
    """Every usable backend is full or answered 429, and no slot freed up in time (429).

    ``retry_after_s``: the ``Retry-After`` to send (a backend's own value when it gave one).
    """

    code = "origin_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _describe(exc: BaseException) -> str:
    """An error as the logs and ``/health`` show it: a ``ClientResponseError``'s repr holds the
    request's headers (the backend's key), so that one is named by its class and status only."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}(status={exc.status})"
    return repr(exc)


def _retry_after(value: str | None, default: int) -> int:
    """A backend's ``Retry-After`` in whole seconds (an HTTP date or garbage: ``default``)."""
    try:
        return max(int(value or ""), 0)
    except ValueError:
        return default


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → half-open after ``cooldown_s``
    (one probe at a time) → closed on the probe's success, open again on its failure.

    Pure: every method takes ``now`` (seconds, any monotonic clock).
    """

    __slots__ = ("_probing", "cooldown_s", "failures", "opened_at", "state", "threshold")

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold = max(threshold, 1)
        self.cooldown_s = cooldown_s
        self.state = "closed"
        self.failures = 0          # consecutive
        self.opened_at = 0.0
        self._probing = False

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (no side effect)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now - self.opened_at >= self.cooldown_s
        return not self._probing

    def acquire(self, now: float) -> None:
        """A request is being sent: past the cool-down, it becomes the half-open probe."""
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
        if self.state == "half_open":
            self._probing = True

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self._probing = False
        if self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold):
            self.state = "open"
            self.opened_at = now


@dataclass(slots=True, eq=False)
class Backend:
    """One inference server and what the origin knows about it."""

    config: BackendConfig
    index: int = 0
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(5, 10.0))
    healthy: bool = True
    in_flight: int = 0
    requests: int = 0
    last_error: str = ""
    metrics: BackendMetrics | None = None
    routed: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The configured name, else the URL's ``scheme://host:port``: never its userinfo."""
        return self.config.name or str(URL(self.config.url).origin())

    @property
    def failures(self) -> int:
        """Consecutive failed requests."""
        return self.breaker.failures

    def available(self, now: float) -> bool:
        return self.healthy and self.breaker.available(now)

    def url(self, path: str) -> str:
        return self.config.url.rstrip("/") + path


class BackendPool:
    """The backends, the routing policy over them, their health, breakers and metrics."""

    def __init__(self, backends: tuple[BackendConfig, ...], config: OriginConfig,
                 session: aiohttp.ClientSession, *, router: Router | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not backends:
            raise ValueError("the origin needs at least one backend")
        self._config = config
        self._session = session
        self._clock = clock
        self.backends = [Backend(b, i, CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s))
                         for i, b in enumerate(backends)]
        params = PrefixAwareParams(cache_threshold=config.prefix_cache_threshold,
                                   balance_abs_threshold=config.prefix_balance_abs,
                                   balance_rel_threshold=config.prefix_balance_rel,
                                   tree_chars=config.prefix_tree_chars)
        self.router = router or make_router(config.routing, len(backends), params)
        self._tasks: list[asyncio.Task[None]] = []
        self._round = asyncio.Event()
        self._queue: deque[asyncio.Future[None]] = deque()   # requests waiting for a slot, FIFO
        self.overloaded = 0   # requests refused with OriginOverloaded

    @property
    def queued(self) -> int:
        """Requests waiting for a backend slot."""
        return sum(1 for f in self._queue if not f.done())

    # -- routing ---------------------------------------------------------------------------

    def _full(self, backend: Backend) -> bool:
        limit = self._config.max_in_flight_per_backend
        return 0 < limit <= backend.in_flight

    def _decide(self, route: str | None, *, bounded: bool = False) -> Decision | None:
        """The policy's order over usable backends; ``bounded``: only those with room (None: all full)."""
        now = self._clock()
        allowed = [b.index for b in self.backends if b.available(now)] or [b.index for b in self.backends]
        if bounded:
            allowed = [i for i in allowed if not self._full(self.backends[i])]
            if not allowed:
                return None
        return self.router.decide(route, [b.in_flight for b in self.backends], allowed)

    def _overloaded(self, why: str, retry_after_s: int | None = None) -> OriginOverloaded:
        self.overloaded += 1
        after = self._config.retry_after_s if retry_after_s is None else retry_after_s
        return OriginOverloaded(f"The origin is overloaded: {why}; retry after {after} s",
                                retry_after_s=after)

    async def _slot(self, route: str | None) -> Decision:
        """A routing decision among backends with room, waiting in the FIFO queue when all are full."""
        decision = None if self.queued else self._decide(route, bounded=True)
        if decision is not None:
            return decision
        if self.queued >= self._config.queue_size:
            raise self._overloaded("every backend is full and the queue is full")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.queue_timeout_s
        waiter = loop.create_future()
        self._queue.append(waiter)
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    await waiter
                decision = self._decide(route, bounded=True)
                if decision is not None:
                    return decision
                waiter = loop.create_future()   # a newcomer took the slot: wait again, first in line
                self._queue.appendleft(waiter)
        except TimeoutError:
            raise self._overloaded(f"every backend stayed full for {self._config.queue_timeout_s:g} s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            if decision is None and waiter.done() and not waiter.cancelled():
                self._wake()   # woken but leaving without the slot: pass it on

    def _wake(self) -> None:
        """A slot freed up: the first request still waiting may take it."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _free(self, backend: Backend) -> None:
        backend.in_flight = max(backend.in_flight - 1, 0)
        self._wake()

    def targets(self, route: str, n: int = 1) -> list[Backend]:
        """The backends the policy would send ``route`` to now, best first (for KV warm-up).
        Nothing is recorded: ``open_on(..., route=route)`` records the one actually used."""
        decision = self._decide(route)
        assert decision is not None
        return [self.backends[i] for i in decision.order[:max(n, 0)]]

    def release(self, backend: Backend) -> None:
        """The answer of a request ``open`` returned is finished (or abandoned)."""
        self._free(backend)

    # -- sending ---------------------------------------------------------------------------

    def _headers(self, backend: Backend, extra: Mapping[str, str]) -> dict[str, str]:
        headers = dict(extra)
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        return headers

    async def _send(self, backend: Backend, method: str, path: str, body: bytes | None,
                    headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """One attempt; connection failures and timeouts become our errors and count.
        Their messages reach clients: they never name the backend (the log does)."""
        backend.breaker.acquire(self._clock())
        try:
            async with asyncio.timeout(self._config.first_byte_timeout_s):
                return await self._session.request(method, backend.url(path), data=body,
                                                   headers=self._headers(backend, headers))
        except TimeoutError:
            self._failed(backend, "no response headers in time")
            log.warning("backend %s sent no response headers in time", backend.name)
            raise UpstreamTimeout("a backend sent no response headers in time") from None
        except aiohttp.ClientError as exc:
            self._failed(backend, _describe(exc))
            log.warning("backend %s failed before the first byte: %s", backend.name, _describe(exc))
            raise UpstreamUnavailable("a backend is unreachable") from None

    def _failed(self, backend: Backend, why: str) -> None:
        backend.breaker.failure(self._clock())
        backend.last_error = why
        if backend.breaker.state == "open":
            log.warning("backend %s: circuit open after %d failures (%s)", backend.name,
                        backend.breaker.failures, why)

    async def open(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], *,
                   route: str | None = None) -> tuple[Backend, aiohttp.ClientResponse]:
        """The first backend response (headers received) that is not a retryable failure.

        ``route``: the text the policy routes on (the prompt as the backend will see it);
        None routes anywhere. The caller must ``release(backend)`` when the answer is done.
        Raises :class:`OriginOverloaded` when no backend had room in time or every one tried
        answered 429.
        """
        decision = await self._slot(route)
        attempts = min(len(decision.order), self._config.retries + 1)
        last: Exception | None = None
        busy: int | None = None   # the Retry-After of the last 429: no answer, and one backend is full
        for k, i in enumerate(decision.order[:attempts]):
            backend = self.backends[i]
            reason = decision.reason if k == 0 else "failover"
            if k > 0 and self._full(backend):
                continue   # it filled up while the first choice was tried
            self.router.record(route, i)   # before awaiting: a concurrent request follows it
            backend.in_flight += 1
            try:
                resp = await self._send(backend, method, path, body, headers)
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                self._free(backend)
                last = exc
                continue
            except asyncio.CancelledError:
                self._free(backend)
                raise
            if resp.status in _FAILED and attempts > 1:
                self._failed(backend, f"answered {resp.status}")
                last = UpstreamUnavailable(f"a backend answered {resp.status}")
            elif resp.status in _BUSY:
                last = UpstreamUnavailable(f"a backend answered {resp.status}")
                busy = _retry_after(resp.headers.get("Retry-After"), self._config.retry_after_s)
            else:
                if resp.status in _FAILED:
                    self._failed(backend, f"answered {resp.status}")
                else:
                    backend.breaker.success()
                backend.requests += 1
                backend.routed[reason] = backend.routed.get(reason, 0) + 1
                return backend, resp
            resp.release()
            self._free(backend)
        if busy is not None:
            raise self._overloaded(f"the backends tried are busy (429, {attempts} tried)", busy)
        raise UpstreamUnavailable(f"every backend failed ({attempts} tried); last: {last}")

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str], *,
                      route: str | None = None) -> AsyncIterator[tuple[Backend, aiohttp.ClientResponse]]:
        """``open`` as a context manager: releases the response and the backend on exit."""
        backend, resp = await self.open(method, path, body, headers, route=route)
        try:
            yield backend, resp
        finally:
            resp.release()
            self.release(backend)

    async def open_on(self, backend: Backend, method: str, path: str, body: bytes | None,
                      headers: Mapping[str, str], *, route: str | None = None) -> aiohttp.ClientResponse:
        """Send to this one backend, no failover, not counted in flight (KV warm-up).
        ``route`` is recorded for the policy, so later requests with that prefix follow."""
        if route:
            self.router.record(route, backend.index)
        resp = await self._send(backend, method, path, body, headers)
        if resp.status in _FAILED:
            self._failed(backend, f"answered {resp.status}")
        else:
            backend.breaker.success()
        return resp

    # -- health and metrics ----------------------------------------------------------------

    async def _get(self, backend: Backend, path: str) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=self._config.health_timeout_s)
        async with self._session.get(backend.url(path), headers=self._headers(backend, {}),
                                     timeout=timeout) as resp:
            return resp.status, await resp.read()

    async def _check(self, backend: Backend) -> None:
        try:
            status, _ = await self._get(backend, "/health")
            why = "" if status == 200 else f"/health answered {status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"/health failed: {_describe(exc)}"
        if why:
            if backend.healthy:
                log.warning("backend %s is down: %s", backend.name, why)
            backend.healthy, backend.last_error = False, why
        elif not backend.healthy:
            log.info("backend %s is up again", backend.name)
            backend.healthy = True
            self.router.forget(backend.index)   # it may have restarted with an empty cache

    async def check_health(self) -> None:
        """One round of health checks, every backend at once."""
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _scrape(self, backend: Backend) -> None:
        try:
            status, raw = await self._get(backend, "/metrics")
        except (aiohttp.ClientError, TimeoutError):
            return
        if status != 200:
            return
        current = parse_metrics(raw.decode("utf-8", "replace"), self._clock(), backend.metrics)
        if current.restarted:
            self.router.forget(backend.index)
        backend.metrics = current

    async def scrape_metrics(self) -> None:
        """One round of ``/metrics`` reads, every backend at once."""
        await asyncio.gather(*(self._scrape(b) for b in self.backends))

    async def _every(self, interval_s: float, step: Callable[[], Any]) -> None:
        while True:
            try:
                await step()
            except Exception:   # a bug in one round must not end the loop
                log.exception("backend polling failed")
            self._round.set()
            self._round = asyncio.Event()
            await asyncio.sleep(interval_s)

    async def next_round(self) -> None:
        """Wait until the background polling finishes its next round (health or metrics)."""
        await self._round.wait()

    async def start(self) -> None:
        """Start polling health and metrics in the background (intervals of 0 turn one off)."""
        c = self._config
        if c.health_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._every(c.health_interval_s, self.check_health)))
        if c.metrics_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._every(c.metrics_interval_s, self.scrape_metrics)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every backend's state as plain data (for the origin's /health and /metrics)."""
        now = self._clock()
        trees = getattr(self.router, "trees", None)
        out = []
        for b in self.backends:
            out.append({
                "name": b.name, "url": str(URL(b.config.url).with_user(None)), "healthy": b.healthy,
                "available": b.available(now), "circuit": b.breaker.state,
                "failures": b.failures, "last_error": b.last_error,
                "in_flight": b.in_flight, "requests": b.requests, "routed": dict(b.routed),
                "routing_tree_chars": trees[b.index].size if trees else None,
                "metrics": b.metrics.as_dict(now) if b.metrics else None,
            })
        return out
