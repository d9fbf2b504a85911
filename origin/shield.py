"""The origin shield: one bounded cache at the origin, shared by every edge (a tiered cache).

A miss at one edge for an answer another edge already caused is answered here, without a
backend request. The shield keeps exactly what an edge would keep, under exactly the edge's key:

- **Scope.** :func:`shield_request` keys a request with ``edgecache.keys.cache_key`` over the
  request as the edge sent it (prefix reference, not text), the tenant (``X-EdgeCache-Tenant``)
  and the prefix version the backend sees: the same 16 bytes as the edge's key (so a purge by
  key reaches both) and the same scope as request coalescing (``origin/coalesce.py``). Nothing
  is served across tenants, prefix versions or parameters.
- **What is stored.** Only a complete, successful (200) answer: a JSON ``chat.completion`` /
  ``text_completion``, or a stream that ended with ``[DONE]`` and carried no error event
  (:func:`answer_entry`, assembled as the edge's ``nodes/fill.py`` does). Never errors, cut
  streams, cancelled backend requests, answers over ``max_entry_bytes``, or requests sent with
  ``Cache-Control: no-store``. ``no-cache`` skips the lookup but stores the fresh answer.
- **Tags and TTL.** The edge forwards its request's tags (``Cache-Tag``: the validated list
  plus ``prefix:<id>`` and the prefix's tags) and its TTL (``X-EdgeCache-TTL``); the entry keeps
  them (the shield adds the prefix's tags itself too). Without a TTL nothing is stored.
- **Serving.** An entry answers a request only when it is fresh, not soft-purged, younger
  than the request's TTL (the edge would store it already expired otherwise) and its
  ``max-age``, and carries every tag the request names: a purge of any tag the request depends
  on has then removed it (an entry stored by a request with other tags would not have been).
- **Invalidation.** :meth:`Shield.apply` runs for every event *before* the origin's log
  records it (``EventFeed.before_append``): tags, keys, all, and ``prefix:<id>`` for every prefix
  created, changed or deleted. A soft purge removes entries here (the shield serves nothing
  stale). A store carries the purge generation taken before its backend request
  (``MemoryTier.put(since=...)``): an answer begun before a purge is never stored after it.
- **Replay** (:func:`replay`): the stored answer in the wire format the edge asked: JSON, or an
  SSE stream with the usage chunk under ``stream_options.include_usage`` and ``[DONE]``, built
  with ``edgecache.stream`` like the edge's own replay, so the edge parses it as a fill.

The semantic tier stays at the edges: the shield answers exact keys only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgecache.entry import Entry, Usage
from edgecache.errors import BadRequest
from edgecache.events import Event
from edgecache.keys import Scope, cache_key
from edgecache.policy import delta_seconds, parse_cache_control
from edgecache.prefix import prefix_tag
from edgecache.stores.memory import MemoryTier
from edgecache.stream import (
    DONE,
    SSEParser,
    assemble,
    frame,
    is_usage_chunk,
    synthesize_chunks,
    usage_chunk,
)
from edgecache.tags import MAX_TAGS, validate_tag

__all__ = ["RESULTS", "Pending", "Shield", "ShieldCollector", "ShieldRequest", "answer_entry", "replay",
           "shield_request"]

RESULTS = ("hit", "miss", "stored", "bypass")
"""The ``result`` label of ``edgecache_origin_shield_total``."""

_MAX_TTL_S = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class ShieldRequest:
    """A forwarded request as the shield sees it.

    key: the edge's 16-byte cache key. tags: what the entry will carry. ttl: seconds, or None
    (not storable). lookup/store: whether the shield may answer it / keep its answer.
    stream, include_usage: the wire format to answer in. max_age: the client's ``max-age``.
    """

    key: bytes
    endpoint: str
    tenant: str
    tags: frozenset[str]
    ttl: float | None
    lookup: bool
    store: bool
    stream: bool = False
    include_usage: bool = False
    max_age: float | None = None
    prefix_id: str | None = None
    prefix_version: str | None = None

    def merge(self, other: ShieldRequest) -> ShieldRequest:
        """The request a coalesced backend request stores for: every waiter's tags (more tags is
        only ever more purgeable), the shortest TTL."""
        ttls = [t for t in (self.ttl, other.ttl) if t is not None]
        return replace(self, tags=self.tags | other.tags, ttl=min(ttls) if ttls else None)


def shield_request(endpoint: str, body: Mapping[str, Any], headers: Mapping[str, str], *,
                   prefix: tuple[str, str] | None = None,
                   prefix_tags: frozenset[str] = frozenset()) -> ShieldRequest | None:
    """The shield's view of a forwarded request, or None when the shield must stay out of it
    (no tenant, a body the key cannot canonicalise, a malformed tag, TTL or ``Cache-Control``).

    ``body``: the request as the edge sent it; ``prefix``: (id, version) it references, the
    version being the one the backend sees; ``prefix_tags``: that prefix's own tags.
    """
    tenant = headers.get("X-EdgeCache-Tenant")
    if not tenant:
        return None
    try:
        cc = parse_cache_control(headers.get("Cache-Control"))
        scope = Scope(tenant) if prefix is None else Scope(tenant, *prefix)
        key = cache_key(endpoint, body, scope).digest
        tags = _tags(headers.get("Cache-Tag", ""))
    except (BadRequest, ValueError, TypeError):
        return None
    if prefix is not None:
        tags = tags | prefix_tags | {prefix_tag(prefix[0])}
    ttl = _ttl(headers.get("X-EdgeCache-TTL"))
    stream = body.get("stream") is True
    options = body.get("stream_options")
    return ShieldRequest(key=key, endpoint=endpoint, tenant=tenant, tags=tags, ttl=ttl,
                         lookup=not (cc.no_cache or cc.no_store), store=not cc.no_store and ttl is not None,
                         stream=stream, include_usage=stream and isinstance(options, dict)
                         and options.get("include_usage") is True, max_age=cc.max_age,
                         prefix_id=prefix[0] if prefix else None, prefix_version=prefix[1] if prefix else None)


def _tags(value: str) -> frozenset[str]:
    """The edge's tag list: its client's (at most ``MAX_TAGS``) and its prefix's."""
    if not value.strip():
        return frozenset()
    tags = frozenset(validate_tag(item.strip()) for item in value.split(","))
    if len(tags) > 4 * MAX_TAGS:
        raise ValueError("too many tags")
    return tags


