"""The vector index's file, ``vectors.ecv``: written whole and atomically, read back or refused.

``write`` streams partitions (one scope each) to a temporary file beside the target, fsyncs
it, renames it over the target and fsyncs the directory: a crash at any point leaves either
the old file or the new one. ``read`` checks the magic, the dimension and an XXH3-64 of the
whole file before it yields anything, and raises ``ValueError`` on any inconsistency, so a
truncated or damaged file is refused as a whole (the index then starts empty).

Layout, little-endian::

    b"ECVECS02"  u32 dim
    per partition:
        u16 scope length, scope, u8 kind (0 flat, 1 IVF), u64 trained size, u32 nlist,
        IVF only: nlist x dim float32 centroids
        blocks: u32 list number, u32 count, count x 16-byte keys, count x int64 ids,
                count x dim float32 vectors; ended by a u32 0xFFFFFFFF
    u64 partitions, u64 entries (blocks' counts summed), u64 XXH3-64 of every byte before it

An IVF partition stores its centroids and each list as a block, so loading places every vector
back in its list without retraining or reassigning (``InvertedLists.add_entries``).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FLAT", "IVF", "MAGIC", "Block", "Partition", "read", "remove_stale", "write"]

MAGIC = b"ECVECS02"
FLAT, IVF = 0, 1
_END = 0xFFFF_FFFF
_HEAD = struct.Struct("<BQI")
_BLOCK = struct.Struct("<II")


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    """``count`` entries: 16-byte ``keys`` back to back, int64 ``ids``, float32 ``vectors``."""

    list_no: int
    keys: bytes
    ids: np.ndarray
    vectors: np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class Partition:
    """One scope: ``kind`` FLAT or IVF (with ``centroids``), and its entries in ``blocks``."""

    scope: bytes
    kind: int
    trained: int
    centroids: np.ndarray | None
    blocks: list[Block]


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"


def remove_stale(path: Path) -> None:
    """Delete temporary files a crashed ``write`` of ``path`` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write(path: Path, dim: int, partitions: Iterable[Partition | None]) -> int:
    """Write ``partitions`` (None entries are skipped) to ``path`` atomically; returns entries."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            entries = _write(f, dim, partitions)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return entries


def _write(f: BinaryIO, dim: int, partitions: Iterable[Partition | None]) -> int:
    digest = xxhash.xxh3_64()

    def put(data: Any) -> None:
        view = memoryview(data).cast("B")
        digest.update(view)
        f.write(view)

    put(MAGIC + struct.pack("<I", dim))
    count = entries = 0
    for part in partitions:
        if part is None:
            continue
        nlist = 0 if part.centroids is None else len(part.centroids)
        put(struct.pack("<H", len(part.scope)) + part.scope + _HEAD.pack(part.kind, part.trained, nlist))
        if part.centroids is not None:
            put(part.centroids.astype("<f4", copy=False).tobytes())
        for block in part.blocks:
            n = len(block.ids)
            if len(block.keys) != 16 * n or block.vectors.shape != (n, dim):
                raise ValueError("a block's keys, ids and vectors differ in length")
            put(_BLOCK.pack(block.list_no, n) + block.keys)
            put(block.ids.astype("<i8", copy=False).tobytes())
            put(block.vectors.astype("<f4", copy=False).tobytes())
            entries += n
        put(struct.pack("<I", _END))
        count += 1
    put(struct.pack("<QQ", count, entries))
    f.write(struct.pack("<Q", digest.intdigest()))
    return entries


def read(path: Path, dim: int) -> Iterator[Partition]:
    """The partitions of ``path``, each a copy; ``FileNotFoundError`` when there is no file,
    ``ValueError`` when it is not a whole, undamaged index of ``dim``-float vectors (checked
    before the first partition is yielded, except for structural errors found while parsing)."""
    import numpy as np

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC) + 4 + 24:
            raise ValueError(f"{path} is too short to be a vector index")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:8] != MAGIC:
                raise ValueError(f"{path} is not a vector index (or another version)")
            with memoryview(mm) as whole, whole[:-8] as body:
                actual = xxhash.xxh3_64_intdigest(body)
            if actual != struct.unpack_from("<Q", mm, size - 8)[0]:
                raise ValueError(f"{path}: checksum mismatch")
            if struct.unpack_from("<I", mm, 8)[0] != dim:
                raise ValueError(f"{path} holds vectors of another dimension (want {dim})")
            yield from _parse(mm, size - 24, dim, np)


def _parse(mm: mmap.mmap, end: int, dim: int, np: Any) -> Iterator[Partition]:
    pos, count, entries = 12, 0, 0

    def take(n: int) -> int:
        nonlocal pos
        start, pos = pos, pos + n
        if pos > end:
            raise ValueError("a record runs past the end of the file")
        return start

    def array(dtype: str, n: int) -> Any:
        width = np.dtype(dtype).itemsize
        return np.frombuffer(mm, dtype, n, take(width * n)).copy()

    while pos < end:
        (length,) = struct.unpack_from("<H", mm, take(2))
        scope = mm[take(length): pos]
        kind, trained, nlist = _HEAD.unpack_from(mm, take(_HEAD.size))
        if kind not in (FLAT, IVF) or (kind == IVF) != (nlist > 0):
            raise ValueError(f"unknown partition kind {kind}")
        centroids = array("<f4", nlist * dim).reshape(nlist, dim) if nlist else None
        blocks = []
        while True:
            (list_no,) = struct.unpack_from("<I", mm, take(4))
            if list_no == _END:
                break
            (n,) = struct.unpack_from("<I", mm, take(4))
            if (kind == FLAT and list_no != 0) or (kind == IVF and list_no >= nlist):
                raise ValueError(f"block of list {list_no} out of range")
            keys = mm[take(16 * n): pos]
            blocks.append(Block(list_no, keys, array("<i8", n), array("<f4", n * dim).reshape(n, dim)))
            entries += n
        count += 1
        yield Partition(scope, kind, trained, centroids, blocks)
    if pos != end or struct.unpack_from("<QQ", mm, end) != (count, entries):
        raise ValueError("the totals do not match the records")
