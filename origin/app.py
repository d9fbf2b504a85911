"""The origin service: authenticates edge nodes and forwards their misses to a backend.

Identical misses in flight share one backend request (``origin/coalesce.py``); a backend holds
a bounded number of requests and the origin answers 429 when all are full (``origin/backends.py``).
The origin shield (``origin/shield.py``) answers a miss another edge already caused, and keeps
every complete answer a backend sends, once per backend request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgecache.bus.nats import NatsAnnouncer
from edgecache.config import Config
from edgecache.errors import (
    BadRequest,
    EdgeCacheError,
    Unauthorized,
    UpstreamUnavailable,
    http_error_body,
    unreadable_body,
)
from edgecache.events import Event
from edgecache.logs import ACCESS_LOGGER, CURRENT, access_message
from edgecache.prefix import Prefix, expand, prefix_reference, route_text
from edgecache.trace import Span, start_span
from origin.admin import MAX_PREFIX_BYTES, READS_TEXT, REGISTRY, WARMER, add_prefix_routes
from origin.backends import BackendPool, OriginOverloaded
from origin.coalesce import Flight, Flights, Head, flight_key
from origin.eventlog import EventLog
from origin.hooks import WEBHOOK_SECRET, add_hook_routes
from origin.prefixes import PrefixRegistry
from origin.purge import EVENTS, EventFeed, add_purge_routes
from origin.shield import Pending, Shield, ShieldCollector, ShieldRequest, replay, shield_request

__all__ = ["ORIGIN", "OriginState", "create_origin_app"]

log = logging.getLogger("edgecache.origin")
access_log = logging.getLogger(ACCESS_LOGGER)

_PUBLIC = frozenset({"/health", "/healthz", "/metrics"})
_EDGE_CALLS = frozenset({"/v1/events/leave", "/v1/chat/completions", "/v1/completions"})   # not admin changes
_FORWARDED = ("Content-Type", "Accept")   # and traceparent (our span), tracestate, X-Request-Id


class OriginState:
    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.pool = BackendPool(config.all_backends(), config.origin, session)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgecache_origin_requests", "Requests forwarded, by backend and status",
                                ["backend", "status"], registry=self.registry)
        self.failures = Counter("edgecache_origin_failures", "Requests no backend could take",
                                registry=self.registry)
        self.flights = Flights(max_waiters=config.origin.coalesce_max_waiters,
                               max_flights=config.origin.coalesce_max_flights)
        self.coalesced = Counter("edgecache_origin_coalesced", "Requests that joined an identical one in flight",
                                 registry=self.registry)
        self.registry.register(_BackendCollector(self.pool))
        self.shield: Shield | None = None
        self.pending: weakref.WeakKeyDictionary[Flight, Pending] = weakref.WeakKeyDictionary()
        if config.origin.shield:
            self.shield = Shield(config.origin.shield_bytes, config.origin.shield_max_entry_bytes)
            self.registry.register(ShieldCollector(self.shield))

    async def purge_shield(self, event: Event) -> None:
        """``EventFeed.before_append``: the shield forgets what ``event`` purges before the log has it."""
        if self.shield is not None:
            self.shield.apply(event)


class _BackendCollector(Collector):
    """Every backend's state from the pool's snapshot, read at scrape time."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        snapshot = self.pool.snapshot()
        gauges = {
            "healthy": GaugeMetricFamily("edgecache_origin_backend_healthy", "1 when the backend is usable",
                                         labels=["backend"]),
            "in_flight": GaugeMetricFamily("edgecache_origin_backend_in_flight", "Requests being answered",
                                           labels=["backend"]),
            "hit_rate": GaugeMetricFamily("edgecache_origin_backend_prefix_hit_rate",
                                          "Prefix-cache hit rate the backend reports (vllm: metrics)",
                                          labels=["backend"]),
        }
        routed = CounterMetricFamily("edgecache_origin_routed", "Requests sent to a backend, by routing reason",
                                     labels=["backend", "reason"])
        for b in snapshot:
            gauges["healthy"].add_metric([b["name"]], 1.0 if b["available"] else 0.0)
            gauges["in_flight"].add_metric([b["name"]], b["in_flight"])
            rate = (b["metrics"] or {}).get("prefix_hit_rate")
            if rate is not None:
                gauges["hit_rate"].add_metric([b["name"]], rate)
            for reason, count in b["routed"].items():
                routed.add_metric([b["name"], reason], count)
        yield from gauges.values()
        yield routed
        yield GaugeMetricFamily("edgecache_origin_queued", "Requests waiting for a backend slot",
                                value=self.pool.queued)
        yield CounterMetricFamily("edgecache_origin_overloaded", "Requests answered 429 origin_overloaded",
                                  value=self.pool.overloaded)


