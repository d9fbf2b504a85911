"""The errors edgecache raises, each one an OpenAI-style error body.

    EdgeCacheError                 500  server_error
    ├── BadRequest                 400  invalid_request_error
    │   └── UnknownPrefix          400  invalid_request_error / prefix_not_found
    ├── Unauthorized               401  authentication_error
    ├── Forbidden                  403  permission_error
    ├── NotFound                   404  not_found_error
    ├── PayloadTooLarge            413  invalid_request_error / payload_too_large
    ├── Overloaded                 429  rate_limit_error
    │   └── EdgeOverloaded         429  rate_limit_error / edge_overloaded (with Retry-After)
    ├── NotCached                  504  cache_miss / only_if_cached
    └── UpstreamError              502  upstream_error
        ├── UpstreamUnavailable    502  (connection refused, reset, DNS, every backend down)
        └── UpstreamTimeout        504  (also an ``asyncio.TimeoutError``)

Normal outcomes (a miss, an answer that may not be stored) are values, never exceptions.
"""

from __future__ import annotations

import orjson

__all__ = [
    "BadRequest",
    "ConfigError",
    "EdgeCacheError",
    "EdgeOverloaded",
    "Forbidden",
    "NotCached",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Unauthorized",
    "UnknownPrefix",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "http_error_body",
    "unreadable_body",
]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """Serialise an OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def http_error_body(status: int, reason: str) -> bytes:
    """The OpenAI-style body for an error aiohttp raised itself (404, 405, 413 ...)."""
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return error_body(reason, kind, "payload_too_large" if status == 413 else None)


def unreadable_body(exc: BaseException) -> bytes:
    """The 400 body for a request body aiohttp could not read (``RequestPayloadError``: gzip that
    is not, a bad chunk): its cause's ``message`` when it has one."""
    reason = getattr(exc.__cause__, "message", None) or "malformed body"
    return http_error_body(400, f"The request body cannot be read: {reason}")


class EdgeCacheError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(EdgeCacheError):
    status = 400
    type = "invalid_request_error"


class UnknownPrefix(BadRequest):
    code = "prefix_not_found"


class Unauthorized(EdgeCacheError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(EdgeCacheError):
    status = 403
    type = "permission_error"


class NotFound(EdgeCacheError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(EdgeCacheError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(EdgeCacheError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class EdgeOverloaded(Overloaded):
    """The edge holds as many origin requests in flight as it may (``max_fills``): retry shortly."""

    code = "edge_overloaded"
    retry_after_s = 1


class NotCached(EdgeCacheError):
    status = 504
    type = "cache_miss"
    code = "only_if_cached"


class UpstreamError(EdgeCacheError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"


class ConfigError(ValueError):
    """A configuration file or environment value is wrong; the message names file and key."""
