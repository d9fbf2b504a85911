from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecache.entry import FORMAT, Entry, Usage

KEY = bytes(range(16))


def make(**changes: object) -> Entry:
    entry = Entry(key=KEY, endpoint="chat", body=b'{"id":"chatcmpl-1","object":"chat.completion"}',
                  chunks=None, created=1000.0, ttl=60.0, tenant="t-1")
    return replace(entry, **changes)


def test_entry_round_trips_through_bytes_with_every_field() -> None:
    entry = make(chunks=(b'{"a":1}', b'{"b":2}'), prefix_id="kb", prefix_version="v9",
                 tags=frozenset({"doc:42", "prefix:kb"}), usage=Usage(10, 5, 8), stale=True,
                 endpoint="completions", semantic_scope=b"s" * 16, query="How do I reset my password?")
    assert Entry.from_bytes(entry.to_bytes()) == entry


def test_json_entry_round_trips_with_no_chunks() -> None:
    decoded = Entry.from_bytes(make().to_bytes())
    assert decoded.chunks is None
    assert decoded == make()


def test_empty_stream_round_trips_as_empty_tuple_not_none() -> None:
    assert Entry.from_bytes(make(chunks=()).to_bytes()).chunks == ()


def test_equal_entries_serialise_to_equal_bytes_whatever_the_tag_order() -> None:
    a = make(tags=frozenset(["doc:1", "doc:2", "doc:3"]))
    b = make(tags=frozenset(["doc:3", "doc:1", "doc:2"]))
    assert a.to_bytes() == b.to_bytes()


def test_serialised_entry_starts_with_its_format_version() -> None:
    assert msgpack.unpackb(make().to_bytes())[0] == FORMAT


@pytest.mark.parametrize("data", [b"", b"\xc1", b"garbage", make().to_bytes()[:-3],
                                  make().to_bytes() + b"\x00", msgpack.packb({"key": 1})])
def test_corrupt_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        Entry.from_bytes(data)


def test_unknown_format_version_raises_value_error() -> None:
    fields = list(msgpack.unpackb(make().to_bytes()))
    fields[0] = FORMAT + 1
    with pytest.raises(ValueError, match="unknown cache entry format"):
        Entry.from_bytes(msgpack.packb(fields))


@pytest.mark.parametrize(("index", "value"), [(1, "not-bytes"), (3, 7), (4, [1]), (5, "soon"),
                                              (10, ["doc:1", 2]), (11, [1, 2]), (12, 1),
                                              (13, "scope"), (14, b"query")])
def test_field_of_the_wrong_type_raises_value_error(index: int, value: object) -> None:
    fields = list(msgpack.unpackb(make().to_bytes()))
    fields[index] = value
    with pytest.raises(ValueError, match="corrupt"):
        Entry.from_bytes(msgpack.packb(fields))


def test_entry_expires_ttl_seconds_after_creation() -> None:
    entry = make(created=1000.0, ttl=60.0)
    assert entry.expires_at() == 1060.0
    assert entry.is_fresh(1059.999)
    assert not entry.is_fresh(1060.0)
    assert entry.is_expired(1060.0)


def test_stale_entry_is_never_fresh_even_before_expiry() -> None:
    entry = make().mark_stale()
    assert entry.stale
    assert not entry.is_fresh(1000.0)
    assert not entry.is_expired(1000.0)


def test_age_counts_from_creation_and_is_never_negative() -> None:
    entry = make(created=1000.0)
    assert entry.age(1012.5) == 12.5
    assert entry.age(990.0) == 0.0


def test_size_grows_with_body_chunks_and_tags() -> None:
    small = make(body=b"x")
    assert make(body=b"x" * 1001).size == small.size + 1000
    assert make(body=b"x", chunks=(b"y" * 500,)).size > small.size + 500
    assert make(body=b"x", tags=frozenset({"doc:1"})).size > small.size


_text = st.text(max_size=20)
_opt = st.none() | _text
_tags = st.frozensets(st.from_regex(r"[a-z0-9:]{1,12}", fullmatch=True), max_size=5)


@given(key=st.binary(min_size=16, max_size=16), body=st.binary(max_size=200),
       chunks=st.none() | st.lists(st.binary(max_size=50), max_size=5).map(tuple),
       created=st.floats(allow_nan=False, allow_infinity=False), ttl=st.floats(0, 1e9),
       tenant=_text, prefix_id=_opt, prefix_version=_opt, tags=_tags,
       usage=st.builds(Usage, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40)),
       stale=st.booleans())
def test_any_entry_round_trips(key: bytes, body: bytes, chunks: tuple[bytes, ...] | None,
                               created: float, ttl: float, tenant: str, prefix_id: str | None,
                               prefix_version: str | None, tags: frozenset[str], usage: Usage,
                               stale: bool) -> None:
    entry = Entry(key=key, endpoint="chat", body=body, chunks=chunks, created=created, ttl=ttl,
                  tenant=tenant, prefix_id=prefix_id, prefix_version=prefix_version, tags=tags,
                  usage=usage, stale=stale)
    assert Entry.from_bytes(entry.to_bytes()) == entry
