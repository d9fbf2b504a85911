"""The memory tier: an LRU of entries bounded in bytes, with a tag index. No I/O, no clock.

Every operation is O(1) except purges (O(entries purged)) and ``expire`` (O(entries expired),
amortised), so it runs on the event loop. It is not thread-safe: use it from one thread.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable

from edgecache.entry import Entry

__all__ = ["PURGE_MEMORY", "MemoryTier"]

PURGE_MEMORY = 65536
"""How many past purges a tier remembers individually for ``put(since=)``; a put whose
``since`` is older than that is refused."""


class MemoryTier:
    """An LRU cache of ``Entry`` values, at most ``max_bytes`` of ``Entry.size`` in total."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[Entry, int]] = OrderedDict()  # LRU first
        self._tags: dict[str, set[bytes]] = {}
        self._bytes = 0
        self._expiry: list[tuple[float, bytes]] = []       # a heap, with outdated items
        self._generation = 0
        self._floor = 0                                    # puts with since < floor: refused
        self._purged: OrderedDict[str, int] = OrderedDict()  # tag or "#<key hex>" -> generation

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        entry = item[0]
        if now >= entry.created + entry.ttl:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def peek(self, key: bytes) -> Entry | None:
        """The entry under ``key`` whatever its age, without touching its recency."""
        item = self._entries.get(key)
        return None if item is None else item[0]

    def keys_for_tag(self, tag: str) -> list[bytes]:
        return list(self._tags.get(tag, ()))

    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # -- writes --------------------------------------------------------------------------

    def put(self, entry: Entry, *, since: int | None = None) -> bool:
        key = entry.key
        if since is not None and self._purged_since(entry, since):
            return False
        if key in self._entries:
            self._remove(key)
        size = entry.size
        if size > self.max_bytes:
            return False
        self._entries[key] = (entry, size)
        self._bytes += size
        for tag in entry.tags:
            self._tags.setdefault(tag, set()).add(key)
        heapq.heappush(self._expiry, (entry.created + entry.ttl, key))
        while self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        if len(self._expiry) > 2 * len(self._entries) + 64:
            self._expiry = [(e.created + e.ttl, k) for k, (e, _) in self._entries.items()]
            heapq.heapify(self._expiry)
        return True

    def delete(self, key: bytes) -> bool:
        self._record(("#" + key.hex(),))
        if key not in self._entries:
            return False
        self._remove(key)
        return True

    def purge_tags(self, tags: Iterable[str], *, soft: bool = False) -> int:
        """Remove, or mark stale, the entries carrying any of ``tags``.

        Returns how many entries were removed, or with ``soft=True`` newly marked stale.
        """
        tags = set(tags)
        self._record(tags)
        keys: set[bytes] = set()
        for tag in tags:
            keys.update(self._tags.get(tag, ()))
        count = 0
        for key in keys:
            if soft:
                entry, size = self._entries[key]
                if not entry.stale:
                    self._entries[key] = (entry.mark_stale(), size)   # keeps its LRU position
                    count += 1
            else:
                self._remove(key)
                count += 1
        return count

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._tags.clear()
        self._expiry.clear()
        self._bytes = 0
        self._generation += 1
        self._floor = self._generation
        self._purged.clear()
        return count

    def expire(self, now: float) -> int:
        count = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            item = self._entries.get(key)
            if item is not None and now >= item[0].created + item[0].ttl:
                self._remove(key)
                count += 1
        return count

    def close(self) -> None:
        """Nothing to release; here so that every tier can be closed alike."""

    # -- internals -----------------------------------------------------------------------

    def _remove(self, key: bytes) -> None:
        entry, size = self._entries.pop(key)
        self._bytes -= size
        for tag in entry.tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    def _record(self, names: Iterable[str]) -> None:
        self._generation += 1
        generation = self._generation
        purged = self._purged
        for name in names:
            purged.pop(name, None)
            purged[name] = generation
        oldest = generation - PURGE_MEMORY
        while purged:
            name, seen = next(iter(purged.items()))
            if seen > oldest:
                break
            del purged[name]
            self._floor = max(self._floor, seen)

    def _purged_since(self, entry: Entry, since: int) -> bool:
        if since < self._floor:
            return True
        if since >= self._generation:
            return False
        purged = self._purged
        if purged.get("#" + entry.key.hex(), 0) > since:
            return True
        return any(purged.get(tag, 0) > since for tag in entry.tags)

    @property
    def bytes(self) -> int:
        """Sum of ``Entry.size`` over the entries held."""
        return self._bytes
