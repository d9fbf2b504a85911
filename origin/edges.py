"""Which edges follow the log, what each has applied, and waiting until all have applied an event.

Every fetch of the bus carries an edge's ``Report`` (embedded: the ``GET /v1/events`` query;
NATS: the ping), and the origin notes it as the fetch arrives. An edge's staleness clock counts
from when its latest fetch *began* (``nodes/events.py``), which is before the origin heard it: so
an edge is *safe* for event ``seq`` once it reported ``applied >= seq``, or once
``max_staleness_s`` has passed since the origin last heard it — by then it has either reported
catching up or stopped serving tagged entries. ``wait(seq)`` returns when every known edge
is safe (``?wait=true`` on the webhook and the purge API).

Bounded: at most ``max_edges`` are remembered; one not heard from for ``forget_after_s`` is
forgotten (it has long been fenced, and re-registers when it comes back).

Which edges exist (not what they applied) outlives an origin restart: ``members()`` is saved
whenever it changes and handed back to ``restore`` at start, where each edge counts as heard
just now with nothing applied — pending until it reports again or its bound has passed, so a
restarted origin never acknowledges a purge that an edge it has not heard from yet may ignore.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecache.bus.base import Report

__all__ = ["EdgeRegistry", "EdgeSeen"]


@dataclass(slots=True)
class EdgeSeen:
    edge: str
    applied: int
    heard: float             # origin clock: when its latest fetch arrived
    max_staleness_s: float

    def state(self, seq: int, now: float) -> str:
        if self.applied >= seq:
            return "applied"
        return "fenced" if now > self.heard + self.max_staleness_s else "pending"


class EdgeRegistry:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_edges: int = 10_000,
                 forget_after_s: float = 86400.0) -> None:
        self.clock = clock
        self.max_edges = max_edges
        self.forget_after_s = forget_after_s
        self._edges: dict[str, EdgeSeen] = {}
        self._left: dict[tuple[str, str], None] = {}   # (edge, incarnation) that left: bounded, oldest first
        self._changed = asyncio.Event()

    def restore(self, members: dict[str, float]) -> None:
        now = self.clock()
        for edge, bound in members.items():
            self._edges.setdefault(edge, EdgeSeen(edge, 0, now, bound))

    def members(self) -> dict[str, float]:
        return {s.edge: s.max_staleness_s for s in self._edges.values()}

    def report(self, report: Report) -> bool:
        """Note ``report`` as the fetch that carried it arrives; True when the members changed.
        A report from an incarnation that has left (it was in flight) is ignored."""
        if (report.edge, report.incarnation) in self._left and report.incarnation:
            return False
        now = self.clock()
        seen = self._edges.pop(report.edge, None)
        changed = self._forget(now, force=seen is None and len(self._edges) >= self.max_edges)
        self._edges[report.edge] = EdgeSeen(report.edge, report.applied, now, report.max_staleness_s)
        self._changed.set()
        self._changed = asyncio.Event()
        return changed or seen is None or seen.max_staleness_s != report.max_staleness_s

    def leave(self, edge: str, incarnation: str = "") -> bool:
        """An edge that shut down cleanly (it no longer serves); True if it was known."""
        if incarnation:
            self._left[(edge, incarnation)] = None
            while len(self._left) > self.max_edges:
                del self._left[next(iter(self._left))]
        found = self._edges.pop(edge, None) is not None
        self._changed.set()
        self._changed = asyncio.Event()
        return found

    def _forget(self, now: float, *, force: bool = False) -> bool:
        gone = [n for n, s in self._edges.items() if now - s.heard > self.forget_after_s]
        for name in gone:
            del self._edges[name]
        if force and len(self._edges) >= self.max_edges:   # the least recently heard goes
            del self._edges[next(iter(self._edges))]
            return True
        return bool(gone)

    def snapshot(self, seq: int) -> list[dict[str, Any]]:
        now = self.clock()
        self._forget(now)
        return [{"edge": s.edge, "applied_seq": s.applied, "state": s.state(seq, now)}
                for s in sorted(self._edges.values(), key=lambda s: s.edge)]

    async def wait(self, seq: int, timeout_s: float) -> tuple[bool, list[dict[str, Any]]]:
        """(every edge safe for ``seq``, each edge's state), after at most ``timeout_s``."""
        deadline = self.clock() + timeout_s
        while True:
            changed = self._changed
            edges = self.snapshot(seq)
            pending = [e for e in edges if e["state"] == "pending"]
            now = self.clock()
            if not pending or now >= deadline:
                return not pending, edges
            fence_at = min(self._edges[e["edge"]].heard + self._edges[e["edge"]].max_staleness_s
                           for e in pending)
            try:   # wake at the next report, the next fence, or the deadline
                await asyncio.wait_for(changed.wait(), max(0.0, min(deadline, fence_at) - now) + 0.001)
            except TimeoutError:
                pass
