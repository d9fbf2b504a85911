"""The edge node's middleware: OpenAI-style errors (saying what the cache did), the request's
trace span and request id, and one access-log line per request."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from edgecache.errors import (
    EdgeCacheError,
    EdgeOverloaded,
    error_body,
    http_error_body,
    unreadable_body,
)
from edgecache.logs import ACCESS_LOGGER, CURRENT, access_message
from edgecache.trace import Span, start_span
from nodes.appkeys import CACHE_STATUS, CONFIG, ENDPOINTS, JSON, SPAN, TENANT

__all__ = ["error_middleware"]

log = logging.getLogger("edgecache.node")
access_log = logging.getLogger(ACCESS_LOGGER)


def _error_response(request: web.Request, status: int, body: bytes) -> web.Response:
    """An OpenAI-style error; on the completion endpoints it says what the cache did, too."""
    resp = web.Response(status=status, body=body, content_type=JSON)
    if request.path in ENDPOINTS:
        resp.headers["Cache-Status"] = request.get(CACHE_STATUS) or (
            f"edgecache-{request.app[CONFIG].region}; fwd=bypass; detail=rejected")
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors as OpenAI-style bodies; the request's trace span, request id and access-log line."""
    started = time.perf_counter()
    headers = request.headers
    span = request[SPAN] = start_span(headers.get("traceparent"), headers.get("tracestate"),
                                      headers.get("X-Request-Id"))
    token = CURRENT.set(span)
    try:
        try:
            resp = await handler(request)
        except EdgeCacheError as exc:
            resp = _error_response(request, exc.status, exc.body())
            if isinstance(exc, EdgeOverloaded):
                resp.headers["Retry-After"] = str(exc.retry_after_s)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _error_response(request, exc.status, http_error_body(exc.status, exc.reason))
            if "Allow" in exc.headers:   # a 405 says which methods the path takes
                resp.headers["Allow"] = exc.headers["Allow"]
        except web.RequestPayloadError as exc:   # reading the body: gzip that is not, a bad chunk
            resp = _error_response(request, 400, unreadable_body(exc))
        except Exception:
            log.exception("unhandled error on %s", request.path)
            resp = _error_response(request, 500, error_body("internal error in the edge node", "server_error"))
        if not resp.prepared:   # a stream sent its own (Span.response_headers)
            resp.headers.update(span.response_headers())
        if access_log.isEnabledFor(logging.INFO):   # else skipped entirely (the hit path is benchmarked)
            _log_access(request, resp, span, started)
        return resp
    finally:
        CURRENT.reset(token)


def _cache_result(cache_status: str | None) -> str | None:
    """What the cache did, from the ``Cache-Status`` header (the values of the metrics' label)."""
    if not cache_status:
        return None
    if "; hit;" in cache_status:
        return "semantic_hit" if 'detail="semantic' in cache_status else "hit"
    if "only-if-cached" in cache_status or "overloaded" in cache_status:   # the metric's "error"
        return "error"
    for fwd, result in (("fwd=request", "bypass"), ("fwd=stale", "stale"), ("fwd=bypass", "rejected")):
        if fwd in cache_status:
            return result
    return "collapsed" if "; collapsed" in cache_status else "miss"


def _log_access(request: web.Request, resp: web.StreamResponse, span: Span, started: float) -> None:
    """One line per request: completions at INFO, everything else (health, metrics) at DEBUG."""
    completion = request.path in ENDPOINTS
    level = logging.INFO if completion else logging.DEBUG
    fields = {"request_id": span.request_id, "trace_id": span.trace_id, "span_id": span.span_id,
              "parent_id": span.parent_id, "region": request.app[CONFIG].region,
              "method": request.method, "path": request.path, "status": resp.status,
              "duration_ms": round((time.perf_counter() - started) * 1000, 3),
              "cache": _cache_result(resp.headers.get("Cache-Status")) if completion else None,
              "tenant": request.get(TENANT), "bytes_in": request.content_length or 0,
              "bytes_out": resp.body_length if resp.prepared else (resp.content_length or 0)}
    access_log.log(level, access_message(fields), extra={"fields": fields})
