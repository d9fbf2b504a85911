"""The scoped vector index: searches stay in their scope, deletions are real, files survive restarts."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("faiss")

from edgecache.stores.vectors import FILE_NAME, VectorIndex  # noqa: E402

DIM = 384
TENANT_A = b"scope-tenant-a"
TENANT_B = b"scope-tenant-b"


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, seed: int, cos: float = 0.95) -> np.ndarray:
    """A unit vector at cosine ``cos`` from ``v``."""
    noise = unit(seed)
    noise -= noise.dot(v) * v
    noise /= np.linalg.norm(noise)
    return (cos * v + np.sqrt(1 - cos**2) * noise).astype(np.float32)


def key(i: int) -> bytes:
    """A cache-key-like digest."""
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()


def colliding_key(i: int) -> bytes:
    """Keys whose first eight bytes (the natural int64 id) are all the same."""
    return b"\x00" * 8 + i.to_bytes(8, "big")


@pytest.fixture
def index() -> VectorIndex:
    ix = VectorIndex(None)
    yield ix
    ix.close()


def test_search_finds_the_nearest_stored_vector_with_its_cosine(index: VectorIndex) -> None:
    for i in range(20):
        index.add(TENANT_A, key(i), unit(i))
    query = near(unit(7), seed=100, cos=0.9)

    found = index.search(TENANT_A, query, k=3)

    assert found[0].key == key(7)
    assert found[0].score == pytest.approx(0.9, abs=1e-4)
    assert np.array_equal(found[0].vector, unit(7))
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)


def test_search_never_returns_an_entry_of_another_scope(index: VectorIndex) -> None:
    v = unit(1)
    index.add(TENANT_A, key(1), v)
    index.add(TENANT_B, key(2), unit(2))

    assert [n.key for n in index.search(TENANT_B, v, k=4)] == [key(2)]
    assert index.search(b"scope-nobody", v) == []


def test_min_score_leaves_out_weaker_neighbours(index: VectorIndex) -> None:
    v = unit(1)
    index.add(TENANT_A, key(1), v)
    index.add(TENANT_A, key(2), near(v, seed=5, cos=0.5))

    assert [n.key for n in index.search(TENANT_A, v, k=4, min_score=0.8)] == [key(1)]


def test_removed_vector_is_never_found_again(index: VectorIndex) -> None:
    for i in range(5):
        index.add(TENANT_A, key(i), unit(i))

    assert index.remove([key(2), key(99)]) == 1

    assert key(2) not in {n.key for n in index.search(TENANT_A, unit(2), k=5)}
    assert len(index) == 4
    assert index.scope_of(key(2)) is None
    # the rows that moved to fill the hole are still found under their own keys
    for i in (0, 1, 3, 4):
        assert index.search(TENANT_A, unit(i), k=1)[0].key == key(i)


def test_readding_a_key_replaces_its_vector_and_scope(index: VectorIndex) -> None:
    index.add(TENANT_A, key(1), unit(1))
    index.add(TENANT_B, key(1), unit(2))

    assert len(index) == 1
    assert index.scope_of(key(1)) == TENANT_B
    assert index.search(TENANT_A, unit(1)) == []
    assert index.search(TENANT_B, unit(2), k=1)[0].score == pytest.approx(1.0)


def test_keys_sharing_their_first_eight_bytes_are_kept_apart(index: VectorIndex) -> None:
    a, b = b"\x01" * 8 + b"\x00" * 8, b"\x01" * 8 + b"\xff" * 8
    index.add(TENANT_A, a, unit(1))
    index.add(TENANT_A, b, unit(2))

    assert index.search(TENANT_A, unit(2), k=1)[0].key == b
    assert index.remove([a]) == 1
    assert index.search(TENANT_A, unit(2), k=1)[0].key == b
    assert index.scope_of(b) == TENANT_A


def test_bad_vectors_and_keys_are_refused(index: VectorIndex) -> None:
    with pytest.raises(ValueError):
        index.add(TENANT_A, key(1), np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError):
        index.add(TENANT_A, b"short", unit(1))
    with pytest.raises(ValueError):
        index.add(TENANT_A, key(1), np.full(DIM, np.nan, dtype=np.float32))


def test_large_scope_is_promoted_to_ivf_and_still_deletes_and_stays_in_scope() -> None:
    index = VectorIndex(None, promote_at=300)
    try:
        vectors = {i: unit(i) for i in range(1200)}
        for i, v in vectors.items():
            index.add(TENANT_A, key(i), v)
        index.add(TENANT_B, key(5000), unit(5000))
        assert index.wait_idle(30)

        assert index.search(TENANT_A, near(vectors[42], seed=1), k=1)[0].key == key(42)
        assert index.remove([key(42)]) == 1
        assert key(42) not in {n.key for n in index.search(TENANT_A, vectors[42], k=10)}
        assert index.search(TENANT_B, vectors[7], k=4)[0].key == key(5000)
        # shrinking back below a quarter of the threshold returns the scope to flat storage
        index.remove([key(i) for i in range(1200) if i >= 20])
        assert sorted(n.key for n in index.search(TENANT_A, vectors[3], k=50, min_score=-1)) == sorted(
            key(i) for i in range(20) if i != 42)
    finally:
        index.close()


class HeldIndex(VectorIndex):
    """Its background retrain waits until the test releases it (the one seam we hold)."""

    def __init__(self, *args, **kwargs) -> None:
        self.training = threading.Event()
        self.release = threading.Event()
        super().__init__(*args, **kwargs)

    def _build(self, vecs, ids):
        self.training.set()
        assert self.release.wait(30)
        return super()._build(vecs, ids)


@pytest.mark.parametrize("ck", [key, colliding_key], ids=["digests", "colliding"])
def test_changes_made_while_a_scope_retrains_are_kept(ck) -> None:
    index = HeldIndex(None, promote_at=300)
    try:
        for i in range(300):
            index.add(TENANT_A, ck(i), unit(i))
        assert index.training.wait(30)
        for i in range(300, 400):                       # while the lists are being trained
            index.add(TENANT_A, ck(i), unit(i))
        index.remove([ck(i) for i in range(0, 300, 3)])
        index.add(TENANT_B, ck(1), unit(1))              # moves scope mid-retrain
        assert index.search(TENANT_A, unit(350), k=1)[0].key == ck(350)   # served meanwhile
        index.release.set()
        assert index.wait_idle(30)

        assert len(index) == 300
        for i in (2, 350, 399):
            assert index.search(TENANT_A, unit(i), k=1)[0].key == ck(i)
        for i in (0, 1, 3, 297):
            assert ck(i) not in {n.key for n in index.search(TENANT_A, unit(i), k=10)}
        assert index.search(TENANT_B, unit(1), k=1)[0].key == ck(1)
    finally:
        index.release.set()
        index.close()


@pytest.mark.parametrize("promote_at", [8192, 200], ids=["flat", "ivf"])
def test_saved_index_loads_back_the_same(tmp_path: Path, promote_at: int) -> None:
    index = VectorIndex(tmp_path, promote_at=promote_at)
    for i in range(500):
        index.add(TENANT_A, key(i), unit(i))
    index.add(TENANT_B, key(9999), unit(9999))
    for i in range(3):
        index.add(TENANT_A, colliding_key(i), unit(70000 + i))
    assert index.wait_idle(30)
    index.remove([key(10)])
    index.close()              # saves

    loaded = VectorIndex(tmp_path, promote_at=promote_at)
    try:
        assert len(loaded) == 503
        assert loaded.scope_of(key(9999)) == TENANT_B
        assert loaded.search(TENANT_A, unit(123), k=1)[0].key == key(123)
        for i in range(3):
            assert loaded.search(TENANT_A, unit(70000 + i), k=1)[0].key == colliding_key(i)
        assert key(10) not in loaded
        assert loaded.remove([key(11)]) == 1
        assert key(11) not in {n.key for n in loaded.search(TENANT_A, unit(11), k=10)}
    finally:
        loaded.close()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "garbage"])
def test_damaged_file_loads_as_an_empty_index(tmp_path: Path, damage: str, caplog) -> None:
    index = VectorIndex(tmp_path)
    for i in range(10):
        index.add(TENANT_A, key(i), unit(i))
    index.close()
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":
        data[len(data) // 3] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not an index at all" * 10)
    path.write_bytes(bytes(data))

    loaded = VectorIndex(tmp_path)

    assert len(loaded) == 0
    assert loaded.search(TENANT_A, unit(1)) == []
    loaded.add(TENANT_A, key(1), unit(1))   # and it works, and saves over the damaged file
    loaded.close()
    assert len(VectorIndex(tmp_path)) == 1


def test_interrupted_save_leaves_the_previous_file(tmp_path: Path) -> None:
    index = VectorIndex(tmp_path)
    index.add(TENANT_A, key(1), unit(1))
    index.save()
    (tmp_path / f".{FILE_NAME}.123.456.tmp").write_bytes(b"half a file")   # a crash mid-save

    reopened = VectorIndex(tmp_path)

    assert len(reopened) == 1
    assert not list(tmp_path.glob("*.tmp"))
    index.close()
    reopened.close()


def test_key_written_twice_by_a_save_racing_a_scope_move_loads_once(tmp_path: Path) -> None:
    from edgecache.stores import vectorfile

    k = key(1)
    natural = np.array([int.from_bytes(k[:8], "little", signed=True)], dtype=np.int64)
    flat = vectorfile.Block(0, k, natural, unit(1)[None])
    vectorfile.write(tmp_path / FILE_NAME, DIM, [
        vectorfile.Partition(TENANT_A, vectorfile.FLAT, 0, None, [flat]),
        vectorfile.Partition(TENANT_B, vectorfile.FLAT, 0, None,
                             [vectorfile.Block(0, k + key(2), np.concatenate([natural, natural + 1]),
                                               np.stack([unit(1), unit(2)]))]),
    ])

    index = VectorIndex(tmp_path)

    assert len(index) == 2
    assert index.scope_of(k) == TENANT_A
    assert [n.key for n in index.search(TENANT_B, unit(1), k=4, min_score=-1)] == [key(2)]
    index.close()


def test_saves_while_writers_run_load_back_consistent(tmp_path: Path) -> None:
    index = VectorIndex(tmp_path, promote_at=256)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            index.add(TENANT_A if i % 2 else TENANT_B, key(i % 3000), unit(i % 3000))
            if i % 5 == 0:
                index.remove([key((i * 7) % 3000)])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            index.save()
            loaded = VectorIndex(tmp_path)
            for k in loaded.keys()[:50]:
                scope = loaded.scope_of(k)
                assert scope in (TENANT_A, TENANT_B)
            assert len(loaded) == len(set(loaded.keys()))
            loaded.close()
    finally:
        stop.set()
        thread.join(30)
        index.close()


def test_reconcile_drops_vectors_whose_entry_is_gone(tmp_path: Path) -> None:
    index = VectorIndex(tmp_path)
    for i in range(10):
        index.add(TENANT_A, key(i), unit(i))
    index.close()
    on_disk = {key(i) for i in range(10) if i % 2 == 0}

    restarted = VectorIndex(tmp_path)
    removed = restarted.reconcile(lambda k: k in on_disk)

    assert removed == 5
    assert {n.key for n in restarted.search(TENANT_A, unit(1), k=10, min_score=-1)} == on_disk
    restarted.close()


def test_concurrent_adds_removes_and_searches_stay_consistent() -> None:
    index = VectorIndex(None, promote_at=400)
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for i in range(base, base + 300):
                index.add(TENANT_A, key(i), unit(i))
                if i % 3 == 0:
                    index.remove([key(i)])
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for i in range(300):
                for n in index.search(TENANT_A, unit(i), k=4):
                    assert len(n.key) == 16
        except BaseException as exc:   # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (0, 1000, 2000)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert index.wait_idle(30)
        assert len(index) == 600
        for i in (1, 1001, 2002):
            assert index.search(TENANT_A, unit(i), k=1)[0].key == key(i)
    finally:
        index.close()


def test_memory_estimate_grows_with_entries(index: VectorIndex) -> None:
    before = index.memory_bytes()
    for i in range(100):
        index.add(TENANT_A, key(i), unit(i))
    assert index.memory_bytes() - before >= 100 * DIM * 4


def test_closed_index_refuses_use(index: VectorIndex) -> None:
    index.close()
    with pytest.raises(RuntimeError):
        index.add(TENANT_A, key(1), unit(1))


def test_ivf_list_count_grows_with_the_scope_within_bounds() -> None:
    from edgecache.stores import ivf

    assert [ivf.nlist_for(n) for n in (8_192, 65_536, 131_072, 1_000_000)] == [128, 1024, 2048, 2048]
    assert [ivf.nprobe_for(n) for n in (128, 1024, 2048)] == [16, 16, 32]