ORIGIN = web.AppKey("origin", OriginState)
CONFIG = web.AppKey("config", Config)
SPAN = web.RequestKey("span", Span)   # the origin's span of the request
BACKEND = web.RequestKey("backend", str)          # the backend that answered, for the access log


def _bearer_is(request: web.Request, token: str) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode())


def _authorize(request: web.Request) -> None:
    """Admin routes take the admin token (reads: the node token too); the rest the node token."""
    if request.path in _PUBLIC:
        return
    auth = request.app[CONFIG].auth
    if request.path == "/hooks/cms":
        return   # signed: the handler verifies the Standard Webhooks signature
    if request.path == "/v1/purge":
        if _bearer_is(request, auth.admin_token):
            return
        raise Unauthorized("purging needs the admin token", code="invalid_admin_token")
    if request.path.startswith("/v1/prefixes"):
        if _bearer_is(request, auth.admin_token):
            request[READS_TEXT] = True
            return
        if request.method == "GET" and _bearer_is(request, auth.node_token):
            return   # ids, versions, tags: never the texts
        raise Unauthorized("the prefix registry needs the admin token", code="invalid_admin_token")
    if not _bearer_is(request, auth.node_token):
        raise Unauthorized("edge nodes must present the node token", code="invalid_node_token")


@web.middleware
async def _origin_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Authorization, errors as OpenAI-style bodies, the trace span, request id and access log."""
    started = time.perf_counter()
    headers = request.headers
    span = request[SPAN] = start_span(headers.get("traceparent"), headers.get("tracestate"),
                                      headers.get("X-Request-Id"))
    token = CURRENT.set(span)
    try:
        try:
            _authorize(request)
            resp = await handler(request)
        except EdgeCacheError as exc:
            resp = web.Response(status=exc.status, body=exc.body(), content_type="application/json")
            if isinstance(exc, OriginOverloaded):
                resp.headers["Retry-After"] = str(exc.retry_after_s)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = web.Response(status=exc.status, body=http_error_body(exc.status, exc.reason),
                                content_type="application/json")
            if "Allow" in exc.headers:   # a 405 says which methods the path takes
                resp.headers["Allow"] = exc.headers["Allow"]
        except web.RequestPayloadError as exc:   # reading the body: gzip that is not, a bad chunk
            resp = web.Response(status=400, body=unreadable_body(exc), content_type="application/json")
        if not resp.prepared:   # a stream sent its own (Span.response_headers)
            resp.headers.update(span.response_headers())
        if access_log.isEnabledFor(logging.INFO):
            _log_access(request, resp, span, started)
        return resp
    finally:
        CURRENT.reset(token)


def _log_access(request: web.Request, resp: web.StreamResponse, span: Span, started: float) -> None:
    """One line per request: completions and changes (purges, webhooks, prefix writes: the audit
    trail) at INFO, reads (polls, health, metrics, prefix lists) at DEBUG."""
    forwarded = request.path in ("/v1/chat/completions", "/v1/completions")
    change = request.method in ("POST", "PUT", "PATCH", "DELETE") and request.path not in _EDGE_CALLS
    headers = request.headers
    fields = {"request_id": span.request_id, "trace_id": span.trace_id, "span_id": span.span_id,
              "parent_id": span.parent_id, "method": request.method, "path": request.path,
              "status": resp.status, "duration_ms": round((time.perf_counter() - started) * 1000, 3),
              "edge_region": headers.get("X-EdgeCache-Region"),
              "tenant": headers.get("X-EdgeCache-Tenant") if forwarded else None,
              "backend": request.get(BACKEND), "bytes_in": request.content_length or 0,
              "bytes_out": resp.body_length if resp.prepared else (resp.content_length or 0)}
    access_log.log(logging.INFO if forwarded or change else logging.DEBUG, access_message(fields),
                   extra={"fields": fields})


async def _forward(request: web.Request) -> web.StreamResponse:
    """Pass a completion request to a backend and its answer back, streaming as it comes;
    an identical request already in flight is joined instead (``origin/coalesce.py``)."""
    state = request.app[ORIGIN]
    raw = await request.read()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("The request body must be a JSON object")
    body, expanded, prefix, prefix_tags = raw, parsed, None, frozenset[str]()
    if "prefix" in parsed:   # edges send the reference, never the text
        current = request.app[REGISTRY].current
        expanded = expand(parsed, current, tenant=request.headers.get("X-EdgeCache-Tenant"),
                          version=request.headers.get("X-EdgeCache-Prefix-Version"))
        prefix_id = prefix_reference(parsed, "chat")
        if prefix_id is not None:   # else "prefix": null, no prefix: the field is dropped
            prefix = (prefix_id, current[prefix_id].version)   # the text expand just used
            prefix_tags = current[prefix_id].tags
        body = orjson.dumps(expanded)
    endpoint = "chat" if request.path == "/v1/chat/completions" else "completions"
    shielded = None
    if state.shield is not None:
        shielded = shield_request(endpoint, parsed, request.headers, prefix=prefix, prefix_tags=prefix_tags)
        hit = _shield_hit(request, state.shield, shielded)
        if hit is not None:
            return hit
    key = None
    if state.config.origin.coalesce:
        key = flight_key(endpoint, parsed, tenant=request.headers.get("X-EdgeCache-Tenant"), prefix=prefix,
                         cache_control=request.headers.get("Cache-Control"))
    headers = {k: request.headers[k] for k in _FORWARDED if k in request.headers}
    headers.update(request[SPAN].response_headers())
    if request[SPAN].state:
        headers["tracestate"] = request[SPAN].state
    pending = None
    if state.shield is not None and shielded is not None and shielded.store:
        pending = Pending(shielded, state.shield.generation())   # a purge from now on wins
    flight, joined = state.flights.join(key, partial(_upstream, state, request.path, body, headers,
                                                     route_text(expanded), pending))
    if joined:
        state.coalesced.inc()
        joined_pending = state.pending.get(flight)
        if joined_pending is not None:
            joined_pending.join(shielded)
    elif pending is not None:
        state.pending[flight] = pending
    shield_headers = {} if state.shield is None else _shield_status(shielded)
    try:
        head = await flight.wait_head()
        request[BACKEND] = head.backend
        if not head.streaming:
            resp = web.Response(status=head.status, body=await flight.body(), headers=shield_headers)
            resp.headers["Content-Type"] = head.content_type
            return resp
        resp = web.StreamResponse(status=head.status, headers={"Content-Type": head.content_type,
                                                               "Cache-Control": "no-cache", **shield_headers,
                                                               **request[SPAN].response_headers()})
        await resp.prepare(request)
        try:
            async for chunk in flight.live():
                await resp.write(chunk)
        except ConnectionResetError:
            return resp   # this client left; the flight goes on for the others
        if flight.failure is not None:
            # After the first byte nothing is retried: cut the client's stream so it is never stored.
            raise ConnectionAbortedError(flight.failure.message)   # aiohttp drops the connection
        await resp.write_eof()
        return resp
    finally:
        flight.leave()


def _shield_hit(request: web.Request, shield: Shield, shielded: ShieldRequest | None) -> web.Response | None:
    """The shield's answer, in the wire format the edge asked for, or None on a miss."""
    now = shield.clock()
    entry = shield.lookup(shielded, now)
    if entry is None:
        return None
    assert shielded is not None
    request[BACKEND] = "shield"
    content_type, body = replay(entry, shielded.stream, shielded.include_usage)
    return web.Response(body=body, headers={
        "Content-Type": content_type, "Age": str(int(entry.age(now))), "X-EdgeCache-Shield": "hit",
        "Cache-Status": f"edgecache-origin; hit; ttl={int(entry.expires_at() - now)}"})


