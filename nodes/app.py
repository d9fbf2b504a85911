"""The edge node: an aiohttp application answering OpenAI requests from its tiers.

Request path: validate → scope and key → memory tier → disk tier → decide → replay a hit,
or join (or start) the one in-flight fill for the key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from edgecache.bus.base import BusError, edge_id
from edgecache.bus.embedded import HttpSubscription
from edgecache.bus.nats import NatsSubscription
from edgecache.config import NodeConfig
from edgecache.entry import Entry
from edgecache.errors import (
    BadRequest,
    EdgeCacheError,
    EdgeOverloaded,
    NotCached,
    UnknownPrefix,
    UpstreamUnavailable,
)
from edgecache.keys import Scope, cache_key
from edgecache.policy import (
    Bypass,
    CacheControl,
    Hit,
    Miss,
    Stale,
    decide,
    parse_cache_control,
    parse_ttl,
)
from edgecache.prefix import prefix_reference, prefix_tag
from edgecache.semantic import SemanticQuery, semantic_query
from edgecache.stores.disk import DiskTier
from edgecache.stores.memory import MemoryTier
from edgecache.tags import format_cache_tag_header, parse_cache_tag_header
from edgecache.trace import Span
from nodes.appkeys import CACHE_STATUS, CONFIG, ENDPOINTS, JSON, NODE, READY, SPAN, TENANT, WORKER
from nodes.events import EventFollower
from nodes.fill import Fill, FillRequest, check_not_refused
from nodes.metrics import NodeMetrics, SharedCounts
from nodes.middleware import error_middleware
from nodes.prefixes import PrefixInfo, PrefixReplica
from nodes.replay import PrefixMoved, answer_from_fill, replay
from nodes.semantic import open_semantic_tier
from nodes.state import NodeState

__all__ = ["NODE", "create_app"]

log = logging.getLogger("edgecache.node")





# -- the completion endpoints ------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    """A completion request as the hit path sees it."""

    endpoint: str
    tenant: str
    raw: bytes
    body: dict[str, Any] | None      # parsed lazily: a memoised repeat needs only the key
    key: bytes
    stream: bool
    include_usage: bool
    prefix: PrefixInfo | None
    cc: CacheControl
    ttl: float
    tags: frozenset[str]

    @property
    def scope(self) -> Scope:
        return _scope(self.tenant, self.prefix)

    def parsed(self) -> dict[str, Any]:
        if self.body is None:
            self.body = _parse(self.raw)
        return self.body


def _scope(tenant: str, prefix: PrefixInfo | None) -> Scope:
    return Scope(tenant) if prefix is None else Scope(tenant, prefix.id, prefix.version)


async def _read_request(request: web.Request, state: NodeState) -> _Request:
    endpoint = ENDPOINTS[request.path]
    tenant = request[TENANT] = state.tenant_for(request.headers.get("Authorization"),
                                                request.headers.get("api-key"))
    raw = await request.read()
    memo_key = (endpoint, tenant, raw)
    memo = state.memo.get(memo_key)
    body = None
    if memo is None:   # (the memo is cleared whenever a prefix version changes)
        body = _parse(raw)
        prefix = None
        prefix_id = prefix_reference(body, endpoint) if isinstance(body, dict) else None
        if prefix_id is not None:
            prefix = await state.prefixes.lookup(prefix_id)
            if prefix is None:
                raise UnknownPrefix(f"Unknown prefix {prefix_id!r}", param="prefix")
        key = cache_key(endpoint, body, _scope(tenant, prefix)).digest    # validates the request's shape
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        memo = (key, stream, include_usage, prefix)
        state.memo.put(memo_key, memo)
    headers = request.headers
    config = state.config
    tags = parse_cache_tag_header(headers.get("Cache-Tag", ""))
    prefix = memo[3]
    if prefix is not None:
        tags = tags | prefix.tags | {prefix_tag(prefix.id)}
        state.metrics.prefix_bytes_saved += prefix.bytes
    return _Request(endpoint, tenant, raw, body, *memo,
                    cc=parse_cache_control(headers.get("Cache-Control")),
                    ttl=parse_ttl(headers.get("X-EdgeCache-TTL"), config.default_ttl_s, config.max_ttl_s),
                    tags=tags)


async def _completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await _complete(request, started, retry_prefix=True)
    except PrefixMoved:
        # The prefix changed at the origin before this edge heard of it: catch up, and ask again
        # keyed with the current version (once; a second mismatch is passed to the client).
        try:
            await request.app[NODE].prefixes.refresh()
        except (EdgeCacheError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            log.warning("prefix registry refresh failed: %s", exc)
        return await _complete(request, started, retry_prefix=False)


async def _complete(request: web.Request, started: float, *, retry_prefix: bool) -> web.StreamResponse:
    state = request.app[NODE]
    req = await _read_request(request, state)
    region = state.config.region
    now = time.time()
    found, tier = await _exact_lookup(state, req, now)

    detail = ""
    match decide(req.cc, found, now):
        case Hit(entry) if entry.tags and state.fenced():
            fwd, result, detail = "miss", "miss", "; detail=fenced"   # tagged answers wait for the stream
        case Hit(entry) if not req.tags <= entry.tags:
            # The request names a dependency the stored answer does not carry: a purge of it would
            # miss that answer. Fetch anew, and store the answer with both sets of tags.
            fwd, result = "vary-miss", "miss"
            req.tags = req.tags | entry.tags
        case Hit(entry):
            status = (f'edgecache-{region}; hit; detail={tier}; ttl={int(entry.expires_at() - now)}; '
                      f'key="{req.key.hex()}"')
            state.metrics.observe(req.endpoint, "hit", time.perf_counter() - started)
            return replay(entry, req.stream, req.include_usage, status, now)
        case Stale():
            fwd, result = "stale", "stale"
        case Bypass():
            fwd, result = "request", "bypass"
        case Miss():
            fwd, result = "miss", "miss"

    query = vector = None
    if fwd == "miss" and state.semantic is not None and state.semantic.serves(req.tenant) \
            and request.headers.get("X-EdgeCache-Semantic", "").lower() != "off":
        query = semantic_query(req.endpoint, req.parsed(), req.scope,
                               max_chars=state.config.semantic.max_query_chars)
        if query is not None:
            vector = await state.semantic.embed(query.text)
            semantic = None if vector is None else await state.semantic.lookup(
                query, vector, req.tenant, lambda k: _fetch(state, k, now), tags=req.tags)
            if semantic is not None:
                entry = semantic.entry
                status = (f'edgecache-{region}; hit; detail="semantic {semantic.cosine:.3f}"; '
                          f'ttl={int(entry.expires_at() - now)}; key="{entry.key.hex()}"')
                state.metrics.observe(req.endpoint, "semantic_hit", time.perf_counter() - started)
                return replay(entry, req.stream, req.include_usage, status, now)

    head, key = f"edgecache-{region}; fwd={fwd}", f'; key="{req.key.hex()}"'
    base = head + detail + key
    if req.cc.only_if_cached:
        request[CACHE_STATUS] = head + _detail(detail, "only-if-cached") + key
        state.metrics.observe(req.endpoint, "error", time.perf_counter() - started)
        raise NotCached("The answer is not cached and the request said only-if-cached")

    fill = state.inflight.get(req.key)
    if fill is not None:
        result = "collapsed"
        base += "; collapsed"
        fill.join(req.tags, req.ttl)
    else:
        if len(state.inflight) >= state.config.max_fills:
            request[CACHE_STATUS] = head + _detail(detail, "overloaded") + key
            state.metrics.observe(req.endpoint, "error", time.perf_counter() - started)
            raise EdgeOverloaded(f"this edge has {state.config.max_fills} origin requests in flight; retry shortly")
        fill = _start_fill(state, request.path, req, query, vector, request[SPAN])
        fill.join()
    request[CACHE_STATUS] = base
    counted = True
    try:
        return await answer_from_fill(request, fill, req.stream, req.include_usage, base,
                                      retry_prefix=retry_prefix)
    except PrefixMoved:
        counted = False   # the retry answers, and counts
        raise
    finally:
        fill.leave()
        if counted:
            state.metrics.observe(req.endpoint, result, time.perf_counter() - started)


def _detail(detail: str, more: str) -> str:
    """The ``; detail=…`` parameter with ``more`` added: RFC 9211 allows one, so they join with '+'."""
    return f"{detail}+{more}" if detail else f"; detail={more}"


async def _exact_lookup(state: NodeState, req: _Request, now: float) -> tuple[Entry | None, str]:
    """Memory, then disk (promoted to memory); nothing under ``no-cache``."""
    if req.cc.no_cache:
        return None, "memory"
    found = state.memory.get(req.key, now)
    tier = "memory"
    if found is None:
        found, tier = await _from_disk(state, req.key, now), "disk"
    if found is not None and found.tenant != req.tenant:   # defence in depth: the key already scopes it
        found = None
    return found, tier


async def _from_disk(state: NodeState, key: bytes, now: float) -> Entry | None:
    generation = state.memory.generation()   # a purge during the disk read wins over the promotion
    found = await asyncio.to_thread(state.disk.get, key, now)
    if found is not None and found.is_fresh(now):
        state.memory.put(found, since=generation)
    return found


async def _fetch(state: NodeState, key: bytes, now: float) -> Entry | None:
    """A fresh entry by key from either tier, for the semantic tier's neighbours."""
    found = state.memory.get(key, now) or await _from_disk(state, key, now)
    if found is None or not found.is_fresh(now) or (found.tags and state.fenced()):
        return None
    return found