def _ttl(value: str | None) -> float | None:
    if value is None:
        return None
    seconds = delta_seconds(value.strip())
    if not seconds:
        return None
    return min(float(seconds), _MAX_TTL_S)


def answer_entry(req: ShieldRequest, content_type: str, raw: bytes, created: float) -> Entry | None:
    """The entry for a backend's complete 200 answer (``raw``: every byte of it), or None when it
    is not a complete, successful answer: malformed JSON, no choices, an error, a stream
    without ``[DONE]`` or with an error event."""
    assert req.ttl is not None
    try:
        if content_type.startswith("text/event-stream"):
            body, chunks, usage = _assemble_stream(req.endpoint, raw)
        else:
            parsed = orjson.loads(raw)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list) or "error" in parsed:
                return None
            body, chunks, usage = raw, None, parsed.get("usage")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if body is None:
        return None
    u = usage if isinstance(usage, dict) else {}
    details = u.get("prompt_tokens_details") or {}
    try:
        counts = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                       completion_tokens=int(u.get("completion_tokens") or 0),
                       cached_tokens=int(details.get("cached_tokens") or 0))
    except (ValueError, TypeError, AttributeError):
        counts = Usage()
    return Entry(key=req.key, endpoint=req.endpoint, body=body, chunks=chunks, created=created, ttl=req.ttl,
                 tenant=req.tenant, prefix_id=req.prefix_id, prefix_version=req.prefix_version,
                 tags=req.tags, usage=counts)


def _assemble_stream(endpoint: str, raw: bytes) -> tuple[bytes | None, tuple[bytes, ...], Any]:
    """(whole answer, chunks without the usage key or the usage-only chunk, usage); the answer
    is None unless the stream is complete and error-free."""
    parser = SSEParser()
    parsed: list[dict[str, Any]] = []
    plain: list[bytes] = []
    usage = None
    finished = False
    for payload in parser.feed(raw):
        if payload == b"[DONE]":
            finished = True
            continue
        if finished:
            return None, (), None   # nothing may follow [DONE]
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict) or "error" in chunk:
            return None, (), None
        if is_usage_chunk(chunk):
            usage = chunk["usage"]
            continue
        parsed.append(chunk)
        plain.append(orjson.dumps({k: v for k, v in chunk.items() if k != "usage"}) if "usage" in chunk else payload)
    if not finished or parser.pending:
        return None, (), None
    return orjson.dumps(assemble(endpoint, parsed, usage)), tuple(plain), usage


