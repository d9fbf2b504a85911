"""The ``Tier`` protocol: what the memory and disk tiers of the exact cache both provide.

A tier maps a cache key to an ``Entry`` and indexes entries by tag so that purges are cheap.
It is driven by an explicit ``now`` (wall-clock epoch seconds) and never reads a clock.

Semantics every tier honours (one conformance suite, ``tests/edgecache/test_stores.py``):

- ``get`` returns ``None`` for an expired entry and removes it; a soft-purged entry that has
  not expired is returned with ``stale=True`` (servable only under stale-if-error rules).
- ``put`` replaces any entry under the same key, with its tags. An entry larger than the tier's
  bound is not stored (and the older entry under its key is dropped). Returns whether stored.
- ``purge_tags`` removes (or, with ``soft=True``, marks stale) every entry carrying any of the
  tags; ``delete`` purges one key; ``clear`` purges everything.
- Purge generations close the race between a purge and an answer fetched before it: take
  ``generation()`` before fetching (from the origin, or from a lower tier) and pass it as
  ``put(entry, since=g)``; the put is refused if, since ``g``, the tier purged one of the
  entry's tags, its key, or everything.

Composing tiers (memory over disk): purge the lower tier first, then the upper one, and promote
a lower-tier hit with ``upper.put(entry, since=g)`` where ``g = upper.generation()`` was taken
before the lower-tier read. Then no interleaving of a purge with a read resurrects a purged
entry in the upper tier. ``TieredStore`` does exactly that, synchronously.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from edgecache.entry import Entry

__all__ = ["Tier"]


@runtime_checkable
class Tier(Protocol):
    def get(self, key: bytes, now: float) -> Entry | None:
        """The entry under ``key``, or ``None`` when absent, expired or unreadable."""
        ...

    def put(self, entry: Entry, *, since: int | None = None) -> bool:
        """Store ``entry`` under ``entry.key``; ``False`` if too large or purged since ``since``."""
        ...

    def delete(self, key: bytes) -> bool:
        """Purge one key; ``True`` if an entry was there."""
        ...

    def purge_tags(self, tags: Iterable[str], *, soft: bool = False) -> int:
        """Remove (or mark stale) entries carrying any of ``tags``; how many were affected."""
        ...

    def clear(self) -> int:
        """Purge everything; how many entries were removed."""
        ...

    def keys_for_tag(self, tag: str) -> list[bytes]:
        """Keys of the entries that carry ``tag`` (may include entries already evicted)."""
        ...

    def expire(self, now: float) -> int:
        """Remove every entry expired at ``now``; how many were removed."""
        ...

    def generation(self) -> int:
        """A counter every purge, delete and clear advances; see ``put(since=)``."""
        ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...

    @property
    def bytes(self) -> int:
        """Bytes held, as counted against the tier's bound."""
        ...
