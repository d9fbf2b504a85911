"""The origin's prefix registry: tenant lists, validated, kept across a restart (older files too)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgecache.errors import BadRequest, UnknownPrefix
from edgecache.prefix import expand, make_prefix
from origin.prefixes import PrefixRegistry


def test_a_prefix_may_name_the_tenants_that_can_use_it() -> None:
    open_to_all = make_prefix({"id": "faq", "text": "FAQ."}, max_bytes=100, now=1.0)
    acme_only = make_prefix({"id": "acme-rules", "text": "Rules.", "tenants": ["acme"]}, max_bytes=100, now=1.0)
    assert open_to_all.allows("anyone") and open_to_all.allows(None)
    assert acme_only.allows("acme") and not acme_only.allows("globex") and not acme_only.allows(None)
    assert acme_only.summary()["tenants"] == ["acme"]
    request = {"model": "m", "prefix": "acme-rules", "messages": [{"role": "user", "content": "q"}]}
    prefixes = {"acme-rules": acme_only}
    assert expand(request, prefixes, tenant="acme")["messages"][0]["content"] == "Rules."
    with pytest.raises(UnknownPrefix) as refused:
        expand(request, prefixes, tenant="globex")
    with pytest.raises(UnknownPrefix) as unknown:
        expand(request, {}, tenant="globex")
    assert str(refused.value) == str(unknown.value)   # the same answer as for an id that does not exist


@pytest.mark.parametrize("tenants", ["acme", [""], ["a b"], [3], ["x" * 201], ["\n"]])
def test_bad_tenant_lists_are_refused(tenants: object) -> None:
    with pytest.raises(BadRequest, match="'tenants'"):
        make_prefix({"id": "p", "text": "t", "tenants": tenants}, max_bytes=100, now=1.0)


def test_tenant_lists_survive_a_restart_and_a_change_of_them_is_a_change(tmp_path: Path) -> None:
    registry = PrefixRegistry(tmp_path)
    prefix = make_prefix({"id": "p", "text": "Rules.", "tenants": ["acme", "globex"]}, max_bytes=100, now=1.0)
    assert registry.put(prefix) and not registry.put(prefix)
    narrowed = make_prefix({"id": "p", "text": "Rules.", "tenants": ["acme"]}, max_bytes=100, now=2.0)
    assert registry.put(narrowed)   # same text, same version: still a change to announce
    registry.close()
    again = PrefixRegistry(tmp_path)
    assert again.get("p") is not None and again.get("p").tenants == frozenset({"acme"})
    again.close()


def test_a_registry_written_before_tenant_lists_opens_with_every_prefix_open_to_all(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "prefixes.sqlite3")
    db.execute("CREATE TABLE prefixes (id TEXT PRIMARY KEY, text TEXT NOT NULL, version TEXT NOT NULL, "
               "tags TEXT NOT NULL, updated REAL NOT NULL)")
    db.execute("INSERT INTO prefixes VALUES ('old', 'Old text.', 'v', 'doc:1', 1.0)")
    db.commit()
    db.close()
    registry = PrefixRegistry(tmp_path)
    old = registry.get("old")
    assert old is not None and old.tags == frozenset({"doc:1"}) and old.tenants == frozenset()
    assert registry.put(make_prefix({"id": "new", "text": "New.", "tenants": ["acme"]}, max_bytes=100, now=2.0))
    registry.close()
    assert PrefixRegistry(tmp_path).get("new").tenants == frozenset({"acme"})
