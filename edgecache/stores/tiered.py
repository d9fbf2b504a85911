"""``TieredStore``: a memory tier over a disk tier, composed in the one safe order.

Synchronous and thin: it shows (and tests) the ordering rules of ``edgecache.stores.tier`` that
an async composition must keep too, and serves scripts and benchmarks that need no event loop.

- A disk hit is promoted to memory with ``since=`` the memory generation read *before* the disk
  read, so a purge that ran meanwhile is not undone by the promotion.
- Purges go to the disk first, then to memory.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgecache.entry import Entry
from edgecache.stores.tier import Tier

__all__ = ["TieredStore"]


class TieredStore:
    """Memory over disk. ``generation()`` and ``put(since=)`` take a (memory, disk) pair."""

    def __init__(self, memory: Tier, disk: Tier) -> None:
        self.memory = memory
        self.disk = disk

    def lookup(self, key: bytes, now: float) -> tuple[Entry | None, str | None]:
        """The entry and the tier that had it (``"memory"`` or ``"disk"``), or ``(None, None)``."""
        found = self.memory.get(key, now)
        if found is not None:
            return found, "memory"
        generation = self.memory.generation()
        found = self.disk.get(key, now)
        if found is None:
            return None, None
        self.memory.put(found, since=generation)
        return found, "disk"

    def get(self, key: bytes, now: float) -> Entry | None:
        return self.lookup(key, now)[0]

    def generation(self) -> tuple[int, int]:
        return self.memory.generation(), self.disk.generation()

    def put(self, entry: Entry, *, since: tuple[int, int] | None = None) -> bool:
        """Store in both tiers; ``True`` if either kept it."""
        memory_since, disk_since = since if since is not None else (None, None)
        on_disk = self.disk.put(entry, since=disk_since)
        in_memory = self.memory.put(entry, since=memory_since)
        return on_disk or in_memory

    def delete(self, key: bytes) -> bool:
        on_disk = self.disk.delete(key)
        return self.memory.delete(key) or on_disk

    def purge_tags(self, tags: Iterable[str], *, soft: bool = False) -> int:
        """Purge both tiers; the larger of the two counts (an entry is usually in both)."""
        tags = frozenset(tags)
        on_disk = self.disk.purge_tags(tags, soft=soft)
        return max(on_disk, self.memory.purge_tags(tags, soft=soft))

    def clear(self) -> int:
        on_disk = self.disk.clear()
        return max(on_disk, self.memory.clear())

    def expire(self, now: float) -> int:
        on_disk = self.disk.expire(now)
        return max(on_disk, self.memory.expire(now))

    def close(self) -> None:
        self.memory.close()
        self.disk.close()
