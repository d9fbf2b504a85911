"""Invalidation events: what the origin's log records and every edge applies, in order.

An ``Event`` is one accepted change, applied whole or not at all: tags to purge, cache keys to
purge, prefixes created/updated/deleted, or everything. ``seq`` is the log's monotonic sequence
number; ``source_id`` the delivery id it came from (a CMS ``webhook-id``), so a redelivery is
recognised and answered with the original ``seq``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = ["Event", "PrefixChange"]


@dataclass(frozen=True, slots=True)
class PrefixChange:
    """A prefix set to ``version`` (with its tags and size), or deleted (``version`` None)."""

    id: str
    version: str | None
    tags: frozenset[str] = frozenset()
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    created: float                             # epoch seconds at the origin
    source_id: str                             # the delivery id (webhook-id, purge request id)
    tags: frozenset[str] = frozenset()
    keys: frozenset[bytes] = frozenset()       # 16-byte cache key digests
    prefixes: tuple[PrefixChange, ...] = ()
    purge_all: bool = False
    soft: bool = False                         # mark stale instead of removing
    extra: Mapping[str, Any] = field(default_factory=dict)   # e.g. the CMS that sent it

    def to_bytes(self) -> bytes:
        return msgpack.packb([
            1, self.seq, self.created, self.source_id, sorted(self.tags), sorted(self.keys),
            [[p.id, p.version, sorted(p.tags), p.bytes] for p in self.prefixes],
            self.purge_all, self.soft, dict(self.extra),
        ], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Event:
        """Decode ``to_bytes``; ``ValueError`` on anything else."""
        try:
            fmt, seq, created, source_id, tags, keys, prefixes, purge_all, soft, extra = msgpack.unpackb(
                data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"corrupt event: {exc}") from None
        if fmt != 1:
            raise ValueError(f"unknown event format {fmt!r}")
        return cls(seq=seq, created=created, source_id=source_id, tags=frozenset(tags), keys=frozenset(keys),
                   prefixes=tuple(PrefixChange(i, v, frozenset(t), b) for i, v, t, b in prefixes),
                   purge_all=purge_all, soft=soft, extra=extra)