def _shield_status(shielded: ShieldRequest | None) -> dict[str, str]:
    """The headers of an answer the shield did not give: looked up and missed, or bypassed."""
    if shielded is not None and shielded.lookup:
        return {"X-EdgeCache-Shield": "miss", "Cache-Status": "edgecache-origin; fwd=miss"}
    if shielded is not None and shielded.store:   # no-cache: fetched and kept
        return {"X-EdgeCache-Shield": "bypass", "Cache-Status": "edgecache-origin; fwd=request"}
    return {"X-EdgeCache-Shield": "bypass", "Cache-Status": "edgecache-origin; fwd=bypass"}


async def _upstream(state: OriginState, path: str, body: bytes, headers: dict[str, str], route: str,
                    pending: Pending | None, flight: Flight) -> None:
    """A flight's backend request: the head, then the body as it arrives, into ``flight``;
    a complete 200 answer goes to the shield (once per backend request, whoever waits for it)."""
    try:
        backend, upstream = await state.pool.open("POST", path, body, headers, route=route)
    except EdgeCacheError:
        state.failures.inc()
        raise
    state.requests.labels(backend.name, str(upstream.status)).inc()
    try:
        flight.begin(Head(upstream.status, upstream.headers.get("Content-Type", "application/json"), backend.name))
        async for chunk in upstream.content.iter_any():
            flight.feed(chunk)
        if pending is not None and state.shield is not None and upstream.status == 200:
            pending = state.pending.pop(flight, pending)   # with the tags of every waiter that joined
            _keep(state.shield, pending, upstream.headers.get("Content-Type", "application/json"), flight.chunks)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("backend %s failed mid-answer: %r", backend.name, exc)
        raise UpstreamUnavailable("a backend failed mid-answer") from None   # the log names it
    finally:
        upstream.release()
        state.pool.release(backend)


