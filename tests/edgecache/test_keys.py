"""The cache key: what it covers, what it ignores, and which requests it refuses."""

from __future__ import annotations

import inspect
import json
import random
import re
import types
import unicodedata

import msgpack
import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgecache import keys
from edgecache.errors import BadRequest
from edgecache.keys import (
    ENDPOINTS,
    SPEC_VERSION,
    TRANSPORT_FIELDS,
    CacheKey,
    Scope,
    cache_key,
    canonical_bytes,
    canonical_request,
    tenant_id,
)

ACME = Scope("acme")

# ---------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.text(max_size=40)},
        optional={"name": st.text(min_size=1, max_size=8)},
    ),
    min_size=1,
    max_size=4,
)
# Fields a request may carry besides model and messages: known sampling parameters and extras.
sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "max_tokens": st.integers(1, 4096),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
        "n": st.integers(1, 4),
        "logprobs": st.booleans(),
        "frequency_penalty": st.floats(-2, 2),
        "presence_penalty": st.floats(-2, 2),
        "top_k": st.integers(-1, 100),
        "guided_json": json_values,
    },
)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict:
    body = {"model": draw(st.text(min_size=1, max_size=12)), "messages": draw(messages)}
    body.update(draw(sampling))
    return body


def reorder(value: object, rnd: random.Random) -> object:
    """The same JSON value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: reorder(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [reorder(v, rnd) for v in value]
    return value


def integers_as_floats(value: object) -> object:
    """The same JSON value with every exactly representable integer written as a float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) <= 2**53:
        return float(value)
    if isinstance(value, dict):
        return {k: integers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integers_as_floats(v) for v in value]
    return value


def key(body: object, scope: Scope = ACME, endpoint: str = "chat") -> str:
    return cache_key(endpoint, body, scope).hex


def chat(**fields: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


# ---------------------------------------------------------------- same meaning, same key


@given(chat_requests(), st.randoms(use_true_random=False))
def test_object_key_order_never_changes_the_key(body: dict, rnd: random.Random) -> None:
    assert key(reorder(body, rnd)) == key(body)


@given(chat_requests())
def test_integral_floats_and_integers_give_the_same_key(body: dict) -> None:
    assert key(integers_as_floats(body)) == key(body)


@given(chat_requests(), st.dictionaries(st.sampled_from(sorted(TRANSPORT_FIELDS)), json_values))
def test_transport_fields_never_change_the_key(body: dict, transport: dict) -> None:
    if "stream" in transport:
        transport["stream"] = bool(transport["stream"])  # a non-boolean stream is a bad request
    assert key({**body, **transport}) == key(body)


@given(chat_requests())
def test_a_request_keeps_its_key_through_json_on_the_wire(body: dict) -> None:
    # The SDK keys the dict a client sends; the edge keys what it parses from the wire.
    assert key(orjson.loads(orjson.dumps(body))) == key(body)
    assert key(json.loads(json.dumps(body))) == key(body)


@given(chat_requests(), st.randoms(use_true_random=False))
def test_canonical_bytes_are_deterministic_and_decode_to_the_sorted_document(
    body: dict, rnd: random.Random
) -> None:
    data = canonical_bytes("chat", body, ACME)
    assert canonical_bytes("chat", reorder(body, rnd), ACME) == data
    document = msgpack.unpackb(data)
    assert document == {
        "endpoint": "chat",
        "request": canonical_request("chat", body),
        "scope": {"prefix": None, "tenant": "acme"},
        "v": SPEC_VERSION,
    }

    def assert_sorted(value: object) -> None:
        if isinstance(value, dict):
            assert list(value) == sorted(value, key=lambda k: k.encode())
            for v in value.values():
                assert_sorted(v)
        elif isinstance(value, list):
            for v in value:
                assert_sorted(v)

    assert_sorted(document)


def test_integral_floats_become_integers_and_negative_zero_is_zero() -> None:
    request = canonical_request("chat", chat(temperature=1.0, presence_penalty=-0.0, max_tokens=64.0))
    assert request["temperature"] == 1 and type(request["temperature"]) is int
    assert request["presence_penalty"] == 0 and type(request["presence_penalty"]) is int
    assert type(request["max_tokens"]) is int
    assert key(chat(seed=2.0**53)) == key(chat(seed=2**53))


def test_large_floats_stay_floats() -> None:
    assert type(canonical_request("chat", chat(seed=2.0**53 + 2))["seed"]) is float
    assert key(chat(seed=2.0**53 + 2)) != key(chat(seed=2**53 + 2))
    assert type(canonical_request("chat", chat(x=1e20))["x"]) is float


def test_numbers_inside_nested_schemas_are_normalised() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"maximum": 10.0}}}
    same = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"maximum": 10}}}
    assert key(chat(response_format=schema)) == key(chat(response_format=same))


