"""The disk tier: entries in a diskcache directory, with a tag index in SQLite beside them.

Every method does blocking I/O; call it from a thread (``asyncio.to_thread``). It is
thread-safe, and several processes (edge workers) may share one directory.

Layout of ``directory``::

    cache.db, 00/..       diskcache: key -> Entry.to_bytes(), bounded by size_limit (culling
                          the least recently stored entries)
    tags.sqlite3          the index: entry(key, expires_at), entry_tag(tag, key),
                          purge(name, seq) and meta(generation, floor, schema)
    tags.lock             an advisory lock (flock) serialising writers across processes

The invariant that makes purges correct: a value is never in the cache without its index
rows. Writers hold ``tags.lock`` and always commit index rows before writing a value, and delete
values before deleting their rows, so a crash leaves at worst rows without a value (harmless:
a purge skips them, ``expire`` and ``prune_orphans`` clean them up). Values diskcache culls to
stay within its bound also leave rows behind, which never bring anything back: a get reads only
the value. A get never takes the lock.

Durable across process crashes and restarts. A power loss may reorder the two databases'
unsynced commits; the node should clear the tier when it cannot prove it fresh.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import diskcache

from edgecache.entry import Entry
from edgecache.stores.memory import PURGE_MEMORY

__all__ = ["DiskTier"]

SCHEMA = 1
_BATCH = 500

_CREATE = """
CREATE TABLE entry (key BLOB PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX entry_expires ON entry (expires_at);
CREATE TABLE entry_tag (tag TEXT NOT NULL, key BLOB NOT NULL, PRIMARY KEY (tag, key)) WITHOUT ROWID;
CREATE INDEX entry_tag_key ON entry_tag (key);
CREATE TABLE purge (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX purge_seq ON purge (seq);
"""


class DiskTier:
    """Entries on disk, at most about ``max_bytes`` (diskcache's measure, index excluded)."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()          # this instance's writers (flock is per descriptor)
        self._read_lock = threading.Lock()     # the read connection
        self._cursor = b""                     # where prune_orphans resumes
        self._fd = os.open(self.directory / "tags.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._cache = diskcache.Cache(
                str(self.directory), size_limit=max_bytes, cull_limit=10, statistics=False,
                tag_index=False, eviction_policy="least-recently-stored")
            self._db = self._connect()
            self._rdb = self._connect()
            with self._exclusive():
                self._init_index()
        except BaseException:
            os.close(self._fd)
            raise

    # -- reads (no lock) -----------------------------------------------------------------

    def get(self, key: bytes, now: float) -> Entry | None:
        data = self._cache.get(key, retry=True)
        if data is None:
            return None
        try:
            entry = Entry.from_bytes(data)
            if entry.key != key:
                raise ValueError("entry stored under another key")
        except ValueError:
            self._discard(key, data)           # corrupt or from an unknown format: a miss
            return None
        if entry.is_expired(now):
            self._discard(key, data)
            return None
        return entry

    def keys(self) -> set[bytes]:
        """Every stored key (expired ones included until a read or a sweep drops them)."""
        return {k for k in self._cache.iterkeys() if isinstance(k, bytes)}

    def keys_for_tag(self, tag: str) -> list[bytes]:
        with self._read_lock:
            rows = self._rdb.execute("SELECT key FROM entry_tag WHERE tag = ?", (tag,)).fetchall()
        return [bytes(k) for (k,) in rows]

    def generation(self) -> int:
        with self._read_lock:
            return self._meta(self._rdb, "generation")

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def bytes(self) -> int:
        """diskcache's estimate of its size on disk (database pages plus value files)."""
        return self._cache.volume()

    # -- writes (under the lock) ---------------------------------------------------------

    def put(self, entry: Entry, *, since: int | None = None) -> bool:
        key = entry.key
        data = entry.to_bytes()
        with self._exclusive():
            db = self._db
            if since is not None and self._purged_since(entry, since):
                return False
            if len(data) > self.max_bytes:
                self._cache.delete(key, retry=True)
                with self._transaction():
                    self._forget(db, [key])
                return False
            old = {t for (t,) in db.execute("SELECT tag FROM entry_tag WHERE key = ?", (key,))}
            with self._transaction():
                db.execute("INSERT OR REPLACE INTO entry (key, expires_at) VALUES (?, ?)",
                           (key, entry.created + entry.ttl))
                db.executemany("INSERT OR IGNORE INTO entry_tag (tag, key) VALUES (?, ?)",
                               [(t, key) for t in entry.tags - old])
            self._cache.set(key, data, retry=True)
            if old - entry.tags:                # rows of the replaced value's other tags
                with self._transaction():
                    db.executemany("DELETE FROM entry_tag WHERE tag = ? AND key = ?",
                                   [(t, key) for t in old - entry.tags])
        return True

    def delete(self, key: bytes) -> bool:
        with self._exclusive():
            found = self._cache.delete(key, retry=True)
            with self._transaction():
                self._forget(self._db, [key])
                self._record(["#" + key.hex()])
        return found

    def purge_tags(self, tags: Iterable[str], *, soft: bool = False) -> int:
        """Remove, or mark stale, the entries carrying any of ``tags``.

        Returns how many entries were removed, or with ``soft=True`` newly marked stale.
        """
        tags = sorted(set(tags))
        count = 0
        with self._exclusive():
            db = self._db
            keys: set[bytes] = set()
            for tag in tags:
                keys.update(bytes(k) for (k,) in db.execute(
                    "SELECT key FROM entry_tag WHERE tag = ?", (tag,)))
            ordered = sorted(keys)
            for start in range(0, len(ordered), _BATCH):
                batch = ordered[start:start + _BATCH]
                with self._cache.transact(retry=True):
                    for key in batch:
                        count += self._mark_stale(key) if soft else self._cache.delete(key)
            with self._transaction():
                if not soft:
                    self._forget(db, ordered)
                self._record(tags)
        return count

    def clear(self) -> int:
        with self._exclusive():
            count = self._cache.clear(retry=True)
            with self._transaction():
                generation = self._meta(self._db, "generation") + 1
                for table in ("entry_tag", "entry", "purge"):
                    self._db.execute(f"DELETE FROM {table}")
                self._set_meta(generation=generation, floor=generation)
        return count

    def expire(self, now: float) -> int:
        count = 0
        with self._exclusive():
            keys = [bytes(k) for (k,) in self._db.execute(
                "SELECT key FROM entry WHERE expires_at <= ?", (now,))]
            for start in range(0, len(keys), _BATCH):
                batch = keys[start:start + _BATCH]
                with self._cache.transact(retry=True):
                    count += sum(self._cache.delete(k) for k in batch)
                with self._transaction():
                    self._forget(self._db, batch)
        return count

    def prune_orphans(self, limit: int = 256) -> int:
        """Drop index rows of up to ``limit`` entries no longer on disk (culled); call now and then.

        Scans the index round-robin, ``limit`` keys per call; returns how many keys it dropped.
        """
        with self._exclusive():
            keys = [bytes(k) for (k,) in self._db.execute(
                "SELECT key FROM entry WHERE key > ? ORDER BY key LIMIT ?", (self._cursor, limit))]
            self._cursor = keys[-1] if len(keys) == limit else b""
            gone = [k for k in keys if k not in self._cache]
            if gone:
                with self._transaction():
                    self._forget(self._db, gone)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._cache.close()
            self._db.close()
            with self._read_lock:
                self._rdb.close()
            os.close(self._fd)
            self._fd = -1

    # -- internals -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.directory / "tags.sqlite3", timeout=60, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if self._fd < 0:
                raise ValueError("DiskTier is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _init_index(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is not None and row[0] == SCHEMA:
            return
        # A new (or foreign) index: values already on disk cannot be found by tag, so drop them.
        self._cache.clear(retry=True)
        with self._transaction():
            for table in ("entry", "entry_tag", "purge"):
                db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _CREATE.strip().split(";\n"):
                db.execute(statement)
            self._set_meta(schema=SCHEMA, generation=0, floor=0)

    @staticmethod
    def _meta(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set_meta(self, **values: int) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                             list(values.items()))

    def _forget(self, db: sqlite3.Connection, keys: list[bytes]) -> None:
        params = [(k,) for k in keys]
        db.executemany("DELETE FROM entry_tag WHERE key = ?", params)
        db.executemany("DELETE FROM entry WHERE key = ?", params)

    def _record(self, names: Iterable[str]) -> None:
        """Advance the generation and remember which tags (or ``#key``) it purged."""
        db = self._db
        generation = self._meta(db, "generation") + 1
        db.executemany("INSERT OR REPLACE INTO purge (name, seq) VALUES (?, ?)",
                       [(n, generation) for n in names])
        values = {"generation": generation}
        oldest = generation - PURGE_MEMORY
        if oldest > 0 and generation % 256 == 0:
            db.execute("DELETE FROM purge WHERE seq <= ?", (oldest,))
            values["floor"] = max(oldest, self._meta(db, "floor"))
        self._set_meta(**values)

    def _purged_since(self, entry: Entry, since: int) -> bool:
        db = self._db
        if since < self._meta(db, "floor"):
            return True
        if since >= self._meta(db, "generation"):
            return False
        names = ["#" + entry.key.hex(), *entry.tags]
        marks = ", ".join("?" * len(names))
        row = db.execute(f"SELECT 1 FROM purge WHERE seq > ? AND name IN ({marks}) LIMIT 1",
                         (since, *names)).fetchone()
        return row is not None

    def _mark_stale(self, key: bytes) -> int:
        """Inside a cache transaction: rewrite the value under ``key`` as stale; 1 if it changed."""
        data = self._cache.get(key)
        if data is None:
            return 0
        try:
            entry = Entry.from_bytes(data)
        except ValueError:
            self._cache.delete(key)
            return 0
        if entry.stale:
            return 0
        self._cache.set(key, entry.mark_stale().to_bytes())
        return 1

    def _discard(self, key: bytes, data: object) -> None:
        """Delete the value under ``key`` if it is still ``data`` (not a newer put's)."""
        with self._cache.transact(retry=True):
            if self._cache.get(key) == data:
                self._cache.delete(key)
