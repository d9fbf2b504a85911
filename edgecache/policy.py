"""The hit-path decision: what a request's ``Cache-Control`` allows against what is stored.

``decide`` is pure: the service passes the entry it found and the time, and acts on the
typed outcome (``Hit``, ``Stale``, ``Miss``, ``Bypass``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecache.entry import Entry
from edgecache.errors import BadRequest

__all__ = [
    "Bypass",
    "CacheControl",
    "Hit",
    "Miss",
    "Outcome",
    "Stale",
    "decide",
    "delta_seconds",
    "parse_cache_control",
    "parse_ttl",
]


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Request directives (RFC 9111 §5.2.1) that edgecache honours.

    no_store: do not store the answer. no_cache: do not serve from cache (do store).
    max_age: serve only an entry at most this many seconds old. only_if_cached: never go
    to the origin (504 on a miss).
    """

    no_store: bool = False
    no_cache: bool = False
    max_age: float | None = None
    only_if_cached: bool = False


DEFAULT_CACHE_CONTROL = CacheControl()
_MAX_DELTA_S = 2**31
"""RFC 9111 §1.2.2: a larger ``delta-seconds`` (``max-age``, a TTL) is taken as this many."""


def delta_seconds(text: str) -> int | None:
    """RFC 9111 ``delta-seconds``: ASCII digits (not "²" or "٣", which ``str.isdigit`` accepts),
    capped at ``_MAX_DELTA_S`` without parsing a huge number; None when ``text`` is not one."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    return _MAX_DELTA_S if len(digits) > 10 else min(int(digits or "0"), _MAX_DELTA_S)


def parse_cache_control(value: str | None) -> CacheControl:
    """Parse a request ``Cache-Control`` header; unknown directives are ignored (RFC 9111)."""
    if not value:
        return DEFAULT_CACHE_CONTROL
    no_store = no_cache = only_if_cached = False
    max_age: float | None = None
    for part in value.split(","):
        name, _, arg = part.strip().partition("=")
        name = name.strip().lower()
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
        elif name == "only-if-cached":
            only_if_cached = True
        elif name == "max-age":
            arg = arg.strip().strip('"')
            seconds = delta_seconds(arg)
            if seconds is None:
                raise BadRequest(f"Cache-Control max-age must be a whole number of seconds, got {arg!r}",
                                 param="Cache-Control")
            max_age = float(seconds)
    return CacheControl(no_store=no_store, no_cache=no_cache, max_age=max_age, only_if_cached=only_if_cached)


def parse_ttl(value: str | None, default: float, maximum: float) -> float:
    """The TTL a client asks for with ``X-EdgeCache-TTL`` (whole seconds, capped at ``maximum``)."""
    if value is None:
        return default
    seconds = delta_seconds(value.strip())
    if not seconds:
        raise BadRequest(f"X-EdgeCache-TTL must be a positive whole number of seconds, got {value!r}",
                         param="X-EdgeCache-TTL")
    return min(float(seconds), maximum)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Stale:
    """An entry exists but may not be served as fresh (expired, soft-purged, or too old)."""

    entry: Entry


@dataclass(frozen=True, slots=True)
class Miss:
    pass


@dataclass(frozen=True, slots=True)
class Bypass:
    """The client asked not to be served from cache (``no-cache``)."""


Outcome = Hit | Stale | Miss | Bypass
_MISS = Miss()
_BYPASS = Bypass()


def decide(cc: CacheControl, found: Entry | None, now: float) -> Outcome:
    if cc.no_cache:
        return _BYPASS
    if found is None:
        return _MISS
    if not found.is_fresh(now) or (cc.max_age is not None and found.age(now) > cc.max_age):
        return Stale(found)
    return Hit(found)