def _start_fill(state: NodeState, path: str, req: _Request, query: SemanticQuery | None,
                vector: Any, span: Span) -> Fill:
    config = state.config
    storer = _Storer(state, vector)
    headers = {"Authorization": f"Bearer {config.node_token}", "Content-Type": JSON,
               "X-EdgeCache-Tenant": req.tenant, "X-EdgeCache-Region": config.region,
               "traceparent": span.traceparent, "X-Request-Id": span.request_id}
    if span.state:
        headers["tracestate"] = span.state
    if req.prefix is not None:
        headers["X-EdgeCache-Prefix-Version"] = req.prefix.version
    # The client wants its own answer (no-cache, no-store: the origin must not share one), or none
    # older than max-age (the origin's shield honours it).
    directives = [d for d, on in (("no-cache", req.cc.no_cache), ("no-store", req.cc.no_store)) if on]
    if req.cc.max_age is not None:
        directives.append(f"max-age={int(req.cc.max_age)}")
    if directives:
        headers["Cache-Control"] = ", ".join(directives)
    headers["X-EdgeCache-TTL"] = str(int(req.ttl))   # what the origin's shield keeps the answer for,
    if req.tags:                                     # and the tags it keeps with it
        headers["Cache-Tag"] = format_cache_tag_header(req.tags)
    fill = Fill(
        FillRequest(key=req.key, endpoint=req.endpoint, path=path, body=req.parsed(), stream=req.stream,
                    headers=headers,
                    prefix_id=req.prefix.id if req.prefix else None,
                    prefix_version=req.prefix.version if req.prefix else None,
                    store=not req.cc.no_store, ttl=req.ttl, tenant=req.tenant, tags=req.tags,
                    max_entry_bytes=config.max_entry_bytes,
                    semantic_scope=query.scope if query else None, query=query.text if query else None),
        state.session, config.origin_timeout_s, storer, prepare=storer.prepare, on_done=state.fill_done)
    state.inflight[req.key] = fill
    fill.start()
    return fill