def replay(entry: Entry, stream: bool, include_usage: bool) -> tuple[str, bytes]:
    """(content type, body) of ``entry`` in the wire format asked for, as the edge replays it."""
    if not stream:
        return "application/json", entry.body
    parsed: dict[str, Any] | None = None
    chunks = entry.chunks
    if chunks is None:
        parsed = orjson.loads(entry.body)
        chunks = tuple(orjson.dumps(c) for c in synthesize_chunks(entry.endpoint, parsed))
    out = [frame(c) for c in chunks]
    if include_usage:
        parsed = parsed or orjson.loads(entry.body)
        if parsed.get("usage") is not None:
            out.append(frame(usage_chunk(entry.endpoint, parsed, parsed["usage"])))
    out.append(DONE)
    return "text/event-stream", b"".join(out)


class Shield:
    """The shared cache: a byte-bounded ``MemoryTier`` with its tag index, and its counters.

    Runs on the event loop (every operation is O(1) but purges); ``clock`` gives wall-clock
    epoch seconds (the entries' ``created``).
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.tier = MemoryTier(max_bytes)
        self.max_entry_bytes = max_entry_bytes
        self.clock = clock
        self.counts = dict.fromkeys(RESULTS, 0)

    def __len__(self) -> int:
        return len(self.tier)

    @property
    def bytes(self) -> int:
        return self.tier.bytes

    def generation(self) -> int:
        """Take before the backend request; pass to :meth:`store` as ``since``."""
        return self.tier.generation()

    def lookup(self, req: ShieldRequest | None, now: float) -> Entry | None:
        """The entry that may answer ``req``, or None (counted as a miss, or a bypass when the
        request may not be answered from the shield)."""
        if req is None or not req.lookup:
            self.counts["bypass"] += 1
            return None
        entry = self.tier.get(req.key, now)
        if entry is not None and self._serves(entry, req, now):
            self.counts["hit"] += 1
            return entry
        self.counts["miss"] += 1
        return None

    @staticmethod
    def _serves(entry: Entry, req: ShieldRequest, now: float) -> bool:
        age = entry.age(now)
        return (entry.is_fresh(now) and entry.tenant == req.tenant and req.tags <= entry.tags
                and entry.prefix_version == req.prefix_version
                and (req.ttl is None or age < req.ttl) and (req.max_age is None or age <= req.max_age))

    def store(self, req: ShieldRequest, content_type: str, raw: bytes, *, since: int) -> bool:
        """Keep a backend's complete 200 answer unless it is not storable or a purge since
        generation ``since`` touched its key or one of its tags."""
        if not req.store:
            return False
        entry = answer_entry(req, content_type, raw, self.clock())
        if entry is None or entry.size > self.max_entry_bytes or not self.tier.put(entry, since=since):
            return False
        self.counts["stored"] += 1
        return True

    def apply(self, event: Event) -> None:
        """An invalidation event, before the log records it (and so before any edge sees it)."""
        if event.purge_all:
            self.tier.clear()
        tags = set(event.tags) | {prefix_tag(p.id) for p in event.prefixes}
        if tags:
            self.tier.purge_tags(tags)   # soft too: the shield serves nothing stale, so it keeps none
        for key in event.keys:
            self.tier.delete(key)

    def health(self) -> dict[str, int]:
        return {"entries": len(self.tier), "bytes": self.tier.bytes, "max_bytes": self.tier.max_bytes,
                **self.counts}


class ShieldCollector(Collector):
    """``edgecache_origin_shield_total{result}`` and the entries/bytes gauges, read at scrape time."""

    def __init__(self, shield: Shield) -> None:
        self.shield = shield

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily("edgecache_origin_shield", "Completion requests and the origin shield, "
                                    "by result: hit, miss, stored, bypass", labels=["result"])
        for result in RESULTS:
            total.add_metric([result], self.shield.counts[result])
        yield total
        yield GaugeMetricFamily("edgecache_origin_shield_entries", "Answers the origin shield holds",
                                value=len(self.shield))
        yield GaugeMetricFamily("edgecache_origin_shield_bytes", "Bytes (Entry.size) the origin shield holds",
                                value=self.shield.bytes)


class Pending:
    """A backend request whose answer the shield is to keep: the request it answers (merged
    with every waiter that joined it) and the purge generation taken before it began."""

    __slots__ = ("req", "since")

    def __init__(self, req: ShieldRequest, since: int) -> None:
        self.req = req
        self.since = since

    def join(self, req: ShieldRequest | None) -> None:
        if req is not None and req.key == self.req.key:
            self.req = self.req.merge(req)
