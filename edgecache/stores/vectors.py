"""The semantic tier's vector index: unit vectors by cache key, searched only within a scope.

A scope is an opaque digest (tenant, model, prefix version, parameters, earlier turns); a
search never looks outside its scope. Each scope is a partition whose structure follows its
size, chosen by measurement (``python -m bench.semantic_index --compare``):

- **flat** (exact) below ``promote_at`` entries (8,192): rows in one float32 array, searched
  with ``faiss.knn``; removal swaps the last row into the hole (O(1)). Most scopes are small.
- **IVF** (``faiss.IndexIVFFlat``, inner product, hashtable direct map) from ``promote_at``
  entries: k-means lists over the scope's own vectors; deletion really removes
  (``remove_ids``), nothing is tombstoned. ``nlist`` = n/64 rounded down to a power of two,
  128..2,048, and ``nprobe`` = max(16, nlist/64) lists are searched. The lists are retrained
  in a background thread when the scope doubles (until ``nlist`` reaches its cap); a
  scope that shrinks below ``promote_at / 4`` returns to flat. A scope being retrained keeps
  serving from its old structure; changes made meanwhile are replayed onto the new one, in
  rounds outside the lock, and the last few under it.

Every method is synchronous and thread-safe (one lock; a search holds it for well under a
millisecond in a 100k scope): call it from a worker thread, never on the event loop.

Persistence (``edgecache.stores.vectorfile``): ``save()`` writes ``<directory>/vectors.ecv``
whole to a temporary file, fsyncs it and renames it over the old one, so a crash mid-save
leaves the previous file; a missing, truncated or corrupt file loads as an empty index
(logged). A save copies one flat scope or one IVF list at a time under the lock. IVF scopes
are saved with their centroids and lists and load without retraining. After a restart,
``reconcile(alive)`` drops vectors whose cache entry did not survive.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from edgecache.stores import ivf, vectorfile
from edgecache.stores.embed import require_semantic

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FILE_NAME", "Neighbour", "VectorIndex"]

FILE_NAME = "vectors.ecv"
_REPLAY_LOCKED = 256         # changes made during a retrain that may be replayed under the lock
_REPLAY_ROUNDS = 8           # rounds of catching up outside the lock before the rest is under it
_GROWTH = 2                  # retrain IVF lists when a scope has doubled since training
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class Neighbour:
    """A stored entry near a query: its cache key, cosine ``score`` and stored ``vector``."""

    key: bytes
    score: float
    vector: np.ndarray


class _Slot:
    __slots__ = ("key", "part", "pos")

    def __init__(self, key: bytes, part: _Part, pos: int) -> None:
        self.key, self.part, self.pos = key, part, pos


class _Part:
    """One scope: flat rows (``vecs``/``ids``, first ``n`` used) or an IVF index."""

    __slots__ = ("ids", "ivf", "log", "n", "scope", "trained", "vecs")

    def __init__(self, scope: bytes, np: Any, dim: int) -> None:
        self.scope = scope
        self.n = 0
        self.vecs = np.empty((0, dim), dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.ivf: Any = None
        self.trained = 0                        # entries when the IVF lists were trained
        self.log: list[tuple[int, Any]] | None = None   # changes made while being retrained


class VectorIndex:
    """Unit vectors by 16-byte cache key, partitioned by scope; see the module docstring.

    ``directory`` holds ``vectors.ecv`` (None: memory only). ``nprobe`` fixes the IVF lists
    searched per query (default: max(16, nlist/64)). ``threads`` sets faiss's OpenMP threads
    of every thread that calls it (1; None leaves OpenMP's default, all cores).
    Vectors must be unit-norm for scores to be cosines; they are stored as given.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, dim: int = 384, *, promote_at: int = 8_192,
                 nprobe: int | None = None, threads: int | None = 1) -> None:
        require_semantic("faiss", "numpy")
        import faiss
        import numpy

        self._faiss, self._np = faiss, numpy
        self.threads = threads
        self._pin()
        self.dim, self.promote_at, self.nprobe = dim, promote_at, nprobe
        self.path = None if directory is None else Path(directory) / FILE_NAME
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._parts: dict[bytes, _Part] = {}
        self._slots: dict[int, _Slot] = {}      # id -> where the vector is
        self._moved: dict[bytes, int] = {}      # keys whose natural id was taken: key -> id
        self._dirty = False
        self._closed = False
        self._pending: set[bytes] = set()       # scopes waiting for a retrain
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            vectorfile.remove_stale(self.path)
            self._load()

    # -- keys and ids -------------------------------------------------------------------

    def _id_of(self, key: bytes) -> int | None:
        natural = int.from_bytes(key[:8], "little", signed=True)
        slot = self._slots.get(natural)
        if slot is not None and slot.key == key:
            return natural
        return self._moved.get(key)

    def _new_id(self, key: bytes) -> int:
        natural = int.from_bytes(key[:8], "little", signed=True)
        if natural != -1 and natural not in self._slots:
            return natural
        probe = xxhash.xxh3_64_intdigest(key)
        while True:   # a 64-bit collision: pick another free id and remember it
            probe = (probe * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF
            candidate = probe - (1 << 64) if probe >= 1 << 63 else probe
            if candidate != -1 and candidate not in self._slots:
                self._moved[key] = candidate
                return candidate

    def _vector(self, vector: Any) -> np.ndarray:
        v = self._np.ascontiguousarray(vector, dtype=self._np.float32).reshape(-1)
        if v.shape != (self.dim,) or not self._np.isfinite(v).all():
            raise ValueError(f"a vector must be {self.dim} finite floats, got shape {self._np.shape(vector)}")
        return v

    # -- the public operations ------------------------------------------------------------

    def add(self, scope: bytes, key: bytes, vector: np.ndarray) -> None:
        """Store ``vector`` for ``key`` in ``scope``; re-adding a key replaces it (any scope)."""
        if len(key) != 16:
            raise ValueError(f"a key is a 16-byte digest, got {len(key)} bytes")
        if not 0 < len(scope) < 65_536:
            raise ValueError("a scope is 1..65535 bytes")
        v = self._vector(vector)
        self._pin()
        with self._lock:
            self._check_open()
            old = self._id_of(key)
            if old is not None:
                self._drop(old)
            part = self._parts.get(scope)
            if part is None:
                part = self._parts[scope] = _Part(bytes(scope), self._np, self.dim)
            id_ = self._new_id(key)
            self._insert(part, id_, v)
            self._slots[id_] = _Slot(key, part, part.n - 1)
            if part.log is not None:
                part.log.append((id_, v))
            self._dirty = True
            self._maybe_retrain(part)

    def remove(self, keys: Iterable[bytes]) -> int:
        """Remove the vectors of ``keys``; returns how many were stored."""
        self._pin()
        with self._lock:
            self._check_open()
            removed = 0
            for key in keys:
                id_ = self._id_of(key)
                if id_ is not None:
                    self._drop(id_)
                    removed += 1
            self._dirty = self._dirty or removed > 0
            return removed

    def search(self, scope: bytes, vector: np.ndarray, k: int = 4, min_score: float = 0.0) -> list[Neighbour]:
        """Up to ``k`` entries of ``scope`` nearest ``vector`` with score >= ``min_score``, best first."""
        q = self._vector(vector).reshape(1, -1)
        self._pin()
        with self._lock:
            self._check_open()
            part = self._parts.get(scope)
            if part is None or part.n == 0 or k < 1:
                return []
            if part.ivf is None:
                k = min(k, part.n)
                scores, rows = self._faiss.knn(q, part.vecs[: part.n], k, metric=self._faiss.METRIC_INNER_PRODUCT)
                found = [(float(s), int(part.ids[r]), part.vecs[r].copy()) for s, r in zip(scores[0], rows[0], strict=True)
                         if r >= 0]
            else:
                scores, ids = part.ivf.search(q, k)
                found = [(float(s), int(i), part.ivf.reconstruct(int(i))) for s, i in zip(scores[0], ids[0], strict=True)
                         if i != -1]
            return [Neighbour(self._slots[i].key, s, v) for s, i, v in found if s >= min_score]

    def scope_of(self, key: bytes) -> bytes | None:
        with self._lock:
            id_ = self._id_of(key)
            return None if id_ is None else self._slots[id_].part.scope

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return isinstance(key, bytes) and self._id_of(key) is not None

    def keys(self) -> list[bytes]:
        with self._lock:
            return [slot.key for slot in self._slots.values()]

    @property
    def scopes(self) -> int:
        return len(self._parts)

    def memory_bytes(self) -> int:
        """An estimate of the memory held: vectors, ids, IVF lists and centroids, Python maps."""
        with self._lock:
            total = len(self._slots) * 200 + len(self._moved) * 120   # slot object, dict entry, key
            for part in self._parts.values():
                total += 300 + len(part.scope)
                if part.ivf is None:
                    total += part.vecs.nbytes + part.ids.nbytes
                else:   # codes and ids in growing lists (~1.3x), the hashtable direct map, centroids
                    total += part.n * ((4 * self.dim + 8) * 13 // 10 + 56) + part.ivf.nlist * (4 * self.dim + 32)
            return total

    def reconcile(self, alive: Callable[[bytes], bool]) -> int:
        """Remove every vector whose key ``alive(key)`` denies (its cache entry is gone)."""
        dead = [key for key in self.keys() if not alive(key)]
        return self.remove(dead)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no scope is waiting for or undergoing a retrain; False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._pending and not any(
                p.log is not None for p in self._parts.values()), timeout)

    def close(self) -> None:
        """Finish a running retrain, save (when there is a directory) and refuse further use."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self.path is not None:
            self.save()

    def _pin(self) -> None:
        """Set faiss's OpenMP threads for the calling thread: OpenMP keeps the setting per
        thread, and every ``asyncio.to_thread`` worker would otherwise use all cores."""
        if self.threads is not None:
            self._faiss.omp_set_num_threads(self.threads)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VectorIndex is closed")

    # -- partitions (called with the lock held) ---------------------------------------------

    def _insert(self, part: _Part, id_: int, v: np.ndarray) -> None:
        if part.ivf is not None:
            part.ivf.add_with_ids(v.reshape(1, -1), self._np.array([id_], dtype=self._np.int64))
            part.n += 1
            return
        if part.n == len(part.ids):
            self._resize(part, part.n + part.n // 4 + 1)
        part.vecs[part.n] = v
        part.ids[part.n] = id_
        part.n += 1

    def _resize(self, part: _Part, capacity: int) -> None:
        np = self._np
        vecs = np.empty((capacity, self.dim), dtype=np.float32)
        ids = np.empty(capacity, dtype=np.int64)
        vecs[: part.n] = part.vecs[: part.n]
        ids[: part.n] = part.ids[: part.n]
        part.vecs, part.ids = vecs, ids

    def _drop(self, id_: int) -> None:
        slot = self._slots.pop(id_)
        self._moved.pop(slot.key, None)
        part = slot.part
        if part.ivf is not None:
            part.ivf.remove_ids(self._np.array([id_], dtype=self._np.int64))
            part.n -= 1
        else:
            last = part.n - 1
            if slot.pos != last:   # the last row fills the hole
                part.vecs[slot.pos] = part.vecs[last]
                part.ids[slot.pos] = moved = int(part.ids[last])
                self._slots[moved].pos = slot.pos
            part.n = last
            if len(part.ids) > 8 and part.n < len(part.ids) // 2:
                self._resize(part, part.n + part.n // 4 + 1)
        if part.log is not None:
            part.log.append((id_, None))
        elif part.n == 0:
            del self._parts[part.scope]
        elif part.ivf is not None and part.n < self.promote_at // 4:
            self._to_flat(part)

    def _to_flat(self, part: _Part) -> None:
        ids, vecs = ivf.contents(part.ivf)
        part.ivf, part.trained, part.n = None, 0, len(ids)
        part.vecs, part.ids = vecs, ids
        for pos, id_ in enumerate(ids.tolist()):
            self._slots[id_].pos = pos

    def _maybe_retrain(self, part: _Part) -> None:
        if part.log is not None or part.scope in self._pending:
            return
        if part.ivf is None:
            due = part.n >= self.promote_at
        else:
            due = part.n >= _GROWTH * part.trained and ivf.nlist_for(part.n) > part.ivf.nlist
        if due:
            self._pending.add(part.scope)
            if self._worker is None:
                self._worker = threading.Thread(target=self._retrain_loop, name="edgecache-vectors-retrain",
                                                daemon=True)
                self._worker.start()
            self._wake.notify_all()

    # -- retraining (the worker thread) -----------------------------------------------------

    def _retrain_loop(self) -> None:
        self._pin()
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                scope = self._pending.pop()
                part = self._parts.get(scope)
                if part is None or part.n < self.promote_at:
                    self._wake.notify_all()
                    continue
                if part.ivf is None:
                    ids, vecs = part.ids[: part.n].copy(), part.vecs[: part.n].copy()
                else:
                    ids, vecs = ivf.contents(part.ivf)
                part.log = []
            try:
                index = self._build(vecs, ids)
            except Exception:   # keep serving from the old structure
                log.exception("retraining the vector lists of a scope with %d entries failed", len(ids))
                index = None
            trained = len(ids)
            del ids, vecs
            for round_ in range(_REPLAY_ROUNDS + 1):   # catch up with the changes made meanwhile
                with self._wake:
                    changes, part.log = part.log or [], []
                    if index is None or len(changes) <= _REPLAY_LOCKED or round_ == _REPLAY_ROUNDS:
                        part.log = None
                        if index is not None:
                            ivf.replay(index, changes)
                            self._swap_in(part, index, trained)
                            self._maybe_retrain(part)    # it may have doubled meanwhile
                        if part.n == 0 and self._parts.get(part.scope) is part:
                            del self._parts[part.scope]
                        self._wake.notify_all()
                        break
                ivf.replay(index, changes)

    def _build(self, vecs: np.ndarray, ids: np.ndarray) -> Any:
        """The new IVF index of a scope being retrained (outside the lock)."""
        return ivf.train(vecs, ids, self.nprobe)

    def _swap_in(self, part: _Part, index: Any, trained: int) -> None:
        np = self._np
        part.ivf, part.trained = index, trained
        part.vecs, part.ids = np.empty((0, self.dim), dtype=np.float32), np.empty(0, dtype=np.int64)
        part.n = int(index.ntotal)
        if part.n < self.promote_at // 4:
            self._to_flat(part)

    # -- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        """Write the index to ``vectors.ecv`` atomically (no-op without changes or directory)."""
        if self.path is None:
            return
        with self._save_lock:
            with self._lock:
                if not self._dirty:
                    return
                self._dirty = False
                scopes = list(self._parts)
            self._pin()
            try:
                vectorfile.write(self.path, self.dim, (self._snapshot(scope) for scope in scopes))
            except BaseException:
                self._dirty = True
                raise

    def _snapshot(self, scope: bytes) -> vectorfile.Partition | None:
        """A copy of one scope, taking the lock per IVF list so searches never wait long."""
        for _ in range(3):
            with self._lock:
                part = self._parts.get(scope)
                if part is None or part.n == 0:
                    return None
                if part.ivf is None:
                    block = vectorfile.Block(0, self._keys_of(part.ids[: part.n]), part.ids[: part.n].copy(),
                                             part.vecs[: part.n].copy())
                    return vectorfile.Partition(scope, vectorfile.FLAT, 0, None, [block])
                index = part.ivf
                centroids = ivf.centroids(index)
            blocks = []
            for lst in range(index.nlist):
                with self._lock:
                    if part.ivf is not index or self._parts.get(scope) is not part:
                        break   # retrained or emptied meanwhile: start this scope again
                    ids, vecs = ivf.list_copy(index, lst)
                    if len(ids):
                        blocks.append(vectorfile.Block(lst, self._keys_of(ids), ids, vecs))
            else:
                return vectorfile.Partition(scope, vectorfile.IVF, part.trained, centroids, blocks)
        self._dirty = True   # it kept changing under us: leave it to the next save
        return None

    def _keys_of(self, ids: np.ndarray) -> bytes:
        return b"".join([self._slots[i].key for i in ids.tolist()])

    def _load(self) -> None:
        assert self.path is not None
        try:
            for part in vectorfile.read(self.path, self.dim):
                self._adopt(part)
        except FileNotFoundError:
            return
        except Exception as exc:   # corrupt, truncated, another format: start empty
            log.warning("vector index %s is unreadable (%s); starting empty", self.path, exc)
            self._parts.clear()
            self._slots.clear()
            self._moved.clear()
        self._dirty = False

    def _adopt(self, record: vectorfile.Partition) -> None:
        """Register a loaded scope. A key already loaded (it moved scope while the file was
        being written) keeps its first copy."""
        if record.scope in self._parts:
            raise ValueError("a scope appears twice")
        part = _Part(record.scope, self._np, self.dim)
        kept = []
        for block in record.blocks:
            fresh = [i for i, id_ in enumerate(block.ids.tolist()) if id_ not in self._slots]
            if len(fresh) < len(block.ids):
                block = vectorfile.Block(block.list_no, b"".join(block.keys[16 * i: 16 * i + 16] for i in fresh),
                                         block.ids[fresh], block.vectors[fresh])
            for i, id_ in enumerate(block.ids.tolist()):
                key = block.keys[16 * i: 16 * i + 16]
                self._slots[id_] = _Slot(key, part, part.n + i)
                if id_ != int.from_bytes(key[:8], "little", signed=True):
                    self._moved[key] = id_
            part.n += len(block.ids)
            kept.append(block)
        if record.kind == vectorfile.IVF:
            assert record.centroids is not None
            part.ivf = ivf.from_lists(record.centroids, ((b.list_no, b.ids, b.vectors) for b in kept), self.nprobe)
            part.trained = record.trained
        elif kept:
            part.ids = self._np.concatenate([b.ids for b in kept])
            part.vecs = self._np.concatenate([b.vectors for b in kept])
        if part.n:
            self._parts[part.scope] = part
