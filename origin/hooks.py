"""``POST /hooks/cms``: signed CMS webhooks become one invalidation event each.

Order of checks, so that nothing changes unless everything is right: the Standard Webhooks
signature and timestamp (401); a redelivered ``webhook-id`` (acknowledged with the original
sequence number, applied nothing); the JSON and the payload (400); every prefix in it (400).
Only then are the prefixes written and the event appended.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from edgecache.cms import parse_cms_payload
from edgecache.errors import BadRequest
from edgecache.events import Event, PrefixChange
from edgecache.prefix import make_prefix, prefix_tag, validate_prefix_id
from edgecache.webhook import verify
from origin.admin import MAX_PREFIX_BYTES, REGISTRY, WARMER
from origin.purge import EVENTS, acknowledge, wait_param

__all__ = ["WEBHOOK_SECRET", "add_hook_routes"]

WEBHOOK_SECRET = web.AppKey("webhook_secret", str)


async def _cms(request: web.Request) -> web.Response:
    raw = await request.read()
    now = time.time()
    # The log's source ids are namespaced: a webhook id never meets a purge's Idempotency-Key.
    source_id = "webhook:" + verify(request.app[WEBHOOK_SECRET], request.headers, raw, now)
    wait = wait_param(request)
    feed = request.app[EVENTS]
    earlier = await asyncio.to_thread(feed.log.find, source_id)
    if earlier is not None:
        return await acknowledge(request, earlier, new=False, wait=wait)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The webhook body is not valid JSON: {exc}") from None
    change = parse_cms_payload(body, request.headers)
    registry = request.app[REGISTRY]
    updates, deletes = [], []
    for prefix_id, spec in change.prefixes.items():
        validate_prefix_id(prefix_id, param="prefixes")
        if spec is None:
            deletes.append(prefix_id)
        else:
            updates.append(make_prefix({"id": prefix_id, **spec}, max_bytes=request.app[MAX_PREFIX_BYTES], now=now))
    changes = []
    for prefix in updates:
        if await asyncio.to_thread(registry.put, prefix):
            changes.append(PrefixChange(prefix.id, prefix.version, prefix.tags, len(prefix.text.encode())))
    for prefix_id in deletes:
        if await asyncio.to_thread(registry.delete, prefix_id) is not None:
            changes.append(PrefixChange(prefix_id, None))
    tags = change.tags | {prefix_tag(c.id) for c in changes if c.version is None}   # see admin._announce
    stored, new = await feed.append(Event(seq=0, created=now, source_id=source_id, tags=tags, prefixes=tuple(changes),
                                          extra={"cms": change.source}))
    warm = request.app.get(WARMER)
    if warm is not None:
        for prefix in updates:
            current = registry.get(prefix.id)
            if current is not None and any(c.id == prefix.id and c.version for c in changes):
                await warm(current)
    return await acknowledge(request, stored, new=new, wait=wait)


def add_hook_routes(app: web.Application) -> None:
    app.router.add_post("/hooks/cms", _cms)
