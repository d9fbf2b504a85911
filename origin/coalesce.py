"""Request coalescing: identical requests in flight at the origin share one backend request.

Several edge regions, or several workers and pods of one region, may miss on the same key at
the same moment; each edge collapses its own misses (``nodes/fill.py``), the origin collapses
what reaches it across edges. Two requests are *identical* when :func:`flight_key` gives the
same bytes: same tenant (``X-EdgeCache-Tenant``), endpoint, prefix id and version, canonical
request (``edgecache.keys``: field order, whitespace and ``1.0``/``1`` do not matter) and the
same wire format (``stream`` and ``stream_options``), so every waiter can be sent exactly the
bytes the backend sent. Requests that must not share get no key: no tenant, a request sent
with ``Cache-Control: no-cache`` or ``no-store`` (the client bypasses the cache, so it gets a
backend request of its own), or a body the key cannot canonicalise (the backend judges it).

A :class:`Flight` runs as its own task, independent of the request that started it: a waiter
that disconnects does not cancel it for the others; the last waiter to leave cancels it (the
backend stops generating for nobody). The response head (status, content type) and then the
body chunks, as they arrive, go to every waiter; a waiter joining late gets the chunks so far
first. A failure before the head fails every waiter with the same error (the backend pool has
already retried elsewhere); a failure after it cuts every waiter's stream. :class:`Flights`
bounds both the flights (``coalesce_max_flights``) and their waiters (``coalesce_max_waiters``);
a request over a bound gets a flight of its own.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgecache.errors import BadRequest, EdgeCacheError, UpstreamError
from edgecache.keys import Scope, cache_key
from edgecache.policy import parse_cache_control

__all__ = ["Flight", "Flights", "Head", "flight_key"]

log = logging.getLogger("edgecache.origin")


def flight_key(endpoint: str, body: Mapping[str, Any], *, tenant: str | None,
               prefix: tuple[str, str] | None = None, cache_control: str | None = None) -> bytes | None:
    """The bytes identical requests share, or None when this one must have a backend request of its own.

    ``body``: the request as the edge sent it (prefix reference, not text); ``prefix``: the
    (id, version) it references, the version being the one the backend will see.
    """
    if not tenant:
        return None
    cc = parse_cache_control(cache_control)
    if cc.no_cache or cc.no_store:
        return None
    try:
        scope = Scope(tenant) if prefix is None else Scope(tenant, *prefix)
        key = cache_key(endpoint, body, scope)
        wire = orjson.dumps([body.get("stream") is True, body.get("stream_options")], option=orjson.OPT_SORT_KEYS)
    except (BadRequest, ValueError, TypeError, orjson.JSONEncodeError):
        return None
    return key.digest + wire


@dataclass(frozen=True, slots=True)
class Head:
    """The backend response's status line and the headers every waiter repeats."""

    status: int
    content_type: str
    backend: str

    @property
    def streaming(self) -> bool:
        return self.content_type.startswith("text/event-stream")


Upstream = Callable[["Flight"], Awaitable[None]]
"""Sends the backend request: calls ``flight.begin(head)``, then ``flight.feed(chunk)`` per chunk.
Raises an ``EdgeCacheError`` on failure (before or after the head)."""


class Flight:
    """One backend request and the requests waiting for its answer."""

    def __init__(self, upstream: Upstream, key: bytes | None = None,
                 on_done: Callable[[Flight], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.key = key
        self.head: asyncio.Future[Head] = loop.create_future()
        self.chunks: list[bytes] = []
        self.done = asyncio.Event()
        self.failure: EdgeCacheError | None = None
        self.waiters = 0
        self._upstream = upstream
        self._on_done = on_done
        self._progress: asyncio.Future[None] = loop.create_future()
        self._task: asyncio.Task[None] | None = None

    # -- the backend request -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="origin-flight")

    def begin(self, head: Head) -> None:
        self.head.set_result(head)

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self.chunks.append(chunk)
            self._wake()

    def _wake(self) -> None:
        progress, self._progress = self._progress, self.head.get_loop().create_future()
        progress.set_result(None)

    async def _run(self) -> None:
        try:
            await self._upstream(self)
        except asyncio.CancelledError:
            self.failure = UpstreamError("the request was cancelled", code="cancelled")
            raise
        except EdgeCacheError as exc:
            self.failure = exc
        except Exception as exc:   # a bug: every waiter gets a 502, the origin keeps serving
            log.exception("origin flight failed")
            self.failure = UpstreamError(f"the backend request failed: {exc.__class__.__name__}")
        finally:
            if not self.head.done():
                self.head.set_exception(self.failure or UpstreamError("the backend sent no answer"))
                self.head.exception()   # retrieved: waiters raise their own copy
            self.done.set()
            self._wake()
            self._finish()

    def _finish(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(self)

    # -- waiters -----------------------------------------------------------------------------

    def join(self) -> None:
        self.waiters += 1

    def leave(self) -> None:
        """A waiter is gone; the last one to leave cancels an unfinished backend request."""
        self.waiters -= 1
        if self.waiters <= 0 and not self.done.is_set() and self._task is not None:
            self._finish()   # out of the table now: nobody may join a cancelled flight
            self._task.cancel()

    def error(self) -> EdgeCacheError:
        """This waiter's copy of the flight's failure (each raise has its own traceback)."""
        assert self.failure is not None
        return copy.copy(self.failure)

    async def wait_head(self) -> Head:
        """The response head; raises the failure when the backend request failed before it."""
        try:
            return await asyncio.shield(self.head)
        except EdgeCacheError:
            raise self.error() from None

    async def live(self) -> AsyncIterator[bytes]:
        """Every chunk so far, then each new one as it arrives, until the backend's answer ends."""
        i = 0
        while True:
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
            if self.done.is_set():
                return
            await asyncio.shield(self._progress)

    async def body(self) -> bytes:
        """The whole answer once it is complete; raises the failure if it broke off."""
        await self.done.wait()
        if self.failure is not None:
            raise self.error()
        return b"".join(self.chunks)


class Flights:
    """The coalescable flights in progress, by :func:`flight_key`, and their bounds."""

    def __init__(self, *, max_waiters: int, max_flights: int) -> None:
        self.max_waiters = max_waiters
        self.max_flights = max_flights
        self.coalesced = 0   # requests that joined a flight started by another
        self._flights: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: bytes | None, upstream: Upstream) -> tuple[Flight, bool]:
        """The flight this request waits on (joined) and whether it joined one already running.

        The caller must ``leave()`` the flight when its response is finished or abandoned.
        """
        if key is not None:
            flight = self._flights.get(key)
            if flight is not None and flight.waiters < self.max_waiters:
                flight.join()
                self.coalesced += 1
                return flight, True
            if flight is not None or len(self._flights) >= self.max_flights:
                key = None   # over a bound: a backend request of its own
        flight = Flight(upstream, key, self._done)
        if key is not None:
            self._flights[key] = flight
        flight.join()
        flight.start()
        return flight, False

    def _done(self, flight: Flight) -> None:
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