def test_other_mappings_and_tuples_key_like_dicts_and_lists() -> None:
    body = types.MappingProxyType(chat(stop=("a", "b"), extra=types.MappingProxyType({"k": 1})))
    assert key(body) == key(chat(stop=["a", "b"], extra={"k": 1}))


# ---------------------------------------------------------------- other meaning, other key


def changed(strategy: st.SearchStrategy, field: str):
    @given(chat_requests(), strategy, strategy)
    def check(body: dict, before: object, after: object) -> None:
        assume(before != after)
        assert key({**body, field: before}) != key({**body, field: after})

    return check


test_changing_the_model_changes_the_key = changed(st.text(min_size=1, max_size=12), "model")
test_changing_temperature_changes_the_key = changed(st.floats(0, 2), "temperature")
test_changing_top_p_changes_the_key = changed(st.floats(0, 1), "top_p")
test_changing_the_seed_changes_the_key = changed(st.integers(-(2**63), 2**64 - 1), "seed")
test_changing_max_tokens_changes_the_key = changed(st.integers(1, 10**6), "max_tokens")
test_changing_stop_sequences_changes_the_key = changed(st.lists(st.text(max_size=4), max_size=3), "stop")
test_changing_n_changes_the_key = changed(st.integers(1, 16), "n")
test_changing_an_unknown_sampling_field_changes_the_key = changed(json_values, "min_p")
test_changing_the_tools_changes_the_key = changed(
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.text(min_size=1, max_size=8), "parameters": json_values}
                ),
            }
        ),
        max_size=2,
    ),
    "tools",
)


@given(chat_requests(), st.data())
def test_changing_a_message_changes_the_key(body: dict, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(body["messages"]) - 1))
    part, strategy = data.draw(
        st.sampled_from(
            [("content", st.text(max_size=40)), ("role", roles), ("name", st.text(min_size=1, max_size=8))]
        )
    )
    new = data.draw(strategy)
    assume(body["messages"][index].get(part) != new)
    edited = json.loads(json.dumps(body))
    edited["messages"][index][part] = new
    assert key(edited) != key(body)


@given(chat_requests())
def test_adding_or_removing_a_message_changes_the_key(body: dict) -> None:
    longer = {**body, "messages": [*body["messages"], {"role": "user", "content": "and?"}]}
    assert key(longer) != key(body)


@given(chat_requests(), st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10))
def test_changing_the_tenant_changes_the_key(body: dict, one: str, other: str) -> None:
    assume(one != other)
    assert key(body, Scope(one)) != key(body, Scope(other))


@given(chat_requests(), st.text(max_size=10), st.text(max_size=10))
def test_changing_the_prefix_version_changes_the_key(body: dict, one: str, other: str) -> None:
    assume(one != other)
    assert key(body, Scope("acme", "kb", one)) != key(body, Scope("acme", "kb", other))
    assert key(body, Scope("acme", "kb", one)) != key(body)


@given(chat_requests())
def test_the_endpoint_is_part_of_the_key(body: dict) -> None:
    both = {**body, "prompt": "p"}  # valid for either endpoint
    assert key(both, endpoint="chat") != key(both, endpoint="completions")


@pytest.mark.parametrize(
    ("boolean", "number"), [(True, 1), (False, 0), (True, 1.0), (False, -0.0)]
)
def test_booleans_and_numbers_give_different_keys(boolean: bool, number: float) -> None:
    assert key(chat(logprobs=boolean)) != key(chat(logprobs=number))
    assert key(chat(extra={"deep": [boolean]})) != key(chat(extra={"deep": [number]}))


def test_an_absent_parameter_is_not_its_default_nor_null() -> None:
    assert len({key(chat()), key(chat(temperature=1)), key(chat(temperature=None))}) == 3


def test_unicode_is_not_normalised() -> None:
    nfc = unicodedata.normalize("NFC", "Café über")
    nfd = unicodedata.normalize("NFD", "Café über")
    assert nfc != nfd
    messages_nfc = [{"role": "user", "content": nfc}]
    messages_nfd = [{"role": "user", "content": nfd}]
    assert key(chat(messages=messages_nfc)) != key(chat(messages=messages_nfd))


