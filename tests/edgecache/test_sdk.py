"""The SDK helper computes the key the edge computes, from what a client has in hand."""

from __future__ import annotations

import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecache import keys, sdk
from edgecache.errors import BadRequest
from edgecache.keys import Scope, tenant_id
from edgecache.sdk import cache_key

REQUEST = {
    "model": "llama-3.1-8b-instruct",
    "messages": [{"role": "user", "content": "What is the return window for sale items?"}],
    "temperature": 0.7,
}


def edge_key(body: object, tenant: str, endpoint: str = "chat", prefix: tuple[str, str] | None = None) -> str:
    """What the edge computes: the key of the parsed body within the tenant's scope."""
    scope = Scope(tenant, *(prefix or (None, None)))
    return keys.cache_key(endpoint, body, scope).hex


def test_sdk_key_is_the_edge_key_for_a_named_tenant() -> None:
    assert cache_key(REQUEST, tenant="acme") == edge_key(REQUEST, "acme")


def test_an_api_key_is_scoped_as_the_edge_scopes_an_unlisted_key() -> None:
    assert cache_key(REQUEST, api_key="sk-test-123") == edge_key(REQUEST, tenant_id("sk-test-123"))
    assert cache_key(REQUEST, api_key="sk-test-123") != cache_key(REQUEST, api_key="sk-other")


def test_no_tenant_and_no_api_key_is_anonymous() -> None:
    assert cache_key(REQUEST) == cache_key(REQUEST, tenant="anonymous") == cache_key(REQUEST, api_key="")


def test_tenant_and_api_key_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        cache_key(REQUEST, tenant="acme", api_key="sk-test-123")


def test_completions_endpoint_is_keyed_separately() -> None:
    body = {"model": "llama-3.1-8b", "prompt": [1, 2, 3]}
    assert cache_key(body, tenant="acme", endpoint="completions") == edge_key(body, "acme", "completions")
    both = {**REQUEST, "prompt": "p"}
    assert cache_key(both, tenant="acme", endpoint="completions") != cache_key(both, tenant="acme")


def test_prefix_version_is_part_of_the_key() -> None:
    referencing = {**REQUEST, "prefix": {"id": "kb-returns"}}
    v1 = cache_key(referencing, tenant="acme", prefix_id="kb-returns", prefix_version="v1")
    v2 = cache_key(referencing, tenant="acme", prefix_id="kb-returns", prefix_version="v2")
    assert v1 == edge_key(referencing, "acme", prefix=("kb-returns", "v1"))
    assert v1 != v2
    assert v1 != cache_key(REQUEST, tenant="acme")


def test_a_prefix_reference_without_its_version_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix_version"):
        cache_key({**REQUEST, "prefix": {"id": "kb-returns"}}, tenant="acme")
    with pytest.raises(ValueError, match="both or neither"):
        cache_key({**REQUEST, "prefix": {"id": "kb-returns"}}, tenant="acme", prefix_id="kb-returns")
    assert cache_key({**REQUEST, "prefix": None}, tenant="acme") == cache_key(REQUEST, tenant="acme")


def test_openai_create_kwargs_key_like_the_body_they_send() -> None:
    kwargs = {
        **REQUEST,
        "extra_body": {"top_k": 40, "temperature": 0.2},
        "extra_headers": {"X-Trace": "1"},
        "extra_query": {"debug": "1"},
    }
    body = {**REQUEST, "top_k": 40, "temperature": 0.2}
    assert cache_key(kwargs, tenant="acme") == edge_key(body, "acme")


def test_a_request_the_edge_would_refuse_raises_bad_request() -> None:
    with pytest.raises(BadRequest) as caught:
        cache_key({"model": "m", "messages": []}, tenant="acme")
    assert caught.value.param == "messages"
    with pytest.raises(BadRequest):
        cache_key(["not", "an", "object"], tenant="acme")  # type: ignore[arg-type]


@given(
    st.text(min_size=1, max_size=20),
    st.lists(st.text(max_size=30), min_size=1, max_size=3),
    st.floats(0, 2),
    st.booleans(),
    st.from_regex(r"sk-[A-Za-z0-9_-]{1,20}", fullmatch=True),
)
@settings(max_examples=30)
def test_the_key_of_what_the_openai_client_sends_is_the_sdk_key(
    model: str, texts: list[str], temperature: float, stream: bool, api_key: str
) -> None:
    # The real OpenAI client serialises the request; the edge's view is the parsed wire body
    # and the bearer token. The SDK, given the create() arguments, must agree.
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=COMPLETION)

    client = openai.OpenAI(
        api_key=api_key,
        base_url="http://edge.invalid/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    kwargs = {
        "model": model,
        "messages": [{"role": "user", "content": text} for text in texts],
        "temperature": temperature,
        "user": "customer-42",
        "extra_body": {"top_k": 40},
    }
    with client:
        client.chat.completions.create(**kwargs)
    (request,) = seen
    assert request.url.path == "/v1/chat/completions"
    wire_body = orjson.loads(request.content)
    bearer = request.headers["authorization"].removeprefix("Bearer ")
    assert edge_key(wire_body, tenant_id(bearer)) == cache_key(kwargs, api_key=api_key)
    streamed = {**wire_body, "stream": stream, "stream_options": {"include_usage": True}}
    assert edge_key(streamed, tenant_id(bearer)) == cache_key(kwargs, api_key=api_key)


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
}


def test_sdk_re_exports_the_scope_names() -> None:
    assert sdk.tenant_id is keys.tenant_id
    assert sdk.Scope is keys.Scope
    assert sdk.SPEC_VERSION == keys.SPEC_VERSION == 1
    assert sdk.__all__ == ["SPEC_VERSION", "Scope", "cache_key", "prefix_version", "prefixed_request", "tenant_id"]


def test_prefixed_request_keys_like_the_edge() -> None:
    from edgecache.prefix import prefix_version

    body = sdk.prefixed_request("returns", model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "prefix": "returns"}
    scope = keys.Scope(keys.tenant_id("k"), "returns", prefix_version("policy"))
    assert sdk.cache_key(body, api_key="k", prefix_version=sdk.prefix_version("policy")) == \
        keys.cache_key("chat", body, scope).hex
    with pytest.raises(BadRequest):
        sdk.prefixed_request("bad id!", model="m", messages=[])
