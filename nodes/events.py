"""The edge follows the origin's invalidation log and applies every event, in order, once.

The last applied sequence number is kept in the data folder, so a restarted edge resumes
where it stopped; when the origin's log no longer reaches back that far, the edge purges
everything (it cannot know what it missed) and says so in its log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

__all__ = ["EventFollower"]

log = logging.getLogger("edgecache.node.events")


class EventFollower:
    """Long-polls ``GET /v1/events`` and hands each event to ``apply``."""

    def __init__(self, session: aiohttp.ClientSession, token: str, directory: str,
                 apply: Callable[[dict[str, Any]], Awaitable[None]],
                 purge_all: Callable[[], Awaitable[None]], *, max_staleness_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self._path = Path(directory) / "applied_seq"
        self._apply = apply
        self._purge_all = purge_all
        self.applied = 0
        self.connected = False
        self.max_staleness_s = max_staleness_s
        self.clock = clock
        self.last_contact: float | None = None   # when the origin last answered (clock seconds)
        self.progress = asyncio.Event()   # set whenever ``applied`` moves (tests and /healthz)

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
        """One request to the origin; returns how many events were applied."""
        async with self._session.get("/v1/events", params={"after": str(self.applied), "timeout": str(wait_s)},
                                     headers=self._headers,
                                     timeout=aiohttp.ClientTimeout(total=wait_s + 10)) as resp:
            resp.raise_for_status()
            page = orjson.loads(await resp.read())
        self.connected = True
        self.last_contact = self.clock()
        if page["first_seq"] > self.applied + 1 and page["last_seq"] > self.applied:
            log.warning("the origin's event log starts at %d, after %d: purging everything",
                        page["first_seq"], self.applied)
            await self._purge_all()
            await self._advance(page["first_seq"] - 1)
        applied = 0
        for event in page["events"]:
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
        """True when the stream has been silent longer than ``max_staleness_s``: tagged entries
        may have been purged meanwhile, so they must not be served until the edge catches up."""
        return self.last_contact is None or self.clock() - self.last_contact > self.max_staleness_s

    async def follow(self, wait_s: float = 20.0, retry_s: float = 1.0) -> None:
        wait_s = min(wait_s, self.max_staleness_s / 3)   # every answer, even an empty one, is a heartbeat
        while True:
            try:
                await self.poll_once(wait_s)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                self.connected = False
                log.warning("invalidation stream: %r; retrying", exc)
                await asyncio.sleep(retry_s)
