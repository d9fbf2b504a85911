"""The semantic tier's vector index: unit vectors by cache key, searched only within a scope.

A scope is an opaque digest (tenant, model, prefix version, parameters, earlier turns); a
search never looks outside its scope. Each scope is a partition whose structure follows its
size, chosen by measurement (bench/semantic_index.py, figures in bench/README.md):

- **flat** (exact) below ``promote_at`` entries (8,192): rows in one float32 array, searched
  with ``faiss.knn``; removal swaps the last row into the hole (O(1)). Most scopes are small.
- **IVF** (``faiss.IndexIVFFlat``, inner product, hashtable direct map) from ``promote_at``
  entries: k-means lists over the scope's own vectors, ``nprobe`` lists searched; deletion
  really removes (``remove_ids``), nothing is tombstoned. ``nlist`` = n/64 rounded down to a
  power of two, 128..2,048; the lists are retrained in a background thread when the scope
  grows fourfold (until ``nlist`` reaches its cap), and a scope that shrinks below
  ``promote_at / 4`` returns to flat. While a scope is retrained it keeps serving from its
  old structure; changes made meanwhile are replayed onto the new one.

Every method is synchronous and thread-safe (one lock; a search holds it for well under a
millisecond in a 100k scope): call it from a worker thread, never on the event loop.

Persistence: ``save()`` writes ``<directory>/vectors.ecv`` whole, to a temporary file that is
fsynced and renamed over the old one, so a crash mid-save leaves the previous file. The file
ends with an XXH3-64 of its contents; a missing, truncated or corrupt file loads as an empty
index (logged). Scopes are written one at a time, each under the lock only while copied.
After a restart, ``reconcile(alive)`` drops vectors whose cache entry did not survive.

File layout (little-endian): ``b"ECVECS01"``, u32 dim; per scope: u16 scope length, scope,
u8 kind (0 flat, 1 IVF), u64 n, u64 trained size, n 16-byte keys, n int64 ids, then flat: n x
dim float32 rows, IVF: u64 length and a ``faiss.serialize_index`` blob; then u64 scopes,
u64 entries, and the XXH3-64 digest of all the bytes before it.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from edgecache.stores.embed import require_semantic

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FILE_NAME", "Neighbour", "VectorIndex"]

FILE_NAME = "vectors.ecv"
_MAGIC = b"ECVECS01"
_FLAT, _IVF = 0, 1
_MAX_NLIST = 2_048
_REPLAY_LOCKED = 256         # changes made during a retrain that may be replayed under the lock
_REPLAY_ROUNDS = 8           # rounds of catching up outside the lock before the rest is under it
_GROWTH = 4                  # retrain IVF lists when a scope has grown this much since training
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

    ``directory`` holds ``vectors.ecv`` (None: memory only). ``nprobe`` IVF lists are searched
    per query (16). ``threads`` sets faiss's OpenMP threads for the process (1; None leaves it).
    Vectors must be unit-norm for scores to be cosines; they are stored as given.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, dim: int = 384, *, promote_at: int = 8_192,
                 nprobe: int = 16, threads: int | None = 1) -> None:
        require_semantic("faiss", "numpy")
        import faiss
        import numpy

        if threads is not None:
            faiss.omp_set_num_threads(threads)
        self._faiss, self._np = faiss, numpy
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
            for stale in self.path.parent.glob(f".{FILE_NAME}.*.tmp"):
                stale.unlink(missing_ok=True)
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
        ids, vecs = self._ivf_contents(part.ivf)
        part.ivf, part.trained, part.n = None, 0, len(ids)
        part.vecs, part.ids = vecs, ids
        for pos, id_ in enumerate(ids.tolist()):
            self._slots[id_].pos = pos

    def _ivf_contents(self, ivf: Any) -> tuple[np.ndarray, np.ndarray]:
        np, faiss, inv = self._np, self._faiss, ivf.invlists
        ids, vecs = [np.empty(0, dtype=np.int64)], [np.empty((0, self.dim), dtype=np.float32)]
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:
                ids.append(faiss.rev_swig_ptr(inv.get_ids(lst), size).copy())
                codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size)
                vecs.append(codes.view(np.float32).reshape(size, self.dim).copy())
        return np.concatenate(ids), np.concatenate(vecs)

    def _maybe_retrain(self, part: _Part) -> None:
        if part.log is not None or part.scope in self._pending:
            return
        if part.ivf is None:
            due = part.n >= self.promote_at
        else:
            due = part.n >= _GROWTH * part.trained and _nlist(part.n) > part.ivf.nlist
        if due:
            self._pending.add(part.scope)
            if self._worker is None:
                self._worker = threading.Thread(target=self._retrain_loop, name="edgecache-vectors-retrain",
                                                daemon=True)
                self._worker.start()
            self._wake.notify_all()

    # -- retraining (the worker thread) -----------------------------------------------------

    def _retrain_loop(self) -> None:
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
                    ids, vecs = self._ivf_contents(part.ivf)
                part.log = []
            try:
                ivf = self._train(vecs)
                ivf.add_with_ids(vecs, ids)
            except Exception:   # keep serving from the old structure
                log.exception("retraining the vector lists of a scope with %d entries failed", len(ids))
                ivf = None
            trained = len(ids)
            del ids, vecs
            for round_ in range(_REPLAY_ROUNDS + 1):   # catch up with the changes made meanwhile
                with self._wake:
                    changes, part.log = part.log or [], []
                    if ivf is None or len(changes) <= _REPLAY_LOCKED or round_ == _REPLAY_ROUNDS:
                        part.log = None
                        if ivf is not None:
                            _replay(ivf, changes, self._np)
                            self._swap_in(part, ivf, trained)
                        if part.n == 0 and self._parts.get(part.scope) is part:
                            del self._parts[part.scope]
                        self._wake.notify_all()
                        break
                _replay(ivf, changes, self._np)

    def _train(self, vecs: np.ndarray) -> Any:
        faiss, np = self._faiss, self._np
        nlist = _nlist(len(vecs))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        ivf.cp.min_points_per_centroid = 1
        ivf.cp.max_points_per_centroid = 40
        sample = np.random.default_rng(len(vecs)).choice(len(vecs), min(len(vecs), 40 * nlist), replace=False)
        ivf.train(vecs[np.sort(sample)])
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.nprobe = self.nprobe
        return ivf

    def _swap_in(self, part: _Part, ivf: Any, trained: int) -> None:
        np = self._np
        part.ivf, part.trained = ivf, trained
        part.vecs, part.ids = np.empty((0, self.dim), dtype=np.float32), np.empty(0, dtype=np.int64)
        part.n = int(ivf.ntotal)
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
            tmp = self.path.parent / f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                self._write(tmp, scopes)
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
            except BaseException:
                self._dirty = True
                tmp.unlink(missing_ok=True)
                raise

    def _write(self, tmp: Path, scopes: list[bytes]) -> None:
        digest = xxhash.xxh3_64()
        written_scopes = entries = 0
        with open(tmp, "wb") as f:
            def put(data: Any) -> None:
                digest.update(data)
                f.write(data)

            put(_MAGIC + struct.pack("<I", self.dim))
            for scope in scopes:
                with self._lock:
                    snapshot = self._snapshot(scope)
                if snapshot is None:
                    continue
                kind, keys, ids, trained, body = snapshot
                put(struct.pack("<H", len(scope)) + scope + struct.pack("<BQQ", kind, len(ids), trained))
                put(keys)
                put(ids.tobytes())
                if kind == _IVF:
                    put(struct.pack("<Q", body.nbytes))
                put(memoryview(body).cast("B"))
                written_scopes += 1
                entries += len(ids)
            put(struct.pack("<QQ", written_scopes, entries))
            f.write(struct.pack("<Q", digest.intdigest()))
            f.flush()
            os.fsync(f.fileno())

    def _snapshot(self, scope: bytes) -> tuple[int, bytes, np.ndarray, int, np.ndarray] | None:
        part = self._parts.get(scope)
        if part is None or part.n == 0:
            return None
        if part.ivf is None:
            ids, body, kind = part.ids[: part.n].copy(), part.vecs[: part.n].copy(), _FLAT
        else:
            ids, body, kind = self._ivf_ids(part.ivf), self._faiss.serialize_index(part.ivf), _IVF
        keys = b"".join(self._slots[i].key for i in ids.tolist())
        return kind, keys, ids, part.trained, body

    def _adopt(self, part: _Part, keys: bytes, ids: np.ndarray) -> None:
        """Register a loaded scope; a key already loaded elsewhere (it moved scope while the
        file was written) keeps its first copy."""
        seen = [i for i, id_ in enumerate(ids.tolist()) if id_ in self._slots]
        if seen:
            if part.ivf is not None:
                part.ivf.remove_ids(ids[seen])
                part.n = int(part.ivf.ntotal)
            keep = self._np.ones(len(ids), dtype=bool)
            keep[seen] = False
            keys = b"".join(keys[16 * i: 16 * i + 16] for i in range(len(ids)) if keep[i])
            ids = ids[keep]
            if part.ivf is None:
                part.vecs, part.ids, part.n = part.vecs[keep], ids, len(ids)
        if part.n == 0:
            return
        self._parts[part.scope] = part
        for i, id_ in enumerate(ids.tolist()):
            key = keys[16 * i: 16 * i + 16]
            self._slots[id_] = _Slot(key, part, i)
            if id_ != int.from_bytes(key[:8], "little", signed=True):
                self._moved[key] = id_

    def _ivf_ids(self, ivf: Any) -> np.ndarray:
        np, faiss, inv = self._np, self._faiss, ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(ivf.nlist) if inv.list_size(lst)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _load(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self._read(memoryview(mm))
        except FileNotFoundError:
            return
        except Exception as exc:   # corrupt, truncated, another format: start empty
            log.warning("vector index %s is unreadable (%s); starting empty", self.path, exc)
            self._parts.clear()
            self._slots.clear()
            self._moved.clear()
        self._dirty = False

    def _read(self, buf: memoryview) -> None:
        np, faiss, dim = self._np, self._faiss, self.dim
        try:
            if len(buf) < len(_MAGIC) + 28 or bytes(buf[:8]) != _MAGIC:
                raise ValueError("not a vector index file")
            (stored,) = struct.unpack_from("<Q", buf, len(buf) - 8)
            if xxhash.xxh3_64_intdigest(buf[:-8]) != stored:
                raise ValueError("checksum mismatch")
            if struct.unpack_from("<I", buf, 8)[0] != dim:
                raise ValueError(f"vectors of another dimension (want {dim})")
            pos, end, entries = 12, len(buf) - 24, 0
            while pos < end:
                (length,) = struct.unpack_from("<H", buf, pos)
                scope = bytes(buf[pos + 2: pos + 2 + length])
                kind, n, trained = struct.unpack_from("<BQQ", buf, pos + 2 + length)
                pos += 2 + length + 17
                keys = bytes(buf[pos: pos + 16 * n])
                ids = np.frombuffer(buf, np.int64, n, pos + 16 * n).copy()
                pos += 24 * n
                part = _Part(scope, np, dim)
                if kind == _FLAT:
                    part.vecs = np.frombuffer(buf, np.float32, n * dim, pos).reshape(n, dim).copy()
                    part.ids, part.n = ids, n
                    pos += 4 * n * dim
                elif kind == _IVF:
                    (size,) = struct.unpack_from("<Q", buf, pos)
                    part.ivf = faiss.deserialize_index(np.frombuffer(buf, np.uint8, size, pos + 8).copy())
                    part.ivf.nprobe, part.n, part.trained = self.nprobe, int(part.ivf.ntotal), trained
                    pos += 8 + size
                else:
                    raise ValueError(f"unknown scope kind {kind}")
                if part.n != n or pos > end or scope in self._parts:
                    raise ValueError("inconsistent scope record")
                entries += n
                self._adopt(part, keys, ids)
            if pos != end or struct.unpack_from("<QQ", buf, end) != (len(self._parts), entries):
                raise ValueError("inconsistent totals")
        finally:
            buf.release()


def _replay(ivf: Any, changes: list[tuple[int, Any]], np: Any) -> None:
    """Apply logged changes (id, vector) / (id, None: removed) in order, adds in runs."""
    run: list[tuple[int, Any]] = []
    for change in [*changes, (None, None)]:
        if change[1] is not None:
            run.append(change)
            continue
        if run:
            ivf.add_with_ids(np.stack([v for _, v in run]), np.array([i for i, _ in run], dtype=np.int64))
            run = []
        if change[0] is not None:
            ivf.remove_ids(np.array([change[0]], dtype=np.int64))


def _nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: n/64 rounded down to a power of two, within 128..2048."""
    return max(128, min(_MAX_NLIST, 1 << max(0, (n // 64).bit_length() - 1)))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