def test_unknown_fields_are_in_the_key_and_nested_transport_names_are_not_dropped() -> None:
    request = canonical_request("chat", chat(top_k=40, guided_json={"user": 1, "stream": True}, stream=True))
    assert request["top_k"] == 40
    assert request["guided_json"] == {"stream": True, "user": 1}
    assert "stream" not in request


def test_transport_fields_are_the_documented_list() -> None:
    assert TRANSPORT_FIELDS == {
        "stream", "stream_options", "timeout", "request_timeout", "user", "metadata", "store",
        "service_tier", "prefix",
    }
    request = canonical_request("chat", chat(**{name: None for name in TRANSPORT_FIELDS}))
    assert set(request) == {"model", "messages"}


def test_canonical_request_sorts_keys_at_every_level() -> None:
    request = canonical_request("chat", {"messages": [{"role": "user", "content": "x"}], "model": "m"})
    assert list(request) == ["messages", "model"]
    assert list(request["messages"][0]) == ["content", "role"]


def test_keys_sort_by_code_point_not_utf16_units() -> None:
    # U+FFFD sorts before U+1F600 by code point (and UTF-8 bytes), after it in UTF-16.
    request = canonical_request("chat", chat(extra={"\U0001f600": 1, "\ufffd": 2}))
    assert list(request["extra"]) == ["\ufffd", "\U0001f600"]


# ---------------------------------------------------------------- refused requests

BAD_REQUESTS = [
    ("chat", [], None, "JSON object"),
    ("chat", "text", None, "JSON object"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "model", "'model' is missing"),
    ("chat", {"model": 3, "messages": [{"role": "user"}]}, "model", "non-empty string"),
    ("chat", {"model": "", "messages": [{"role": "user"}]}, "model", "non-empty string"),
    ("chat", {"model": "m"}, "messages", "'messages' is missing"),
    ("chat", {"model": "m", "messages": []}, "messages", "non-empty array"),
    ("chat", {"model": "m", "messages": {"role": "user"}}, "messages", "non-empty array"),
    ("chat", {"model": "m", "messages": ["hi"]}, "messages[0]", "object with a 'role'"),
    ("chat", {"model": "m", "messages": [{"role": "user"}, {"content": "x"}]}, "messages[1].role", "is missing"),
    ("chat", {"model": "m", "messages": [{"role": None}]}, "messages[0].role", "must be a string"),
    ("completions", {"model": "m"}, "prompt", "'prompt' is missing"),
    ("completions", {"model": "m", "prompt": None}, "prompt", "'prompt' must be"),
    ("completions", {"model": "m", "prompt": []}, "prompt", "'prompt' must be"),
    ("completions", {"model": "m", "prompt": ["a", 1]}, "prompt", "'prompt' must be"),
    ("completions", {"model": "m", "prompt": [1, True]}, "prompt", "'prompt' must be"),
    ("completions", {"model": "m", "prompt": [[1, 2], []]}, "prompt", "'prompt' must be"),
    ("completions", {"model": "m", "prompt": {"text": "x"}}, "prompt", "'prompt' must be"),
    ("chat", chat(stream="yes"), "stream", "'stream' must be a boolean"),
    ("chat", chat(stream=1), "stream", "'stream' must be a boolean"),
    ("chat", chat(n=0), "n", "positive integer"),
    ("chat", chat(n=1.5), "n", "positive integer"),
    ("chat", chat(n=True), "n", "positive integer"),
    ("chat", chat(temperature=float("nan")), "temperature", "NaN and infinities"),
    ("chat", chat(tools=[{"function": {"parameters": {"maximum": float("inf")}}}]),
     "tools[0].function.parameters.maximum", "NaN and infinities"),
    ("chat", chat(messages=[{"role": "user", "content": [{"x": float("-inf")}]}]),
     "messages[0].content[0].x", "NaN and infinities"),
    ("chat", chat(seed=2**64), "seed", "outside the range"),
    ("chat", chat(seed=-(2**63) - 1), "seed", "outside the range"),
    ("chat", chat(logit_bias={50256: -100}), "logit_bias", "keys must be strings"),
    ("chat", chat(logit_bias={"1": 1, 2: 2}), "logit_bias", "keys must be strings"),
    ("chat", chat(x={"y": {1, 2}}), "x.y", "type set"),
    ("chat", chat(x=b"bytes"), "x", "type bytes"),
    ("chat", chat(messages=[{"role": "user", "content": "\ud800"}]), "messages[0].content", "lone surrogate"),
    ("chat", chat(x={"\udc00": 1}), "x", "lone surrogate"),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "message"), BAD_REQUESTS)
