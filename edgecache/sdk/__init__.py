"""Client-side helpers: compute the key an edge node will give a request, without a network.

    >>> from edgecache.sdk import cache_key
    >>> cache_key({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, tenant="acme")
    '6253dbaa526afefe0bdb29a0773d506d'

The key is the one ``docs/cache-key.md`` specifies, computed by the same code the edge runs,
so a client can purge, look up or log exactly the entry its request hits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgecache.keys import SPEC_VERSION, Scope, tenant_id
from edgecache.keys import cache_key as _edge_cache_key
from edgecache.prefix import prefix_version, validate_prefix_id

__all__ = ["SPEC_VERSION", "Scope", "cache_key", "prefix_version", "prefixed_request", "tenant_id"]

# Keyword arguments of the OpenAI Python client that never reach the request body.
_CLIENT_ONLY = frozenset({"extra_headers", "extra_query", "extra_body"})


def cache_key(
    request: Mapping,
    *,
    tenant: str | None = None,
    api_key: str | None = None,
    endpoint: str = "chat",
    prefix_id: str | None = None,
    prefix_version: str | None = None,
) -> str:
    """The 32-hex-digit cache key an edge node computes for ``request``.

    ``request`` is the JSON body (or the keyword arguments given to the OpenAI client's
    ``create``: ``extra_body`` is merged in and ``extra_headers``/``extra_query`` dropped, as
    the client does before sending). ``endpoint`` is ``"chat"`` (``/v1/chat/completions``) or
    ``"completions"`` (``/v1/completions``).

    The scope: pass ``tenant`` (the tenant name, in topologies that list tenants) or
    ``api_key`` (an unlisted key, hashed with :func:`tenant_id`), not both; neither means
    ``"anonymous"``. A request that references a static prefix needs ``prefix_id`` and
    ``prefix_version`` (the version the registry reports), since the edge keys on them.

    Raises :class:`edgecache.errors.BadRequest` for a request the edge would answer with a
    400, and ``ValueError`` for inconsistent arguments.
    """
    if tenant is not None and api_key is not None:
        raise ValueError("pass tenant or api_key, not both")
    if tenant is None:
        tenant = tenant_id(api_key)
    body = _wire_body(request)
    if isinstance(body, dict) and prefix_id is None and prefix_version is not None:
        prefix_id = body.get("prefix")
    if isinstance(body, dict) and body.get("prefix") is not None and prefix_id is None:
        raise ValueError(
            "the request references a prefix; pass prefix_id and prefix_version "
            "(the edge keys on the prefix's current version)"
        )
    scope = Scope(tenant, prefix_id, prefix_version)
    return _edge_cache_key(endpoint, body, scope).hex


def _wire_body(request: object) -> object:
    if not isinstance(request, Mapping):
        return request  # the key code reports the shape error, as the edge would
    if not _CLIENT_ONLY.intersection(request):
        return dict(request)
    body = {name: value for name, value in request.items() if name not in _CLIENT_ONLY}
    extra = request.get("extra_body")
    if isinstance(extra, Mapping):
        body.update(extra)
    return body


def prefixed_request(prefix_id: str, *, model: str, messages: list[dict[str, Any]],
                     **params: Any) -> dict[str, Any]:
    """A chat request that references the registered prefix ``prefix_id`` instead of sending it.

    The edge keys it on the prefix's current version and the origin puts the prefix text
    first, as a system message. With the OpenAI client, send ``messages`` and pass
    ``extra_body={"prefix": prefix_id}``; this helper builds the same JSON body::

        body = prefixed_request("returns-policy", model="m", messages=[{"role": "user", "content": "..."}])
        key = cache_key(body, api_key=KEY, prefix_version=prefix_version(policy_text))
    """
    validate_prefix_id(prefix_id, param="prefix")
    return {"model": model, "messages": list(messages), **params, "prefix": prefix_id}
