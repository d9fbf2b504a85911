"""The Tier conformance suite (run over the memory and the disk tier), then tier-specific tests.

Time is always an explicit ``now``; nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import diskcache
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecache.entry import Entry
from edgecache.stores import DiskTier, MemoryTier, Tier, TieredStore
from edgecache.stores import memory as memory_module

NOW = 1_000_000.0
MiB = 1 << 20


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def make(n: int, *tags: str, created: float = NOW, ttl: float = 60.0, body: int = 100,
         stale: bool = False) -> Entry:
    return Entry(key=key(n), endpoint="chat", body=b'{"n":%d,"x":"%s"}' % (n, b"x" * body),
                 chunks=None, created=created, ttl=ttl, tenant="t", tags=frozenset(tags),
                 stale=stale)


MakeTier = Callable[..., Tier]


@pytest.fixture(params=["memory", "disk"])
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeTier]:
    opened: list[Tier] = []

    def factory(max_bytes: int = 16 * MiB) -> Tier:
        if request.param == "memory":
            tier: Tier = MemoryTier(max_bytes)
        else:
            tier = DiskTier(tmp_path / f"disk{len(opened)}", max_bytes)
        opened.append(tier)
        return tier

    yield factory
    for tier in opened:
        tier.close()


@pytest.fixture
def tier(make_tier: MakeTier) -> Tier:
    return make_tier()


# -- conformance: every tier -------------------------------------------------------------


def test_tier_satisfies_the_protocol(tier: Tier) -> None:
    assert isinstance(tier, Tier)


def test_put_entry_is_returned_by_get(tier: Tier) -> None:
    entry = make(1, "doc:1")
    assert tier.put(entry)
    assert tier.get(key(1), NOW) == entry
    assert len(tier) == 1


def test_unknown_key_is_a_miss(tier: Tier) -> None:
    tier.put(make(1))
    assert tier.get(key(2), NOW) is None


def test_entry_is_served_until_it_expires_then_removed(tier: Tier) -> None:
    tier.put(make(1, ttl=60.0))
    assert tier.get(key(1), NOW + 59.999) is not None
    assert tier.get(key(1), NOW + 60.0) is None
    assert len(tier) == 0
    assert tier.get(key(1), NOW) is None        # removed, not merely hidden


def test_put_replaces_the_entry_and_its_tags(tier: Tier) -> None:
    tier.put(make(1, "doc:old"))
    newer = make(1, "doc:new", body=5)
    tier.put(newer)
    assert tier.get(key(1), NOW) == newer
    assert tier.purge_tags({"doc:old"}) == 0
    assert tier.get(key(1), NOW) == newer
    assert tier.purge_tags({"doc:new"}) == 1
    assert tier.get(key(1), NOW) is None


def test_delete_purges_one_key(tier: Tier) -> None:
    tier.put(make(1))
    tier.put(make(2))
    assert tier.delete(key(1)) is True
    assert tier.delete(key(1)) is False
    assert tier.get(key(1), NOW) is None
    assert tier.get(key(2), NOW) is not None


def test_purge_removes_every_entry_carrying_any_purged_tag(tier: Tier) -> None:
    tier.put(make(1, "doc:1"))
    tier.put(make(2, "doc:1", "doc:2"))
    tier.put(make(3, "doc:2"))
    tier.put(make(4, "doc:4"))
    tier.put(make(5))
    assert tier.purge_tags(["doc:1", "doc:2"]) == 3
    assert [n for n in range(1, 6) if tier.get(key(n), NOW) is not None] == [4, 5]
    assert tier.keys_for_tag("doc:1") == []
    assert tier.purge_tags(["doc:1"]) == 0


def test_keys_for_tag_lists_the_entries_carrying_it(tier: Tier) -> None:
    tier.put(make(1, "doc:1", "prefix:kb"))
    tier.put(make(2, "prefix:kb"))
    assert sorted(tier.keys_for_tag("prefix:kb")) == [key(1), key(2)]
    assert tier.keys_for_tag("doc:1") == [key(1)]
    assert tier.keys_for_tag("doc:9") == []


def test_soft_purge_marks_entries_stale_but_still_returns_them(tier: Tier) -> None:
    tier.put(make(1, "doc:1"))
    tier.put(make(2, "doc:2"))
    assert tier.purge_tags({"doc:1"}, soft=True) == 1
    found = tier.get(key(1), NOW)
    assert found is not None and found.stale and not found.is_fresh(NOW)
    assert found.body == make(1).body
    assert tier.get(key(2), NOW).stale is False
    assert tier.purge_tags({"doc:1"}, soft=True) == 0      # already stale


def test_soft_purged_entry_still_expires_and_can_be_purged_hard(tier: Tier) -> None:
    tier.put(make(1, "doc:1"))
    tier.put(make(2, "doc:1"))
    tier.purge_tags({"doc:1"}, soft=True)
    assert tier.get(key(1), NOW + 60.0) is None
    assert tier.purge_tags({"doc:1"}) == 1
    assert tier.get(key(2), NOW) is None


def test_put_after_soft_purge_serves_the_new_entry_fresh(tier: Tier) -> None:
    tier.put(make(1, "doc:1"))
    tier.purge_tags({"doc:1"}, soft=True)
    tier.put(make(1, "doc:1", created=NOW + 5))
    assert tier.get(key(1), NOW + 5).is_fresh(NOW + 5)


def test_clear_removes_everything(tier: Tier) -> None:
    for n in range(5):
        tier.put(make(n, "doc:1"))
    assert tier.clear() == 5
    assert len(tier) == 0
    assert all(tier.get(key(n), NOW) is None for n in range(5))
    assert tier.keys_for_tag("doc:1") == []


def test_expire_removes_only_expired_entries(tier: Tier) -> None:
    tier.put(make(1, "doc:1", ttl=10.0))
    tier.put(make(2, "doc:1", ttl=100.0))
    tier.put(make(3, ttl=5.0))
    assert tier.expire(NOW + 10.0) == 2
    assert len(tier) == 1
    assert tier.get(key(2), NOW + 10.0) is not None
    assert tier.keys_for_tag("doc:1") == [key(2)]


def test_entry_larger_than_the_bound_is_not_stored(make_tier: MakeTier) -> None:
    tier = make_tier(256 * 1024)
    tier.put(make(1, body=10))
    assert tier.put(make(1, body=300 * 1024)) is False
    assert tier.get(key(1), NOW) is None
    assert tier.put(make(2, body=10)) is True


def test_tier_stays_within_its_byte_bound(make_tier: MakeTier) -> None:
    bound = 256 * 1024
    tier = make_tier(bound)
    high = 0
    for n in range(300):                      # ~690 KB of entries into a 256 KiB tier
        tier.put(make(n, f"doc:{n % 7}", body=2000))
        high = max(high, tier.bytes)
    assert high <= bound * 1.05
    assert 0 < len(tier) < 300
    assert tier.get(key(299), NOW) is not None            # the newest entry is kept
    assert tier.get(key(0), NOW) is None                  # the oldest made room


def test_purge_after_eviction_removes_only_what_is_left(make_tier: MakeTier) -> None:
    tier = make_tier(256 * 1024)
    for n in range(300):
        tier.put(make(n, "doc:all", f"doc:{n}", body=2000))
    left = len(tier)
    assert tier.purge_tags({"doc:all"}) == left
    assert len(tier) == 0
    assert all(tier.get(key(n), NOW) is None for n in range(300))


def test_generation_advances_on_every_purge(tier: Tier) -> None:
    g0 = tier.generation()
    tier.purge_tags({"doc:1"})
    g1 = tier.generation()
    tier.delete(key(1))
    g2 = tier.generation()
    tier.clear()
    assert g0 < g1 < g2 < tier.generation()


def test_put_fetched_before_a_purge_of_its_tag_is_refused(tier: Tier) -> None:
    since = tier.generation()                       # the fill starts
    tier.purge_tags({"doc:1"})                      # the CMS purges while it runs
    assert tier.put(make(1, "doc:1", "doc:9"), since=since) is False
    assert tier.get(key(1), NOW) is None
    assert tier.put(make(1, "doc:1"), since=tier.generation()) is True


def test_put_fetched_before_a_soft_purge_of_its_tag_is_refused(tier: Tier) -> None:
    since = tier.generation()
    tier.purge_tags({"doc:1"}, soft=True)
    assert tier.put(make(1, "doc:1"), since=since) is False


def test_put_is_accepted_when_only_other_tags_were_purged(tier: Tier) -> None:
    since = tier.generation()
    tier.purge_tags({"doc:2"})
    tier.delete(key(2))
    assert tier.put(make(1, "doc:1"), since=since) is True


def test_put_fetched_before_its_key_was_deleted_is_refused(tier: Tier) -> None:
    since = tier.generation()
    tier.delete(key(1))
    assert tier.put(make(1), since=since) is False
    assert tier.put(make(2), since=since) is True


def test_put_fetched_before_a_clear_is_refused(tier: Tier) -> None:
    since = tier.generation()
    tier.clear()
    assert tier.put(make(1), since=since) is False
    assert tier.put(make(1), since=tier.generation()) is True


def test_entry_with_purged_tag_is_never_returned(tier: Tier) -> None:
    rng = random.Random(7)
    for n in range(200):
        tier.put(make(n, *rng.sample(["doc:1", "doc:2", "doc:3", "doc:4"], rng.randint(0, 2))))
    tier.purge_tags({"doc:1"}, soft=True)
    tier.purge_tags({"doc:2", "doc:3"})
    for n in range(200):
        found = tier.get(key(n), NOW)
        assert found is None or not (found.tags & {"doc:2", "doc:3"})
        assert found is None or "doc:1" not in found.tags or found.stale


_ops = st.lists(st.tuples(st.sampled_from(["put", "delete", "purge", "soft", "get"]),
                          st.integers(0, 7), st.frozensets(st.sampled_from("abc"), max_size=2)),
                max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_tier_behaves_like_a_dict_with_tag_purges(tier: Tier, ops: list) -> None:
    tier.clear()
    model: dict[bytes, Entry] = {}
    for op, n, tags in ops:
        if op == "put":
            model[key(n)] = make(n, *tags)
            tier.put(model[key(n)])
        elif op == "delete":
            assert tier.delete(key(n)) == (model.pop(key(n), None) is not None)
        elif op in ("purge", "soft"):
            hit = [k for k, e in model.items() if e.tags & tags]
            changed = [k for k in hit if op == "purge" or not model[k].stale]
            for k in hit:
                if op == "purge":
                    del model[k]
                else:
                    model[k] = model[k].mark_stale()
            assert tier.purge_tags(tags, soft=op == "soft") == len(changed)
        assert tier.get(key(n), NOW) == model.get(key(n))
    assert len(tier) == len(model)
    for tag in "abc":
        assert sorted(tier.keys_for_tag(tag)) == sorted(k for k, e in model.items() if tag in e.tags)


# -- memory tier ---------------------------------------------------------------------------


def test_memory_evicts_the_least_recently_used_entry() -> None:
    one = make(1).size
    tier = MemoryTier(3 * one)
    for n in (1, 2, 3):
        tier.put(make(n))
    tier.get(key(1), NOW)                     # 2 is now the least recently used
    tier.put(make(4))
    assert [n for n in (1, 2, 3, 4) if key(n) in tier] == [1, 3, 4]


def test_memory_bytes_is_the_sum_of_entry_sizes() -> None:
    tier = MemoryTier(MiB)
    entries = [make(n, "doc:1", body=n * 10) for n in range(10)]
    for entry in entries:
        tier.put(entry)
    assert tier.bytes == sum(e.size for e in entries)
    tier.purge_tags({"doc:1"})
    assert tier.bytes == 0


def test_memory_refuses_puts_older_than_the_purges_it_remembers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "PURGE_MEMORY", 4)
    tier = MemoryTier(MiB)
    since = tier.generation()
    for n in range(10):
        tier.purge_tags({f"other:{n}"})
    assert tier.put(make(1, "doc:1"), since=since) is False      # too old to tell: refused
    assert tier.put(make(1, "doc:1"), since=tier.generation() - 2) is True


# -- disk tier -------------------------------------------------------------------------------


def test_disk_entries_and_tags_survive_reopening(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, MiB)
    tier.put(make(1, "doc:1"))
    tier.put(make(2, "doc:2"))
    tier.purge_tags({"doc:2"}, soft=True)
    tier.close()
    tier = DiskTier(tmp_path, MiB)
    assert tier.get(key(1), NOW) == make(1, "doc:1")
    assert tier.get(key(2), NOW).stale
    assert tier.keys_for_tag("doc:1") == [key(1)]
    assert tier.purge_tags({"doc:1"}) == 1
    assert tier.get(key(1), NOW) is None
    tier.close()


def test_disk_generation_survives_reopening(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, MiB)
    since = tier.generation()
    tier.purge_tags({"doc:1"})
    tier.close()
    tier = DiskTier(tmp_path, MiB)
    assert tier.put(make(1, "doc:1"), since=since) is False
    tier.close()


def test_disk_without_its_index_is_emptied_on_open(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, MiB)
    tier.put(make(1, "doc:1"))
    tier.close()
    for path in tmp_path.glob("tags.sqlite3*"):
        path.unlink()
    tier = DiskTier(tmp_path, MiB)
    assert tier.get(key(1), NOW) is None          # could no longer be purged by tag
    assert len(tier) == 0
    tier.close()


@pytest.mark.parametrize("value", [b"\xc1garbage", b"", "not bytes", make(9).to_bytes()])
def test_disk_corrupt_value_is_a_miss_and_removed(tmp_path: Path, value: object) -> None:
    tier = DiskTier(tmp_path, MiB)
    tier.put(make(1, "doc:1"))
    with diskcache.Cache(str(tmp_path)) as raw:   # another writer corrupts the value
        raw[key(1)] = value
    assert tier.get(key(1), NOW) is None
    assert len(tier) == 0
    assert tier.purge_tags({"doc:1"}) == 0
    tier.close()


def test_disk_culled_entries_leave_nothing_to_resurrect(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 256 * 1024)
    for n in range(300):
        tier.put(make(n, "doc:old", body=2000))
    culled = next(n for n in range(300) if tier.get(key(n), NOW) is None)
    tier.put(make(culled, "doc:new", body=2000))        # back, with another tag
    tier.purge_tags({"doc:old"})
    assert tier.get(key(culled), NOW) == make(culled, "doc:new", body=2000)
    assert tier.keys_for_tag("doc:old") == []
    assert all(tier.get(key(n), NOW) is None for n in range(300) if n != culled)
    tier.close()


def test_disk_prune_orphans_drops_index_rows_of_culled_entries(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 256 * 1024)
    for n in range(300):
        tier.put(make(n, "doc:1", body=2000))
    left = len(tier)
    assert len(tier.keys_for_tag("doc:1")) == 300
    dropped = sum(tier.prune_orphans(limit=64) for _ in range(5))
    assert dropped == 300 - left
    assert sorted(tier.keys_for_tag("doc:1")) == sorted(key(n) for n in range(300)
                                                         if tier.get(key(n), NOW) is not None)
    tier.close()


def test_two_disk_tiers_on_one_directory_share_entries_and_purges(tmp_path: Path) -> None:
    a, b = DiskTier(tmp_path, MiB), DiskTier(tmp_path, MiB)
    a.put(make(1, "doc:1"))
    assert b.get(key(1), NOW) == make(1, "doc:1")
    since = a.generation()
    b.purge_tags({"doc:1"})
    assert a.get(key(1), NOW) is None
    assert a.put(make(1, "doc:1"), since=since) is False
    b.put(make(2, "doc:2"))
    assert a.keys_for_tag("doc:2") == [key(2)]
    a.close()
    b.close()


def _assert_index_complete(tier: DiskTier, n_keys: int) -> None:
    """Every entry on disk is reachable through each of its tags."""
    for n in range(n_keys):
        found = tier.get(key(n), NOW)
        for tag in found.tags if found else ():
            assert key(n) in tier.keys_for_tag(tag), (n, tag)


def _churn(directory: str, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    tier = DiskTier(directory, 4 * MiB)
    try:
        for _ in range(rounds):
            n = rng.randrange(40)
            if rng.random() < 0.7:
                tier.put(make(n, *rng.sample(["doc:1", "doc:2", "doc:3"], rng.randint(1, 2))))
            else:
                tier.purge_tags({rng.choice(["doc:1", "doc:2", "doc:3"])}, soft=rng.random() < 0.3)
    finally:
        tier.close()


def test_disk_index_stays_complete_under_concurrent_threads(tmp_path: Path) -> None:
    threads = [threading.Thread(target=_churn, args=(str(tmp_path), seed, 150)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    tier = DiskTier(tmp_path, 4 * MiB)
    _assert_index_complete(tier, 40)
    tier.purge_tags({"doc:1", "doc:2", "doc:3"})
    assert len(tier) == 0
    tier.close()


def test_disk_index_stays_complete_under_concurrent_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_churn, args=(str(tmp_path), seed, 150)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    _churn(str(tmp_path), 3, 150)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    tier = DiskTier(tmp_path, 4 * MiB)
    _assert_index_complete(tier, 40)
    tier.purge_tags({"doc:1", "doc:2", "doc:3"})
    assert len(tier) == 0
    tier.close()


# -- memory over disk --------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    store = TieredStore(MemoryTier(MiB), DiskTier(tmp_path, 4 * MiB))
    yield store
    store.close()


def test_tiered_store_promotes_a_disk_hit_into_memory(store: TieredStore) -> None:
    store.disk.put(make(1, "doc:1"))
    assert store.lookup(key(1), NOW) == (make(1, "doc:1"), "disk")
    assert store.lookup(key(1), NOW) == (make(1, "doc:1"), "memory")


def test_tiered_purge_removes_the_entry_from_both_tiers(store: TieredStore) -> None:
    store.put(make(1, "doc:1"))
    assert store.purge_tags({"doc:1"}) == 1
    assert store.memory.get(key(1), NOW) is None
    assert store.disk.get(key(1), NOW) is None


class _PurgeDuringRead:
    """A disk tier whose read is overtaken by a purge (as when the read runs in a thread)."""

    def __init__(self, disk: DiskTier, purge: Callable[[], object]) -> None:
        self.disk, self.purge = disk, purge

    def __getattr__(self, name: str) -> object:
        return getattr(self.disk, name)

    def get(self, key: bytes, now: float) -> Entry | None:
        found = self.disk.get(key, now)
        self.purge()
        return found


def test_promotion_overtaken_by_a_purge_does_not_resurrect_the_entry(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, MiB)
    store = TieredStore(MemoryTier(MiB), disk)
    store.disk = _PurgeDuringRead(disk, lambda: store.purge_tags({"doc:1"}))  # type: ignore[assignment]
    disk.put(make(1, "doc:1"))
    found, _ = store.lookup(key(1), NOW)          # read before the purge, returned after it
    assert found is not None
    assert store.memory.get(key(1), NOW) is None
    assert disk.get(key(1), NOW) is None
    store.close()


def test_tiered_put_refuses_a_fill_overtaken_by_a_purge(store: TieredStore) -> None:
    since = store.generation()
    store.purge_tags({"doc:1"})
    assert store.put(make(1, "doc:1"), since=since) is False
    assert store.get(key(1), NOW) is None
    assert store.put(make(2, "doc:2"), since=since) is True
    assert replace(store.get(key(2), NOW)) == make(2, "doc:2")


def test_disk_tier_lists_its_keys(tmp_path) -> None:
    from edgecache.entry import Entry
    from edgecache.stores.disk import DiskTier

    disk = DiskTier(tmp_path, 1 << 20)
    try:
        for i in range(3):
            disk.put(Entry(key=bytes([i]) * 16, endpoint="chat", body=b"{}", chunks=None, created=0.0,
                           ttl=60.0, tenant="t"))
        disk.delete(bytes([1]) * 16)
        assert disk.keys() == {bytes([0]) * 16, bytes([2]) * 16}
    finally:
        disk.close()
