"""Invalidation at the origin: the admin purge API and the event stream edges follow.

    POST /v1/purge[?wait=true[&timeout=S]]   (admin token)
         {"tags": [...]} | {"keys": [...]} | {"prefix_ids": [...]} | {"all": true}, optional "soft": true;
         an Idempotency-Key header makes retries safe. Answer: {"seq": N, "new": bool, "event": {...}};
         with wait=true also "edges": [{"edge", "applied_seq", "state"}] once every edge has applied
         the event or fenced itself (200), or when the timeout passes first (202, "complete": false).
    GET  /v1/events?after=N&timeout=S[&edge=ID&max_staleness_s=T]   (node token)
         events after N, waiting up to S seconds for one; the edge's report rides along.
    POST /v1/events/leave  {"edge": ID}   (node token)  a node shutting down: no longer waited for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from edgecache.bus.base import Report
from edgecache.errors import BadRequest
from edgecache.events import Event
from edgecache.prefix import prefix_tag, validate_prefix_id
from edgecache.tags import MAX_TAGS, validate_tag
from origin.edges import EdgeRegistry
from origin.eventlog import EventLog

__all__ = ["EVENTS", "EventFeed", "acknowledge", "add_purge_routes", "event_json", "wait_param"]

MAX_KEYS = 1000
MAX_WAIT_S = 30.0
MAX_ACK_WAIT_S = 120.0
TRIM_EVERY = 1000


class EventFeed:
    """The log, the edges that follow it, and a wake-up for long-polling readers and publishers."""

    def __init__(self, log: EventLog, *, edges: EdgeRegistry | None = None, wait_timeout_s: float = 10.0,
                 keep_events: int = 100_000) -> None:
        self.log = log
        self.edges = edges or EdgeRegistry()
        self.wait_timeout_s = wait_timeout_s
        self.keep_events = keep_events
        self.on_append: list[Callable[[], None]] = []   # e.g. the NATS announcer's wake-up
        # Awaited with each event before the log records it, so before any edge can read it and
        # before any acknowledgement: e.g. the origin shield's purge (``origin/shield.py``).
        self.before_append: list[Callable[[Event], Awaitable[None]]] = []
        self._changed = asyncio.Event()
        self._bounds: dict[str, int] | None = None

    async def append(self, event: Event) -> tuple[Event, bool]:
        """Record ``event`` (a redelivered one is answered with the original). The
        ``before_append`` hooks run first: applying an event twice is harmless, an edge reading
        it from the log before the hooks had applied it would not be."""
        for hook in self.before_append:
            await hook(event)
        stored, new = await asyncio.to_thread(self.log.append, event)
        if new:
            if stored.seq % TRIM_EVERY == 0:   # the log keeps the newest ``keep_events``
                await asyncio.to_thread(self.log.trim, self.keep_events)
            self._bounds = None
            self._changed.set()
            self._changed = asyncio.Event()
            for wake in self.on_append:
                wake()
        return stored, new

    async def bounds(self) -> dict[str, int]:
        """The log's first and last sequence numbers (cached until the next append)."""
        if self._bounds is None:
            first, last = await asyncio.to_thread(lambda: (self.log.first_seq, self.log.last_seq))
            self._bounds = {"first_seq": first, "last_seq": last}
        return self._bounds

    async def since_payloads(self, seq: int) -> list[tuple[int, bytes]]:
        """(seq, JSON) of the events after ``seq``: what the NATS announcer publishes."""
        return [(e.seq, orjson.dumps(event_json(e))) for e in await asyncio.to_thread(self.log.since, seq)]

    async def start(self) -> None:
        self.edges.restore(await asyncio.to_thread(self.log.known_edges))

    async def note(self, report: Report) -> None:
        """An edge's report; a new member is remembered before the fetch is answered."""
        if self.edges.report(report):
            await asyncio.to_thread(self.log.remember_edges, self.edges.members())

    async def ping(self, report: Report) -> dict[str, int]:
        """An edge's heartbeat over NATS: note its report, answer with the log's bounds."""
        await self.note(report)
        return await self.bounds()

    def release(self) -> None:
        """Answer every held long-poll now (the origin is shutting down)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """Set at the next append: take it before reading, so an append in between is not missed."""
        return self._changed

    @staticmethod
    async def wait(changed: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(changed.wait(), seconds)
        except TimeoutError:
            pass


EVENTS = web.AppKey("events", EventFeed)


def event_json(event: Event) -> dict[str, Any]:
    return {"seq": event.seq, "created": event.created, "source_id": event.source_id,
            "tags": sorted(event.tags), "keys": sorted(k.hex() for k in event.keys),
            "prefixes": [{"id": p.id, "version": p.version, "tags": sorted(p.tags), "bytes": p.bytes}
                         for p in event.prefixes],
            "all": event.purge_all, "soft": event.soft}


def wait_param(request: web.Request) -> float | None:
    """Seconds to wait for the edges (``?wait=true[&timeout=S]``), or None: read before anything
    is recorded, so a bad parameter changes nothing."""
    wait = request.query.get("wait", "false")
    if wait not in ("true", "false", "1", "0"):
        raise BadRequest("'wait' must be true or false", param="wait")
    if wait in ("false", "0"):
        return None
    try:
        timeout = float(request.query.get("timeout", request.app[EVENTS].wait_timeout_s))
    except ValueError:
        raise BadRequest("'timeout' must be seconds", param="timeout") from None
    if not 0 <= timeout <= MAX_ACK_WAIT_S:
        raise BadRequest(f"'timeout' must be between 0 and {MAX_ACK_WAIT_S:g} seconds", param="timeout")
    return timeout


async def acknowledge(request: web.Request, event: Event, *, new: bool, wait: float | None) -> web.Response:
    """The answer to an accepted (or redelivered) change: its sequence number, and when asked
    to ``wait``, what every edge has made of it (200 once all are safe, else 202)."""
    body: dict[str, Any] = {"seq": event.seq, "new": new, "event": event_json(event)}
    status = 200
    if wait is not None:
        complete, edges = await request.app[EVENTS].edges.wait(event.seq, wait)
        body.update(complete=complete, edges=edges)
        status = 200 if complete else 202
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _purge_event(body: object, source_id: str, now: float) -> Event:
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    kinds = [k for k in ("tags", "keys", "prefix_ids", "all") if k in body]
    unknown = set(body) - {"tags", "keys", "prefix_ids", "all", "soft"}
    if unknown:
        raise BadRequest(f"Unknown field(s) {sorted(unknown)}", param=min(unknown))
    if len(kinds) != 1:
        raise BadRequest("Give exactly one of 'tags', 'keys', 'prefix_ids' or 'all'")
    soft = body.get("soft", False)
    if not isinstance(soft, bool):
        raise BadRequest("'soft' must be true or false", param="soft")
    kind, value = kinds[0], body[kinds[0]]
    if kind == "all":
        if value is not True:
            raise BadRequest("'all' must be true", param="all")
        return Event(seq=0, created=now, source_id=source_id, purge_all=True, soft=soft)
    if not isinstance(value, list) or not value or len(value) > (MAX_KEYS if kind == "keys" else MAX_TAGS):
        raise BadRequest(f"'{kind}' must be a non-empty list of at most "
                         f"{MAX_KEYS if kind == 'keys' else MAX_TAGS} items", param=kind)
    if kind == "tags":
        return Event(seq=0, created=now, source_id=source_id, tags=frozenset(validate_tag(t) for t in value),
                     soft=soft)
    if kind == "prefix_ids":
        return Event(seq=0, created=now, source_id=source_id, soft=soft,
                     tags=frozenset(prefix_tag(validate_prefix_id(p, param="prefix_ids")) for p in value))
    if not all(isinstance(k, str) for k in value):
        raise BadRequest("'keys' must be cache keys of 32 hex digits (see Cache-Status)", param="keys")
    try:
        keys = frozenset(bytes.fromhex(k) for k in value if len(k) == 32)
    except ValueError:
        keys = frozenset()
    if len(keys) != len(set(value)):
        raise BadRequest("'keys' must be cache keys of 32 hex digits (see Cache-Status)", param="keys")
    return Event(seq=0, created=now, source_id=source_id, keys=keys, soft=soft)


async def _purge(request: web.Request) -> web.Response:
    wait = wait_param(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    key = request.headers.get("Idempotency-Key")
    source_id = f"purge:{key}" if key else f"purge-{uuid.uuid4().hex}"   # never a webhook's id
    if key and len(key) > 200:
        raise BadRequest("Idempotency-Key is longer than 200 characters", param="Idempotency-Key")
    if not source_id.isascii():
        try:
            source_id.encode()
        except UnicodeEncodeError:   # bytes that are not UTF-8 (kept as surrogates by aiohttp)
            raise BadRequest("Idempotency-Key must be UTF-8 text", param="Idempotency-Key") from None
    event = _purge_event(body, source_id, time.time())
    stored, new = await request.app[EVENTS].append(event)
    return await acknowledge(request, stored, new=new, wait=wait)


async def _events(request: web.Request) -> web.Response:
    feed = request.app[EVENTS]
    try:
        after = int(request.query.get("after", "0"))
        timeout = min(float(request.query.get("timeout", "0")), MAX_WAIT_S)
        if not (0 <= after < 2**63 and timeout >= 0):   # SQLite's integers; NaN fails too
            raise ValueError
    except ValueError:
        raise BadRequest("'after' must be a sequence number and 'timeout' seconds") from None
    if "edge" in request.query:
        try:
            report = Report.from_json({"edge": request.query["edge"], "applied": after,
                                       "max_staleness_s": float(request.query.get("max_staleness_s", "")),
                                       "incarnation": request.query.get("incarnation", "")})
        except ValueError as exc:
            raise BadRequest(f"Bad edge report: {exc}", param="edge") from None
        await feed.note(report)
    changed = feed.changed()
    events = await asyncio.to_thread(feed.log.since, after)
    if not events and timeout > 0:
        await feed.wait(changed, timeout)
        events = await asyncio.to_thread(feed.log.since, after)
    return web.Response(body=orjson.dumps({"events": [event_json(e) for e in events], **await feed.bounds()}),
                        content_type="application/json")


async def _release_polls(app: web.Application) -> None:
    if EVENTS in app:
        app[EVENTS].release()


async def _leave(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
        edge, incarnation = body["edge"], body.get("incarnation", "")
        if not isinstance(edge, str) or not 0 < len(edge) <= 200 or not isinstance(incarnation, str) \
                or len(incarnation) > 64:
            raise ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BadRequest("The body must be {\"edge\": \"<region>/<instance>/<worker>\"}", param="edge") from None
    feed = request.app[EVENTS]
    if feed.edges.leave(edge, incarnation):
        await asyncio.to_thread(feed.log.remember_edges, feed.edges.members())
    return web.json_response({"edge": edge, "left": True})


def add_purge_routes(app: web.Application) -> None:
    app.on_shutdown.append(_release_polls)
    app.router.add_post("/v1/events/leave", _leave)
    app.router.add_post("/v1/purge", _purge)
    app.router.add_get("/v1/events", _events)
