"""The edge's replica of the origin's prefix registry: ids, versions, tags and sizes.

The edge never needs a prefix's text (the origin expands references); it needs the current
version to key requests, and the tags to put on the answers. The replica loads the registry
at start, refreshes it periodically, and fetches an id it does not know on first use. When
the invalidation stream exists, its prefix events call ``apply`` and ``forget`` directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from edgecache.errors import UpstreamError

__all__ = ["PrefixInfo", "PrefixReplica"]

log = logging.getLogger("edgecache.node.prefixes")


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    id: str
    version: str
    tags: frozenset[str]
    bytes: int


class PrefixReplica:
    def __init__(self, session: aiohttp.ClientSession, token: str, on_change: Callable[[], None]) -> None:
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self._on_change = on_change
        self.prefixes: dict[str, PrefixInfo] = {}

    def apply(self, info: PrefixInfo) -> None:
        if self.prefixes.get(info.id) != info:
            self.prefixes[info.id] = info
            self._on_change()

    def forget(self, prefix_id: str) -> None:
        if self.prefixes.pop(prefix_id, None) is not None:
            self._on_change()

    @staticmethod
    def _info(item: dict[str, Any]) -> PrefixInfo:
        return PrefixInfo(id=item["id"], version=item["version"], tags=frozenset(item.get("tags", ())),
                          bytes=int(item.get("bytes", 0)))

    async def refresh(self) -> None:
        """Replace the replica with the origin's registry (raises on a failure).

        A refusal raises an ``UpstreamError`` naming the status only: aiohttp's
        ``ClientResponseError`` carries the request's headers, the node token among them.
        """
        try:
            async with self._session.get("/v1/prefixes", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if not 200 <= resp.status < 300:
                    raise UpstreamError(f"the origin answered GET /v1/prefixes with {resp.status}")
                items = orjson.loads(await resp.read())["data"]
        except aiohttp.ClientResponseError as exc:   # a redirect loop, say: never its request headers
            raise UpstreamError(f"the origin answered GET /v1/prefixes with {exc.status}") from None
        current = {item["id"]: self._info(item) for item in items}
        if current != self.prefixes:
            self.prefixes = current
            self._on_change()

    async def lookup(self, prefix_id: str) -> PrefixInfo | None:
        """The prefix, asking the origin when the replica does not know it yet."""
        info = self.prefixes.get(prefix_id)
        if info is not None:
            return info
        try:
            async with self._session.get(f"/v1/prefixes/{prefix_id}", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    return None
                info = self._info(orjson.loads(await resp.read()))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            return None
        self.apply(info)
        return info

    async def follow(self, every_s: float) -> None:
        """Refresh periodically; a failure keeps the last replica and is retried."""
        while True:
            try:
                await self.refresh()
            except (UpstreamError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("prefix registry refresh failed: %r", exc)
            await asyncio.sleep(every_s)
