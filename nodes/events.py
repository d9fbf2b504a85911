"""The edge follows the origin's invalidation log and applies every event, in order, once.

Events come through a ``Subscription`` of either bus (``edgecache.bus``). The last applied
sequence number is kept in the data folder, so a restarted edge resumes where it stopped; when
the origin's log no longer reaches back that far, the edge purges everything (it cannot know
what it missed) and says so in its log; when the origin's log is behind the edge (the origin
lost its log), the edge purges everything too and starts again from 0.

Staleness fence: every fetch is a heartbeat, but it counts only once the edge has applied every
event the origin held when it answered; the heartbeat's time is when the fetch began. Silent for
longer than ``max_staleness_s``, the edge stops serving tagged entries (``fenced()``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgecache.bus.base import Batch, BusError, Subscription

__all__ = ["EventFollower"]

log = logging.getLogger("edgecache.node.events")


class EventFollower:
    """Fetches from ``subscription`` and hands each event to ``apply``."""

    def __init__(self, subscription: Subscription, directory: str,
                 apply: Callable[[dict[str, Any]], Awaitable[None]],
                 purge_all: Callable[[], Awaitable[None]], *, max_staleness_s: float = 60.0,
                 heartbeat_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.subscription = subscription
        self._path = Path(directory) / "applied_seq"
        self._apply = apply
        self._purge_all = purge_all
        self.applied = 0
        self.connected = False
        self.max_staleness_s = max_staleness_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.last_contact: float | None = None   # the edge was current as of this time (clock seconds)
        self.progress = asyncio.Event()   # set whenever ``applied`` moves (tests and /healthz)
        self.heard = asyncio.Event()      # set whenever ``last_contact`` moves

    def _load(self) -> int:
        try:
            return int(self._path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _save(self, seq: int) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(str(seq))
        os.replace(tmp, self._path)

    async def start(self) -> None:
        self.applied = await asyncio.to_thread(self._load)

    async def poll_once(self, wait_s: float) -> int:
        """One fetch from the bus; returns how many events were applied. Raises ``BusError``."""
        began = self.clock()
        try:
            batch = await self.subscription.fetch(self.applied, wait_s)
        except BusError:
            self.connected = False
            raise
        self.connected = True
        applied = await self._take(batch)
        if self.applied >= batch.last_seq:
            self.last_contact = began if self.last_contact is None else max(self.last_contact, began)
            self.heard.set()
            self.heard = asyncio.Event()
        await self.subscription.acknowledge(self.applied)
        return applied

    async def _take(self, batch: Batch) -> int:
        if batch.last_seq < self.applied:
            log.warning("the origin's event log ends at %d, before %d (was it reset?): purging everything",
                        batch.last_seq, self.applied)
            await self._purge_all()
            await self._advance(0)
        starts_here = bool(batch.events) and batch.events[0]["seq"] == self.applied + 1
        if batch.first_seq > self.applied + 1 and batch.last_seq > self.applied and not starts_here:
            log.warning("the origin's event log starts at %d, after %d: purging everything",
                        batch.first_seq, self.applied)
            await self._purge_all()
            await self._advance(batch.first_seq - 1)
        applied = 0
        for event in batch.events:
            if event["seq"] <= self.applied:
                continue
            await self._apply(event)
            await self._advance(event["seq"])
            applied += 1
        return applied

    async def _advance(self, seq: int) -> None:
        await asyncio.to_thread(self._save, seq)
        self.applied = seq
        self.progress.set()
        self.progress = asyncio.Event()

    def fenced(self) -> bool:
        """True when the edge has not been known current for ``max_staleness_s``: tagged entries
        may have been purged meanwhile, so they must not be served until it catches up."""
        return self.last_contact is None or self.clock() - self.last_contact > self.max_staleness_s

    async def follow(self, retry_s: float = 1.0) -> None:
        wait_s = min(self.heartbeat_s, self.max_staleness_s / 3)
        while True:
            try:
                await self.poll_once(wait_s)
            except BusError as exc:
                log.warning("invalidation stream: %s; retrying", exc)
                await asyncio.sleep(retry_s)
            except (KeyError, TypeError, ValueError) as exc:   # an event this edge cannot read
                self.connected = False
                log.error("invalidation stream sent something unreadable: %r; retrying", exc)
                await asyncio.sleep(retry_s)
