"""Everything one edge node holds while it runs, and the purges that act on all of it."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edgecache.config import NodeConfig
from edgecache.errors import Unauthorized
from edgecache.keys import tenant_id
from edgecache.stores.disk import DiskTier
from edgecache.stores.memory import MemoryTier
from nodes.events import EventFollower
from nodes.fill import Fill
from nodes.memo import Memo
from nodes.metrics import NodeMetrics, SharedCounts
from nodes.prefixes import PrefixInfo, PrefixReplica
from nodes.semantic import SemanticTier

__all__ = ["NodeState"]

log = logging.getLogger("edgecache.node")


@dataclass(slots=True)
class NodeState:
    """Everything one edge node holds while it runs."""

    config: NodeConfig
    memory: MemoryTier
    disk: DiskTier
    session: aiohttp.ClientSession
    metrics: NodeMetrics
    keys: dict[str, str]                      # API key -> tenant, when the topology lists tenants
    inflight: dict[bytes, Fill] = field(default_factory=dict)
    memo: Memo = field(default_factory=lambda: Memo(4096))          # (endpoint, tenant, body) -> key facts
    tenants: Memo = field(default_factory=lambda: Memo(4096))       # API key -> tenant
    writes: set[asyncio.Task[None]] = field(default_factory=set)
    disk_stats: tuple[int, int] = (0, 0)
    shared_counts: SharedCounts | None = None   # workers > 1: every worker's counts, for /metrics
    prefixes: PrefixReplica | None = None
    events: EventFollower | None = None
    semantic: SemanticTier | None = None
    semantic_status: str = "disabled"

    def tenant_for(self, authorization: str | None, api_key: str | None = None) -> str:
        """The tenant of a request's key: ``Authorization: Bearer <key>``, else an Azure-style
        ``api-key: <key>`` header (``api_key``). Any other Authorization (Basic, a bare key) is a
        401: taken for no key at all, it would share the anonymous tenant with every other one.
        No key is the anonymous tenant without ``[[tenants]]``, a 401 with them."""
        token = None
        if authorization and authorization.strip():
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("Unsupported Authorization header: send 'Authorization: Bearer <key>'")
            token = value.strip()
        elif api_key and api_key.strip():
            token = api_key.strip()
        if token is not None and not token.isascii():
            try:
                token.encode()
            except UnicodeEncodeError:   # bytes that are not UTF-8 (aiohttp keeps them as surrogates)
                raise Unauthorized("The API key is not valid UTF-8") from None
        if not self.config.tenants:
            tenant = self.tenants.get(token)
            if tenant is None:
                tenant = tenant_id(token)
                self.tenants.put(token, tenant)
            return tenant
        if token is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
        for known, tenant in self.keys.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        raise Unauthorized("Incorrect API key provided")

    def fill_done(self, fill: Fill) -> None:
        if self.inflight.get(fill.req.key) is fill:
            del self.inflight[fill.req.key]
        self.metrics.fill("stored" if fill.entry else "error" if fill.failure else "not_stored")

    def background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self.writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    async def purge_tags(self, tags: frozenset[str], *, soft: bool = False) -> int:
        """Purge every entry carrying one of ``tags`` from every tier and the semantic index.

        The disk goes first, then memory: a promotion racing the purge cannot bring an
        entry back (it is refused by the memory tier's generation check).
        """
        await self._drain()
        keys = set(await asyncio.to_thread(lambda: [k for t in tags for k in self.disk.keys_for_tag(t)]))
        keys.update(k for t in tags for k in self.memory.keys_for_tag(t))
        on_disk = await asyncio.to_thread(self.disk.purge_tags, tags, soft=soft)
        in_memory = self.memory.purge_tags(tags, soft=soft)
        if self.semantic is not None and not soft:
            await self.semantic.forget(sorted(keys))
        return max(on_disk, in_memory)

    async def _drain(self) -> None:
        if self.writes:   # answers on their way to disk or the index are purged too
            await asyncio.gather(*list(self.writes), return_exceptions=True)

    async def purge_keys(self, keys: list[bytes]) -> int:
        await self._drain()
        on_disk = sum(await asyncio.to_thread(lambda: [self.disk.delete(k) for k in keys]))
        in_memory = sum(self.memory.delete(k) for k in keys)
        if self.semantic is not None:
            await self.semantic.forget(keys)
        return max(on_disk, in_memory)

    async def purge_all(self) -> int:
        await self._drain()
        on_disk = await asyncio.to_thread(self.disk.clear)
        in_memory = self.memory.clear()
        if self.semantic is not None:
            await self.semantic.forget(list(await asyncio.to_thread(self.semantic.index.keys)))
        return max(on_disk, in_memory)

    async def apply_event(self, event: dict[str, Any]) -> None:
        """One invalidation event from the origin's log (applied in order, once)."""
        if event["all"]:
            await self.purge_all()
        if event["tags"]:
            await self.purge_tags(frozenset(event["tags"]), soft=event["soft"])
        if event["keys"]:
            await self.purge_keys([bytes.fromhex(k) for k in event["keys"]])
        assert self.prefixes is not None
        for change in event["prefixes"]:
            if change["version"] is None:
                self.prefixes.forget(change["id"])
            else:
                self.prefixes.apply(PrefixInfo(change["id"], change["version"], frozenset(change["tags"]),
                                               change["bytes"]))

    def fenced(self) -> bool:
        """Tagged entries may not be served: the invalidation stream has been silent too long."""
        return self.events is not None and self.events.fenced()

    def tier_stats(self, tier: str) -> tuple[int, int]:
        if tier == "memory":
            return len(self.memory), self.memory.bytes
        return self.disk_stats
