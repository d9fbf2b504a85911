"""NodeState.tenant_for: which credentials name which tenant, and which are refused."""

from __future__ import annotations

import pytest

from edgecache.config import NodeConfig, TenantConfig
from edgecache.errors import Unauthorized
from edgecache.keys import tenant_id
from nodes.state import NodeState


def state(*tenants: TenantConfig) -> NodeState:
    """A node's state with only what ``tenant_for`` reads (no tiers, session or metrics)."""
    config = NodeConfig(region="us-east", tenants=tenants)
    keys = {k: t.name for t in tenants for k in t.api_keys}
    return NodeState(config=config, memory=None, disk=None, session=None, metrics=None,  # type: ignore[arg-type]
                     keys=keys)


@pytest.mark.parametrize("authorization", ["Basic YWxpY2U6czNjcmV0", "sk-alice", "Bearer", "Bearer   ",
                                           "Token sk-alice", "Bearer\tsk-alice"])
def test_an_authorization_that_is_not_a_bearer_key_is_refused(authorization: str) -> None:
    for node in (state(), state(TenantConfig("acme", ("sk-alice",)))):
        with pytest.raises(Unauthorized, match="Authorization: Bearer <key>"):
            node.tenant_for(authorization)
        with pytest.raises(Unauthorized):   # an api-key header does not rescue it
            node.tenant_for(authorization, "sk-alice")


def test_a_bearer_key_or_an_api_key_header_names_the_tenant() -> None:
    node = state()
    assert node.tenant_for("Bearer sk-alice") == node.tenant_for("bearer  sk-alice ") == tenant_id("sk-alice")
    assert node.tenant_for(None, "sk-alice") == node.tenant_for("", " sk-alice") == tenant_id("sk-alice")
    assert node.tenant_for("Bearer sk-bob", "sk-alice") == tenant_id("sk-bob")   # Authorization first
    listed = state(TenantConfig("acme", ("sk-alice",)))
    assert listed.tenant_for(None, "sk-alice") == listed.tenant_for("Bearer sk-alice") == "acme"
    with pytest.raises(Unauthorized, match="Incorrect API key"):
        listed.tenant_for(None, "sk-bob")


def test_no_credentials_are_the_anonymous_tenant_only_without_listed_tenants() -> None:
    for authorization, api_key in ((None, None), ("", ""), ("  ", None)):
        assert state().tenant_for(authorization, api_key) == "anonymous"
        with pytest.raises(Unauthorized, match="Missing API key"):
            state(TenantConfig("acme", ("sk-alice",))).tenant_for(authorization, api_key)
