"""Answering from the edge node's tiers: a stored entry replayed as JSON or SSE, or an in-flight
fill's answer — passed through when the origin refused, streamed live to every waiter, or
whole once complete."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from edgecache.entry import Entry
from edgecache.errors import error_body
from edgecache.stream import DONE, frame, synthesize_chunks, usage_chunk
from nodes.appkeys import JSON, NODE, SPAN, SSE
from nodes.fill import Fill

__all__ = ["PrefixMoved", "answer_from_fill", "fan_out", "frames", "replay"]


class PrefixMoved(Exception):
    """The origin holds a newer version of the request's prefix than this edge keyed it with."""


async def answer_from_fill(request: web.Request, fill: Fill, stream: bool, include_usage: bool,
                            base: str, *, retry_prefix: bool = False) -> web.StreamResponse:
    """The fill's answer for one waiter. ``retry_prefix``: raise ``PrefixMoved`` on the origin's
    ``prefix_version_mismatch`` (the caller refreshes its replica and asks again) instead of
    passing the 400 on."""
    reply = await fill.wait_started()
    if reply is not None:   # the origin's error, passed through, never stored
        if reply.status == 400 and b"prefix_version_mismatch" in reply.body:
            if retry_prefix:
                raise PrefixMoved
            request.app[NODE].background(request.app[NODE].prefixes.refresh())
        resp = web.Response(status=reply.status, body=reply.body)
        resp.headers["Content-Type"] = reply.content_type
        resp.headers["Cache-Status"] = base
        if reply.retry_after:
            resp.headers["Retry-After"] = reply.retry_after
        return resp
    headers = {}
    if fill.shield_hit:   # the origin answered from its shield: say so, and how old the answer is
        base = (base.replace("; detail=fenced", "; detail=fenced+shield-hit") if "; detail=" in base
                else base.replace("; key=", "; detail=shield-hit; key=", 1))
        headers["Age"] = str(fill.origin_age)
    if stream and fill.req.stream:
        return await fan_out(request, fill, include_usage, base, headers)
    await fill.wait()
    if fill.failure is not None:
        raise fill.failure
    assert fill.body is not None
    headers["Cache-Status"] = base + ("; stored" if fill.entry is not None else "")
    if not stream:
        return web.Response(body=fill.body, content_type=JSON, headers=headers)
    return web.Response(body=frames(fill.req.endpoint, fill.body, None, include_usage), content_type=SSE,
                        headers=headers)


async def fan_out(request: web.Request, fill: Fill, include_usage: bool, base: str,
                   headers: dict[str, str]) -> web.StreamResponse:
    """Stream the fill's chunks to this client as they arrive."""
    resp = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache",
                                       "Cache-Status": base + ("; stored" if fill.req.store else ""),
                                       **headers, **request[SPAN].response_headers()})
    await resp.prepare(request)
    try:
        async for payload, plain, usage_only in fill.live_chunks():
            if include_usage:
                await resp.write(frame(payload))
            elif not usage_only:
                await resp.write(frame(plain))
        if fill.failure is not None:
            failure = fill.failure
            await resp.write(frame(error_body(failure.message, failure.type, failure.code)))
        else:
            await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        pass   # the client left; ``leave`` cancels the fill if it was the last waiter
    return resp


def replay(entry: Entry, stream: bool, include_usage: bool, cache_status: str, now: float) -> web.Response:
    headers = {"Cache-Status": cache_status, "Age": str(int(entry.age(now)))}
    if not stream:
        return web.Response(body=entry.body, content_type=JSON, headers=headers)
    return web.Response(body=frames(entry.endpoint, entry.body, entry.chunks, include_usage),
                        content_type=SSE, headers=headers)


def frames(endpoint: str, body: bytes, chunks: tuple[bytes, ...] | None, include_usage: bool) -> bytes:
    parsed: dict[str, Any] | None = None
    if chunks is None:
        parsed = orjson.loads(body)
        chunks = tuple(orjson.dumps(c) for c in synthesize_chunks(endpoint, parsed))
    out = [frame(c) for c in chunks]
    if include_usage:
        parsed = parsed or orjson.loads(body)
        if parsed.get("usage") is not None:
            out.append(frame(usage_chunk(endpoint, parsed, parsed["usage"])))
    out.append(DONE)
    return b"".join(out)
