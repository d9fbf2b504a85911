"""A small bounded dictionary for values that are pure functions of their key."""

from __future__ import annotations

from typing import Any

__all__ = ["Memo"]


class Memo:
    """Remembers at most ``capacity`` results; the oldest is forgotten first.

    Used on the hit path for work that depends only on the request bytes (the cache key of
    a body, the tenant of an API key), so that byte-identical repeats skip it. Keys holding
    ``bytes`` longer than ``max_item_bytes`` are not remembered.
    """

    __slots__ = ("_data", "capacity", "max_item_bytes")

    def __init__(self, capacity: int, max_item_bytes: int = 16384) -> None:
        self._data: dict[Any, Any] = {}
        self.capacity = capacity
        self.max_item_bytes = max_item_bytes

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        if isinstance(key, tuple) and any(isinstance(k, bytes) and len(k) > self.max_item_bytes for k in key):
            return
        if len(self._data) >= self.capacity:
            del self._data[next(iter(self._data))]
        self._data[key] = value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
