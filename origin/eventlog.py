"""The origin's durable, ordered invalidation log (SQLite).

Sequence numbers are monotonic and survive a restart; appending with a ``source_id`` already
in the log returns the original event instead of a new one, so a redelivered webhook is
acknowledged with its first sequence number and never applied twice. Old events may be
trimmed; ``first_seq`` tells a reconnecting edge whether the log still reaches back to it.
Synchronous, blocking I/O: the service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

from edgecache.events import Event

__all__ = ["EventLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id TEXT NOT NULL UNIQUE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (
    edge TEXT PRIMARY KEY,
    max_staleness_s REAL NOT NULL
)
"""


class EventLog:
    """Events by sequence number; ``directory`` None keeps them in memory (tests)."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        path = ":memory:" if directory is None else str(Path(directory) / "events.sqlite3")
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")   # an acknowledged event survives a power loss
        self._db.executescript(_SCHEMA)

    def append(self, event: Event) -> tuple[Event, bool]:
        """Store ``event`` under the next sequence number: (the stored event, True), or the
        earlier event of the same ``source_id`` and False."""
        with self._lock:
            row = self._db.execute("SELECT data FROM events WHERE source_id = ?", (event.source_id,)).fetchone()
            if row is not None:
                return Event.from_bytes(row[0]), False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("INSERT INTO events (source_id, data) VALUES (?, ?)",
                                       (event.source_id, b""))
                stored = replace(event, seq=int(cur.lastrowid))
                self._db.execute("UPDATE events SET data = ? WHERE seq = ?", (stored.to_bytes(), stored.seq))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return stored, True

    def find(self, source_id: str) -> Event | None:
        """The event recorded for a delivery id, if the log still holds it."""
        with self._lock:
            row = self._db.execute("SELECT data FROM events WHERE source_id = ?", (source_id,)).fetchone()
        return Event.from_bytes(row[0]) if row else None

    def since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Events after ``seq``, in order, at most ``limit``."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (seq, limit)).fetchall()
        return [Event.from_bytes(r[0]) for r in rows]

    @property
    def last_seq(self) -> int:
        """The newest sequence number ever given (0 before the first), trimmed or not."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (``last_seq + 1`` when empty)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM events").fetchone()
        if row and row[0] is not None:
            return int(row[0])
        return self.last_seq + 1

    def trim(self, keep: int) -> int:
        """Forget all but the newest ``keep`` events; returns how many were dropped.
        Their source ids go too, so a delivery older than the kept window is not recognised."""
        with self._lock:
            cur = self._db.execute("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (keep,))
            return cur.rowcount

    def known_edges(self) -> dict[str, float]:
        """The edges that followed the log (edge id -> its staleness bound), as last remembered."""
        with self._lock:
            return {e: float(b) for e, b in self._db.execute("SELECT edge, max_staleness_s FROM edges")}

    def remember_edges(self, edges: dict[str, float]) -> None:
        """Replace the remembered edges: an origin that restarts still waits for them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM edges")
                self._db.executemany("INSERT INTO edges (edge, max_staleness_s) VALUES (?, ?)", edges.items())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