class _Storer:
    """Stores a fill's answer unless a purge since the fill began touched its tags or key."""

    def __init__(self, state: NodeState, vector: Any = None) -> None:
        self.state = state
        self.vector = vector
        self.memory_since = state.memory.generation()
        self.disk_since = 0

    async def prepare(self) -> None:
        """Runs before the origin request leaves: anything purged after this wins."""
        self.disk_since = await asyncio.to_thread(self.state.disk.generation)

    def __call__(self, entry: Entry) -> None:
        """In memory at once; on disk and in the semantic index in the background."""
        state = self.state
        if not state.memory.put(entry, since=self.memory_since):
            return   # purged while it was being fetched
        state.background(asyncio.to_thread(state.disk.put, entry, since=self.disk_since))
        if state.semantic is not None and entry.semantic_scope is not None:
            state.background(state.semantic.remember(entry, self.vector))


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None


# -- the other endpoints -----------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[NODE]
    # with [[tenants]]: a known key, as for completions
    state.tenant_for(request.headers.get("Authorization"), request.headers.get("api-key"))
    try:
        async with state.session.get("/v1/models", headers={"Authorization": f"Bearer {state.config.node_token}",
                                                            **request[SPAN].response_headers()},
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
            check_not_refused(resp.status)
            return web.Response(status=resp.status, body=await resp.read(), content_type=JSON)
    except (aiohttp.ClientError, TimeoutError):
        raise UpstreamUnavailable("the origin is unreachable") from None


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[NODE]
    state.disk_stats = await asyncio.to_thread(lambda: (len(state.disk), state.disk.bytes))
    starting = not request.app[READY]()
    return web.json_response(status=503 if starting else 200, data={
        "status": "starting" if starting else "ok",
        "region": state.config.region,
        "tiers": {"memory": {"entries": len(state.memory), "bytes": state.memory.bytes},
                  "disk": {"entries": state.disk_stats[0], "bytes": state.disk_stats[1]}},
        "inflight": len(state.inflight),
        "waiters": sum(f.waiters for f in state.inflight.values()),
        "semantic": state.semantic.health() if state.semantic else {"status": state.semantic_status},
        "invalidation": {"bus": state.config.bus.kind,
                         "applied_seq": state.events.applied if state.events else 0,
                         "connected": bool(state.events and state.events.connected),
                         "fenced": state.fenced()},
    })


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[NODE]
    state.disk_stats = await asyncio.to_thread(lambda: (len(state.disk), state.disk.bytes))
    counts = state.metrics.counts()
    if state.shared_counts is not None:   # several workers on the port: answer for all of them
        counts = await asyncio.to_thread(state.shared_counts.exchange, counts)
    resp = web.Response(body=state.metrics.exposition(counts))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


# -- the application ---------------------------------------------------------------------


async def _node_state(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    disk = await asyncio.to_thread(DiskTier, config.data_dir, config.disk_bytes)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=config.origin_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    session = aiohttp.ClientSession(base_url=config.origin_url, timeout=timeout, connector=connector)
    keys = {k: t.name for t in config.tenants for k in t.api_keys}
    metrics = NodeMetrics(config.region, lambda tier: app[NODE].tier_stats(tier))
    state = NodeState(config=config, memory=MemoryTier(config.memory_bytes), disk=disk, session=session,
                      metrics=metrics, keys=keys)
    app[NODE] = state
    state.prefixes = PrefixReplica(session, config.node_token, on_change=state.memo.clear)
    state.semantic, state.semantic_status = await open_semantic_tier(
        config.semantic, config.data_dir, lambda: _held_by(state), worker=app[WORKER], tenants=config.tenants,
        held=lambda: len(state.memory) + len(disk))
    me = edge_id(config.region, config.instance or socket.gethostname(), app[WORKER])
    incarnation = secrets.token_hex(8)
    over_http = HttpSubscription(session, config.node_token, me, config.max_staleness_s, incarnation)
    subscription = (over_http if config.bus.kind == "embedded"
                    else NatsSubscription(config.bus, config.node_token, me, config.max_staleness_s, repair=over_http,
                                          incarnation=incarnation))
    state.events = EventFollower(subscription, config.data_dir, state.apply_event, state.purge_all,
                                 max_staleness_s=config.max_staleness_s, heartbeat_s=config.bus.heartbeat_s)
    await state.events.start()
    try:   # catch up before serving, when the origin can be reached
        while await state.events.poll_once(0):
            pass
    except (BusError, ValueError, KeyError) as exc:
        log.warning("could not catch up with the invalidation log at start: %s", exc)
    tasks = [asyncio.create_task(_sweep(state)),
             asyncio.create_task(state.prefixes.follow(config.prefix_refresh_s)),
             asyncio.create_task(state.events.follow())]
    if state.semantic is not None:
        tasks.append(asyncio.create_task(state.semantic.save_periodically()))
    if config.workers > 1:
        state.shared_counts = SharedCounts(os.path.join(config.data_dir, "metrics"), app[WORKER], config.workers)
        await asyncio.to_thread(state.shared_counts.publish, metrics.counts())
        tasks.append(asyncio.create_task(_publish_counts(state, state.shared_counts)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for fill in list(state.inflight.values()):
            fill.leave()
        if state.writes:
            await asyncio.gather(*state.writes, return_exceptions=True)
        if state.semantic is not None:
            await state.semantic.close()
        await subscription.leave()   # no longer serving: a purge need not wait for this node
        await subscription.close()
        await session.close()
        await asyncio.to_thread(disk.close)


async def _publish_counts(state: NodeState, shared: SharedCounts, every_s: float = 1.0) -> None:
    """Keep this worker's file in the node's metrics folder current (when its counts change)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(shared.publish, state.metrics.counts())
        except OSError:
            log.exception("could not publish this worker's metrics")


def _held_by(state: NodeState) -> Callable[[bytes], bool]:
    """Whether a key is held by either tier (the disk's keys read now: blocking)."""
    on_disk = state.disk.keys()
    return lambda key: key in on_disk or key in state.memory


async def _sweep(state: NodeState, every_s: float = 60.0) -> None:
    """Drop expired entries, and tag-index rows of entries the disk tier culled."""
    while True:
        await asyncio.sleep(every_s)
        now = time.time()
        state.memory.expire(now)
        try:
            await asyncio.to_thread(state.disk.expire, now)
            await asyncio.to_thread(state.disk.prune_orphans)
        except Exception:
            log.exception("disk tier sweep failed")


def create_app(config: NodeConfig, *, ready: Callable[[], bool] | None = None, worker: int = 0) -> web.Application:
    """The edge node. ``ready``: False while sibling worker processes are still starting;
    ``worker``: this process's number among them (0 when alone)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])
    app[CONFIG] = config
    app[WORKER] = worker
    app[READY] = ready or (lambda: True)
    app.cleanup_ctx.append(_node_state)
    app.router.add_post("/v1/chat/completions", _completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
