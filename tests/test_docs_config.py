"""docs/configuration.md documents every key of every section, so the reference cannot drift."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from edgecache import config as c

DOC = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
SECTIONS = {"auth": c.AuthConfig, "origin": c.OriginConfig, "sim": c.SimConfig, "backends": c.BackendConfig,
            "edges": c.NodeConfig, "semantic": c.SemanticConfig, "bus": c.BusConfig, "tenants": c.TenantConfig}
SET_BY_THE_TOPOLOGY = {"origin_url", "node_token", "tenants", "semantic", "bus"}   # edges get them, never set them


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_of_a_section_is_documented_in_its_section(section: str) -> None:
    found = re.search(r"^## `\[{1,2}" + section + r"\]{1,2}`.*?(?=^## |\Z)", DOC, re.S | re.M)
    assert found, f"docs/configuration.md has no section for [{section}]"
    keys = {f.name for f in fields(SECTIONS[section])} - (SET_BY_THE_TOPOLOGY if section == "edges" else set())
    assert sorted(k for k in keys if f"`{k}`" not in found.group(0)) == []


def test_every_environment_override_is_documented() -> None:
    source = Path(c.__file__).read_text(encoding="utf-8")
    for name in sorted(set(re.findall(r"EDGECACHE_[A-Z_]+", source))):
        assert name in DOC, f"{name} is read by edgecache/config.py but not in docs/configuration.md"
