"""The hit decision, driven by an explicit clock."""

from __future__ import annotations

import pytest

from edgecache.entry import Entry
from edgecache.errors import BadRequest
from edgecache.policy import (
    Bypass,
    CacheControl,
    Hit,
    Miss,
    Stale,
    decide,
    parse_cache_control,
    parse_ttl,
)

ENTRY = Entry(key=b"k" * 16, endpoint="chat", body=b"{}", chunks=None, created=1000.0, ttl=60.0, tenant="t")


@pytest.mark.parametrize(("header", "expected"), [
    (None, CacheControl()),
    ("", CacheControl()),
    ("no-store", CacheControl(no_store=True)),
    ("No-Cache", CacheControl(no_cache=True)),
    ("max-age=30, only-if-cached", CacheControl(max_age=30.0, only_if_cached=True)),
    ('max-age="5"', CacheControl(max_age=5.0)),
    ("private, stale-while-revalidate=9, no-transform", CacheControl()),
])
def test_cache_control_directives_are_parsed(header: str | None, expected: CacheControl) -> None:
    assert parse_cache_control(header) == expected


@pytest.mark.parametrize("header", ["max-age=", "max-age=-1", "max-age=1.5", "max-age=soon"])
def test_malformed_max_age_is_a_bad_request(header: str) -> None:
    with pytest.raises(BadRequest, match="max-age"):
        parse_cache_control(header)


def test_ttl_header_is_capped_and_validated() -> None:
    assert parse_ttl(None, 100.0, 1000.0) == 100.0
    assert parse_ttl("50", 100.0, 1000.0) == 50.0
    assert parse_ttl("5000", 100.0, 1000.0) == 1000.0
    for bad in ("0", "-3", "1.5", "soon", ""):
        with pytest.raises(BadRequest, match="X-EdgeCache-TTL"):
            parse_ttl(bad, 100.0, 1000.0)


def test_fresh_entry_is_a_hit_until_it_expires() -> None:
    cc = CacheControl()
    assert decide(cc, ENTRY, 1030.0) == Hit(ENTRY)
    assert decide(cc, ENTRY, 1060.0) == Stale(ENTRY)
    assert decide(cc, None, 1030.0) == Miss()


def test_max_age_turns_an_older_entry_stale() -> None:
    assert decide(CacheControl(max_age=10.0), ENTRY, 1010.0) == Hit(ENTRY)
    assert decide(CacheControl(max_age=10.0), ENTRY, 1011.0) == Stale(ENTRY)


def test_no_cache_bypasses_even_a_fresh_entry() -> None:
    assert decide(CacheControl(no_cache=True), ENTRY, 1001.0) == Bypass()


def test_soft_purged_entry_is_never_a_hit() -> None:
    from dataclasses import replace

    stale = replace(ENTRY, stale=True)
    assert decide(CacheControl(), stale, 1001.0) == Stale(stale)
