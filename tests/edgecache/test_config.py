"""Topology files: the local one loads, secrets come from the environment, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecache.config import load_config, parse_config
from edgecache.errors import ConfigError

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local.toml"
SECRET = "whsec_" + "c2VjcmV0LW9mLWF0LWxlYXN0LTE2LWJ5dGVz"   # base64 of a 27-byte key


def test_local_topology_has_the_documented_services() -> None:
    config = load_config(LOCAL, {})
    assert config.origin.base_url == "http://127.0.0.1:8100"
    assert [(e.region, e.port) for e in config.edges] == [("us-east", 8101), ("eu-west", 8102), ("ap-south", 8103)]
    assert config.sim_urls() == [f"http://127.0.0.1:{p}" for p in range(8201, 8205)]
    assert [b.url for b in config.all_backends()] == config.sim_urls()
    assert all(e.origin_url == "http://127.0.0.1:8100" for e in config.edges)


def test_secrets_are_overridden_by_the_environment() -> None:
    env = {"EDGECACHE_ADMIN_TOKEN": "adm", "EDGECACHE_NODE_TOKEN": "nod", "EDGECACHE_WEBHOOK_SECRET": SECRET}
    config = load_config(LOCAL, env)
    assert (config.auth.admin_token, config.auth.node_token, config.auth.webhook_secret) == ("adm", "nod", SECRET)
    assert all(e.node_token == "nod" for e in config.edges)


@pytest.mark.parametrize(("raw", "needle"), [
    ({"origin": {"prot": 1}}, "origin.prot: unknown key"),
    ({"origin": {"port": "80"}}, "origin.port: expected int"),
    ({"sim": {"time_scale": -1}}, "sim.time_scale: must not be negative"),
    ({"edges": [{"port": 1}]}, "edges[0].region: required"),
    ({"edges": [{"region": "a"}, {"region": "a"}]}, "regions must be unique"),
    ({"edges": {"region": "a"}}, "edges: expected an array"),
    ({"backends": [{"url": "ftp://x"}]}, "backends[0].url"),
    ({"auth": {"webhook_secret": "plain"}}, "webhook_secret"),
    ({"auth": {"webhook_secret": "whsec_abc"}}, "webhook_secret: the webhook secret is not base64"),
    ({"origin": {"routing": "random"}}, "origin.routing"),
    ({"nodes": []}, "unknown section 'nodes'"),
    ({"tenants": [{"name": "a", "semantic_max_false_hit_rate": 1.5}]}, "tenants[0].semantic_max_false_hit_rate"),
    ({"tenants": [{"name": "a", "semantic": "no"}]}, "tenants[0].semantic: expected bool"),
    ({"tenants": [{"name": ""}]}, "tenants[0].name: expected a non-empty name"),
])
def test_errors_name_the_key_at_fault(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(raw, {}, source="t.toml")
    assert needle in str(info.value) and "t.toml" in str(info.value)


def test_missing_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[origin\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})


def test_the_environment_names_the_origin_url_and_the_instance() -> None:
    raw = {"edges": [{"region": "us-east"}]}
    config = parse_config(raw, {"EDGECACHE_ORIGIN_URL": "http://origin.example:8100",
                                "EDGECACHE_INSTANCE": "edge-7f9c"})
    assert config.edges[0].origin_url == "http://origin.example:8100"
    assert config.edges[0].instance == "edge-7f9c"
    with pytest.raises(ConfigError, match=r"origin\.url"):
        parse_config(raw, {"EDGECACHE_ORIGIN_URL": "origin:8100"})
    with pytest.raises(ConfigError, match="instance"):
        parse_config(raw, {"EDGECACHE_INSTANCE": "a/b"})


def test_a_tenant_may_carry_its_own_semantic_policy() -> None:
    raw = {"edges": [{"region": "a"}], "tenants": [
        {"name": "bank", "api_keys": ["sk-b"], "semantic_policy_path": "/etc/edgecache/bank.json",
         "semantic_max_false_hit_rate": 0.002},
        {"name": "games", "api_keys": ["sk-g"], "semantic": False}]}
    config = parse_config(raw, {})
    bank, games = config.edge("a").tenants
    assert (bank.semantic, bank.semantic_policy_path, bank.semantic_max_false_hit_rate) == \
        (True, "/etc/edgecache/bank.json", 0.002)
    assert games.semantic is False and games.semantic_max_false_hit_rate == 0.0   # 0: the node's bound