def test_malformed_requests_are_refused_with_the_field_named(
    endpoint: str, body: object, param: str | None, message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        canonical_request(endpoint, body)
    error = caught.value
    assert error.param == param
    assert message in error.message
    assert error.status == 400
    assert orjson.loads(error.body())["error"]["param"] == param


def test_non_string_keys_at_the_top_level_are_refused() -> None:
    with pytest.raises(BadRequest, match="keys must be strings"):
        canonical_request("chat", {**chat(), 1: "x"})


def test_extreme_integers_that_fit_are_accepted() -> None:
    assert key(chat(seed=2**64 - 1)) != key(chat(seed=-(2**63)))


def nested(depth: int, container: type = list) -> dict:
    """A chat body whose innermost array sits at ``depth`` (the body itself is depth 1)."""
    value = container()
    for _ in range(depth - 2):
        value = container([value])
    return chat(x=value)


def test_nesting_is_bounded_by_max_depth_without_exhausting_the_stack() -> None:
    assert keys.MAX_DEPTH == 64
    assert key(nested(keys.MAX_DEPTH)) != key(nested(keys.MAX_DEPTH - 1))
    for body in (nested(keys.MAX_DEPTH + 1), nested(5000), nested(keys.MAX_DEPTH + 1, tuple)):
        with pytest.raises(BadRequest, match="nest at most 64 deep") as caught:
            canonical_request("chat", body)
        assert caught.value.status == 400 and caught.value.param == "x" + "[0]" * (keys.MAX_DEPTH - 1)


def test_null_stream_and_n_are_accepted() -> None:
    assert canonical_request("chat", chat(stream=None, n=None))["n"] is None
    assert canonical_request("chat", chat(n=2.0))["n"] == 2


@pytest.mark.parametrize(
    "prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [1.0, 2.0]]
)
def test_every_prompt_shape_is_accepted(prompt: object) -> None:
    assert canonical_request("completions", {"model": "m", "prompt": prompt})["prompt"]


def test_an_unknown_endpoint_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        canonical_request("embeddings", chat())
    assert ENDPOINTS == ("chat", "completions")


# ---------------------------------------------------------------- values


def test_cache_key_text_form_round_trips() -> None:
    k = cache_key("chat", chat(), ACME)
    assert re.fullmatch(r"[0-9a-f]{32}", k.hex)
    assert str(k) == k.hex
    assert CacheKey.from_hex(k.hex) == k
    assert CacheKey.from_hex(k.hex.upper()) == k
    assert len(k.digest) == 16


@pytest.mark.parametrize(
    "text", ["", "00", "0" * 31, "0" * 33, "g" * 32, " " + "0" * 31, "0" * 30 + "\n0", "\u0660" * 32, None, b"0" * 32]
)
def test_malformed_key_text_is_refused(text: object) -> None:
    with pytest.raises(ValueError):
        CacheKey.from_hex(text)  # type: ignore[arg-type]


def test_a_cache_key_is_sixteen_bytes() -> None:
    with pytest.raises(ValueError):
        CacheKey(b"\0" * 15)


def test_scope_prefix_id_and_version_go_together() -> None:
    with pytest.raises(ValueError, match="both or neither"):
        Scope("acme", prefix_id="kb")
    with pytest.raises(ValueError, match="both or neither"):
        Scope("acme", prefix_version="v1")
    with pytest.raises(ValueError, match="non-empty"):
        Scope("")
    assert Scope("acme", "kb", "v1").prefix_version == "v1"


def test_tenant_id_hashes_the_api_key() -> None:
    assert tenant_id("sk-test-123") == "key:e0dbaa0c6455768bf812d8345ec96a26"  # as in the spec
    assert tenant_id(None) == tenant_id("") == "anonymous"
    assert tenant_id("sk-a") != tenant_id("sk-b")
    assert "sk-test-123" not in tenant_id("sk-test-123")


def test_module_exports_are_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(keys).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", keys.__name__) == keys.__name__
    }
    assert keys.__all__ == sorted(keys.__all__, key=isort_order)  # as ruff's RUF022 keeps it
    assert set(keys.__all__) == public


def isort_order(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)
