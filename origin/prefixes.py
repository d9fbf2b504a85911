"""The prefix registry: the origin's durable source of truth for static prompt prefixes.

Held in memory for expansion on every request, written through to SQLite so it survives a
restart. The methods are synchronous and do blocking I/O: the service calls the writers
through ``asyncio.to_thread`` and reads the in-memory map directly.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

from edgecache.prefix import Prefix

__all__ = ["PrefixRegistry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prefixes (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    version TEXT NOT NULL,
    tags TEXT NOT NULL,
    updated REAL NOT NULL,
    tenants TEXT NOT NULL DEFAULT ''
)
"""


class PrefixRegistry:
    """Prefixes by id; ``directory`` None keeps them in memory only."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._prefixes: dict[str, Prefix] = {}
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(Path(directory) / "prefixes.sqlite3", check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(prefixes)")}
            if "tenants" not in columns:   # a registry written before prefixes had tenant lists
                self._db.execute("ALTER TABLE prefixes ADD COLUMN tenants TEXT NOT NULL DEFAULT ''")
            for row in self._db.execute("SELECT id, text, version, tags, updated, tenants FROM prefixes"):
                pid, text, version, tags, updated, tenants = row
                self._prefixes[pid] = Prefix(id=pid, text=text, version=version,
                                             tags=frozenset(t for t in tags.split(" ") if t), updated=updated,
                                             tenants=frozenset(t for t in tenants.split(" ") if t))

    @property
    def current(self) -> Mapping[str, Prefix]:
        """The prefixes now (a read-only view; expansion reads it on the loop)."""
        return self._prefixes

    def get(self, prefix_id: str) -> Prefix | None:
        return self._prefixes.get(prefix_id)

    def put(self, prefix: Prefix) -> bool:
        """Create or update; True when the text, tags or tenants changed (a change to announce)."""
        with self._lock:
            old = self._prefixes.get(prefix.id)
            if old is not None and old.version == prefix.version and old.tags == prefix.tags \
                    and old.tenants == prefix.tenants:
                return False
            if self._db is not None:
                self._db.execute(
                    "INSERT INTO prefixes (id, text, version, tags, updated, tenants) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET text=excluded.text, version=excluded.version, "
                    "tags=excluded.tags, updated=excluded.updated, tenants=excluded.tenants",
                    (prefix.id, prefix.text, prefix.version, " ".join(sorted(prefix.tags)), prefix.updated,
                     " ".join(sorted(prefix.tenants))))
            self._prefixes = {**self._prefixes, prefix.id: prefix}
            return True

    def delete(self, prefix_id: str) -> Prefix | None:
        with self._lock:
            old = self._prefixes.get(prefix_id)
            if old is None:
                return None
            if self._db is not None:
                self._db.execute("DELETE FROM prefixes WHERE id = ?", (prefix_id,))
            self._prefixes = {k: v for k, v in self._prefixes.items() if k != prefix_id}
            return old

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
