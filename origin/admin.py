"""The origin's prefix registry API (admin token to change, admin or node token to read).

    POST   /v1/prefixes        {"id", "text", "tags"}  create or update; 201 created, 200 updated
    GET    /v1/prefixes        every prefix's id, version, tags and size (?text=1 adds the texts)
    GET    /v1/prefixes/{id}   one prefix with its text
    DELETE /v1/prefixes/{id}
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from edgecache.errors import BadRequest, Forbidden, NotFound
from edgecache.events import Event, PrefixChange
from edgecache.prefix import Prefix, make_prefix, prefix_tag, validate_prefix_id
from origin.prefixes import PrefixRegistry
from origin.purge import EVENTS

__all__ = ["MAX_PREFIX_BYTES", "REGISTRY", "WARMER", "add_prefix_routes"]

log = logging.getLogger("edgecache.origin")

REGISTRY = web.AppKey("registry", PrefixRegistry)
MAX_PREFIX_BYTES = web.AppKey("max_prefix_bytes", int)
# Whether the caller may read prefix texts: the admin token may; edges (the node token) read
# ids, versions, tags and sizes only, all they need to key requests.
READS_TEXT = web.RequestKey("reads_text", bool)
WARMER = web.AppKey("warmer", Callable[[Prefix], Awaitable[list[str]]])


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _full(prefix: Prefix) -> dict[str, Any]:
    return {**prefix.summary(), "text": prefix.text}


async def _put(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    prefix = make_prefix(body, max_bytes=request.app[MAX_PREFIX_BYTES], now=time.time())
    existed = registry.get(prefix.id) is not None
    changed = await asyncio.to_thread(registry.put, prefix)
    current = registry.get(prefix.id)
    assert current is not None
    if changed:   # edges learn the new version from the stream (old-version keys no longer match)
        await _announce(request, PrefixChange(current.id, current.version, current.tags,
                                              len(current.text.encode())))
    warmed: list[str] = []
    if changed and request.app.get(WARMER) is not None:
        warmed = await request.app[WARMER](current)
    return _json({**current.summary(), "changed": changed, "warmed": warmed}, status=200 if existed else 201)


async def _list(request: web.Request) -> web.Response:
    with_text = request.query.get("text") in ("1", "true")
    if with_text and not request.get(READS_TEXT, False):
        raise Forbidden("reading prefix texts needs the admin token", code="admin_token_required")
    prefixes = sorted(request.app[REGISTRY].current.values(), key=lambda p: p.id)
    return _json({"object": "list", "data": [_full(p) if with_text else p.summary() for p in prefixes]})


def _lookup(request: web.Request) -> Prefix:
    prefix_id = validate_prefix_id(request.match_info["id"])
    prefix = request.app[REGISTRY].get(prefix_id)
    if prefix is None:
        raise NotFound(f"Unknown prefix {prefix_id!r}", code="prefix_not_found")
    return prefix


async def _get(request: web.Request) -> web.Response:
    prefix = _lookup(request)
    return _json(_full(prefix) if request.get(READS_TEXT, False) else prefix.summary())


async def _delete(request: web.Request) -> web.Response:
    prefix = _lookup(request)
    await asyncio.to_thread(request.app[REGISTRY].delete, prefix.id)
    await _announce(request, PrefixChange(prefix.id, None))
    return _json({"id": prefix.id, "deleted": True})


async def _announce(request: web.Request, change: PrefixChange) -> None:
    feed = request.app.get(EVENTS)
    if feed is not None:
        # A deleted prefix's answers are purged to free their space; an updated prefix's old
        # answers need no purge: their keys carry the old version and can never match again.
        tags = frozenset({prefix_tag(change.id)}) if change.version is None else frozenset()
        await feed.append(Event(seq=0, created=time.time(), source_id=f"prefix-{uuid.uuid4().hex}",
                                tags=tags, prefixes=(change,)))


def add_prefix_routes(app: web.Application) -> None:
    app.router.add_post("/v1/prefixes", _put)
    app.router.add_get("/v1/prefixes", _list)
    app.router.add_get("/v1/prefixes/{id}", _get)
    app.router.add_delete("/v1/prefixes/{id}", _delete)