def _keep(shield: Shield, pending: Pending, content_type: str, chunks: list[bytes]) -> None:
    try:
        shield.store(pending.req, content_type, b"".join(chunks), since=pending.since)
    except Exception:   # a bug: the answer is not kept, the waiters still get it
        log.exception("origin shield: storing an answer failed")


async def _models(request: web.Request) -> web.Response:
    """The models of every backend that answers, without duplicates."""
    state = request.app[ORIGIN]
    seen: dict[str, Any] = {}
    for backend in state.pool.backends:
        try:
            resp = await state.pool.open_on(backend, "GET", "/v1/models", None, {})
            async with resp:
                for model in orjson.loads(await resp.read()).get("data", []):
                    seen.setdefault(model.get("id"), model)
        except (EdgeCacheError, ValueError, AttributeError):
            continue
    if not seen:
        raise UpstreamUnavailable("no backend answered /v1/models")
    return web.Response(body=orjson.dumps({"object": "list", "data": list(seen.values())}),
                        content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    state = request.app[ORIGIN]
    shield = {"enabled": False} if state.shield is None else {"enabled": True, **state.shield.health()}
    return web.Response(body=orjson.dumps({"status": "ok", "routing": state.config.origin.routing,
                                           "backends": state.pool.snapshot(), "shield": shield}),
                        content_type="application/json")


async def _warm(app: web.Application, prefix: Prefix) -> list[str]:
    """Prefill a new or changed prefix on the backend its requests will be routed to.

    A one-token completion of the prefix alone: the backend keeps its KV blocks, so the
    first real request with this prefix finds them cached. Failures are logged, never raised.
    """
    pool = app[ORIGIN].pool
    warmed = []
    for backend in pool.targets(prefix.text, n=1):
        try:
            async with asyncio.timeout(app[CONFIG].origin.first_byte_timeout_s):
                resp = await pool.open_on(backend, "GET", "/v1/models", None, {})
                async with resp:
                    models = orjson.loads(await resp.read()).get("data") or [{}]
                body = {"model": models[0].get("id", ""), "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "system", "content": prefix.text}]}
                resp = await pool.open_on(backend, "POST", "/v1/chat/completions", orjson.dumps(body),
                                          {"Content-Type": "application/json"}, route=prefix.text)
                async with resp:
                    await resp.read()
                    if resp.status == 200:
                        warmed.append(backend.name)
                    else:
                        log.warning("warming prefix %s on %s: status %d", prefix.id, backend.name, resp.status)
        except (EdgeCacheError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("warming prefix %s on %s failed: %r", prefix.id, backend.name, exc)
    return warmed


async def _metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(request.app[ORIGIN].registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _origin_state(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.origin.connect_timeout_s,
                                    sock_read=config.origin.read_timeout_s)
    registry = await asyncio.to_thread(PrefixRegistry, config.origin.data_dir or None)
    app[REGISTRY] = registry
    events_dir = os.path.join(config.origin.data_dir, "events") if config.origin.data_dir else None
    log_ = await asyncio.to_thread(EventLog, events_dir)
    feed = app[EVENTS] = EventFeed(log_, wait_timeout_s=config.bus.wait_timeout_s,
                                   keep_events=config.bus.keep_events)
    await feed.start()
    announcer = None
    if config.bus.kind == "nats":
        announcer = NatsAnnouncer(config.bus, config.auth.node_token, feed.since_payloads, feed.ping)
        feed.on_append.append(announcer.wake)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            state = app[ORIGIN] = OriginState(config, session)
            feed.before_append.append(state.purge_shield)
            await state.pool.start()
            try:
                if announcer is not None:
                    await announcer.start()
                yield
            finally:
                if announcer is not None:
                    await announcer.close()
                await state.pool.close()
    finally:
        await asyncio.to_thread(registry.close)
        await asyncio.to_thread(log_.close)


def create_origin_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.origin.max_body_bytes, middlewares=[_origin_middleware])
    app[CONFIG] = config
    app[MAX_PREFIX_BYTES] = config.origin.max_prefix_bytes
    if config.origin.warm_prefixes:
        app[WARMER] = lambda prefix: _warm(app, prefix)
    app.cleanup_ctx.append(_origin_state)
    add_prefix_routes(app)
    add_purge_routes(app)
    app[WEBHOOK_SECRET] = config.auth.webhook_secret
    add_hook_routes(app)
    app.router.add_post("/v1/chat/completions", _forward)
    app.router.add_post("/v1/completions", _forward)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/metrics", _metrics)
    return app
