"""A cached answer: the body, how to replay it as a stream, when it was made and what it carries.

An ``Entry`` is a pure value. It never reads a clock: every question about time takes ``now``
(wall-clock epoch seconds, the same clock as ``created``). It serialises to msgpack with a
format version in front, so a store can recognise data it does not understand and drop it::

    [FORMAT, key, endpoint, body, chunks, created, ttl, tenant,
     prefix_id, prefix_version, [tags, sorted], [prompt, completion, cached], stale,
     semantic_scope, query]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgpack

__all__ = ["FORMAT", "Entry", "Usage"]

FORMAT = 2
"""The serialisation format version written by ``Entry.to_bytes``."""

_FIELDS = 15
_OVERHEAD = 256          # the dataclass, its key, scope strings and bookkeeping, roughly
_CHUNK_OVERHEAD = 40     # a bytes object per stream chunk
_TAG_OVERHEAD = 56       # a str object per tag


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage the origin reported for the answer (kept for metrics and replay)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer.

    key: the 16-byte cache key digest. endpoint: ``"chat"`` or ``"completions"``.
    body: the complete answer as JSON bytes (a ``chat.completion`` / ``text_completion``).
    chunks: the SSE ``data:`` payloads as fetched (JSON bytes, without a usage-only chunk or
    ``[DONE]``), or ``None`` when the answer was fetched as JSON.
    created: wall-clock epoch seconds. ttl: seconds the entry is fresh for.
    tenant, prefix_id, prefix_version: the scope it was made in.
    tags: purge tags (``doc:42``, ``prefix:<id>``). usage: token counts.
    stale: soft-purged; never served as fresh again.
    semantic_scope: the 16-byte scope of the semantic tier (everything but the question), or
    None when the request cannot take semantic hits. query: the question that was embedded.
    """

    key: bytes
    endpoint: str
    body: bytes
    chunks: tuple[bytes, ...] | None
    created: float
    ttl: float
    tenant: str
    prefix_id: str | None = None
    prefix_version: str | None = None
    tags: frozenset[str] = frozenset()
    usage: Usage = Usage()
    stale: bool = False
    semantic_scope: bytes | None = None
    query: str | None = None

    def expires_at(self) -> float:
        """Epoch seconds from which the entry is expired."""
        return self.created + self.ttl

    def age(self, now: float) -> float:
        """Seconds since the entry was made, never negative (clocks disagree)."""
        return max(0.0, now - self.created)

    def is_expired(self, now: float) -> bool:
        return now >= self.created + self.ttl

    def is_fresh(self, now: float) -> bool:
        """Servable as a hit: not soft-purged and not yet expired."""
        return not self.stale and now < self.created + self.ttl

    def mark_stale(self) -> Entry:
        """The same entry, soft-purged."""
        return self if self.stale else replace(self, stale=True)

    @property
    def size(self) -> int:
        """Approximate bytes held in memory; what the tiers count against their byte bounds."""
        n = _OVERHEAD + len(self.key) + len(self.body) + len(self.tenant) + len(self.query or "")
        if self.chunks is not None:
            n += sum(len(c) for c in self.chunks) + _CHUNK_OVERHEAD * len(self.chunks)
        if self.tags:
            n += sum(len(t) for t in self.tags) + _TAG_OVERHEAD * len(self.tags)
        return n

    def to_bytes(self) -> bytes:
        """msgpack, versioned; equal entries give equal bytes."""
        u = self.usage
        return msgpack.packb(
            (
                FORMAT, self.key, self.endpoint, self.body,
                list(self.chunks) if self.chunks is not None else None,
                float(self.created), float(self.ttl), self.tenant,
                self.prefix_id, self.prefix_version, sorted(self.tags),
                (u.prompt_tokens, u.completion_tokens, u.cached_tokens), self.stale,
                self.semantic_scope, self.query,
            ),
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        """Decode ``to_bytes`` output; ``ValueError`` on corrupt data or an unknown format."""
        try:
            obj = msgpack.unpackb(data, use_list=False, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"corrupt cache entry: {exc}") from None
        if not isinstance(obj, tuple) or not obj or obj[0] != FORMAT or type(obj[0]) is not int:
            version = obj[0] if isinstance(obj, tuple) and obj else None
            raise ValueError(f"unknown cache entry format {version!r}")
        if len(obj) != _FIELDS:
            raise ValueError(f"corrupt cache entry: {len(obj)} fields, expected {_FIELDS}")
        (_, key, endpoint, body, chunks, created, ttl, tenant,
         prefix_id, prefix_version, tags, usage, stale, semantic_scope, query) = obj
        _check(isinstance(key, bytes), "key")
        _check(isinstance(endpoint, str), "endpoint")
        _check(isinstance(body, bytes), "body")
        _check(chunks is None or (isinstance(chunks, tuple)
                                  and all(isinstance(c, bytes) for c in chunks)), "chunks")
        _check(_is_number(created) and _is_number(ttl), "created/ttl")
        _check(isinstance(tenant, str), "tenant")
        _check(prefix_id is None or isinstance(prefix_id, str), "prefix_id")
        _check(prefix_version is None or isinstance(prefix_version, str), "prefix_version")
        _check(isinstance(tags, tuple) and all(isinstance(t, str) for t in tags), "tags")
        _check(isinstance(usage, tuple) and len(usage) == 3
               and all(type(n) is int for n in usage), "usage")
        _check(isinstance(stale, bool), "stale")
        _check(semantic_scope is None or isinstance(semantic_scope, bytes), "semantic_scope")
        _check(query is None or isinstance(query, str), "query")
        return cls(key=key, endpoint=endpoint, body=body, chunks=chunks, created=float(created),
                   ttl=float(ttl), tenant=tenant, prefix_id=prefix_id,
                   prefix_version=prefix_version, tags=frozenset(tags), usage=Usage(*usage),
                   stale=stale, semantic_scope=semantic_scope, query=query)


def _is_number(value: object) -> bool:
    return type(value) in (float, int)


def _check(ok: bool, name: str) -> None:
    if not ok:
        raise ValueError(f"corrupt cache entry: bad {name}")
