"""The embedded bus: edges long-poll the origin's log over HTTP (``GET /v1/events``).

No broker to run: the default of ``make up``. Each poll carries the edge's report (``edge``,
``after`` = applied, ``max_staleness_s``) and is answered as soon as an event follows ``after``
or after ``timeout`` seconds with none.
"""

from __future__ import annotations

import aiohttp
import orjson

from edgecache.bus.base import Batch, BusError

__all__ = ["HttpSubscription"]


class HttpSubscription:
    """``session`` has the origin's base URL; ``token`` is the node token."""

    def __init__(self, session: aiohttp.ClientSession, token: str, edge: str, max_staleness_s: float,
                 incarnation: str = "") -> None:
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self.edge = edge
        self.max_staleness_s = max_staleness_s
        self.incarnation = incarnation

    async def start(self) -> None:
        pass

    async def fetch(self, after: int, wait_s: float) -> Batch:
        params = {"after": str(after), "timeout": str(wait_s), "edge": self.edge,
                  "max_staleness_s": str(self.max_staleness_s), "incarnation": self.incarnation}
        try:
            async with self._session.get("/v1/events", params=params, headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=wait_s + 10)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise BusError(f"GET /v1/events: {resp.status} {body[:200]!r}")
            page = orjson.loads(body)
            return Batch(events=list(page["events"]), first_seq=int(page["first_seq"]),
                         last_seq=int(page["last_seq"]))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BusError(f"GET /v1/events: {exc!r}") from exc

    async def acknowledge(self, applied: int) -> None:
        pass   # the next poll's ``after`` says it

    async def leave(self) -> None:
        try:
            async with self._session.post("/v1/events/leave", json={"edge": self.edge, "incarnation": self.incarnation}, headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            pass   # the origin counts it fenced after its staleness bound instead

    async def close(self) -> None:
        pass
