"""The published test vectors, checked against the implementation and against a second
encoder written only from ``docs/cache-key.md`` (so the page is precise enough to reimplement)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import orjson
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from edgecache.keys import TRANSPORT_FIELDS, Scope, cache_key, canonical_bytes

DOCS = Path(__file__).resolve().parents[2] / "docs"
SPEC = (DOCS / "cache-key.md").read_text(encoding="utf-8")
VECTORS = json.loads((DOCS / "cache-key-vectors.json").read_text(encoding="utf-8"))
BY_NAME = {case["name"]: case for case in VECTORS}


def scope_of(case: dict) -> Scope:
    prefix = case["prefix"]
    if prefix is None:
        return Scope(case["tenant"])
    return Scope(case["tenant"], prefix["id"], prefix["version"])


# ------------------------------------------------- an independent encoder, from the spec alone


def documented_transport_fields() -> set[str]:
    section = SPEC.split("## 3. Transport-only fields", 1)[1].split("## 4.", 1)[0]
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    return names


SPEC_TRANSPORT = documented_transport_fields()


def spec_normalise(value: object) -> object:
    if isinstance(value, float) and value == int(value) and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [spec_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: spec_normalise(v) for k, v in value.items()}
    return value


STR_HEADERS = ((0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32))
ARRAY_HEADERS = ((0xDC, ">H", 2**16), (0xDD, ">I", 2**32))
MAP_HEADERS = ((0xDE, ">H", 2**16), (0xDF, ">I", 2**32))


def spec_length(n: int, fix: int, fix_limit: int, headers: tuple[tuple[int, str, int], ...]) -> bytes:
    if n < fix_limit:
        return bytes([fix | n])
    for code, fmt, limit in headers:
        if n < limit:
            return bytes([code]) + struct.pack(fmt, n)
    raise AssertionError(n)


def spec_msgpack(value: object) -> bytes:
    if value is None:
        return b"\xc0"
    if value is False:
        return b"\xc2"
    if value is True:
        return b"\xc3"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        if value >= 0:
            for code, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if value < limit:
                    return bytes([code]) + struct.pack(fmt, value)
        if value >= -32:
            return struct.pack(">b", value)
        for code, fmt, bound in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15), (0xD2, ">i", 2**31), (0xD3, ">q", 2**63)):
            if value >= -bound:
                return bytes([code]) + struct.pack(fmt, value)
        raise AssertionError(value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        return spec_length(len(data), 0xA0, 32, STR_HEADERS) + data
    if isinstance(value, list):
        return spec_length(len(value), 0x90, 16, ARRAY_HEADERS) + b"".join(map(spec_msgpack, value))
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: item[0].encode("utf-8"))
        body = b"".join(spec_msgpack(k) + spec_msgpack(v) for k, v in items)
        return spec_length(len(items), 0x80, 16, MAP_HEADERS) + body
    raise AssertionError(type(value))


def spec_canonical(endpoint: str, request: dict, tenant: str, prefix: dict | None) -> bytes:
    document = {
        "endpoint": endpoint,
        "request": {k: spec_normalise(v) for k, v in request.items() if k not in SPEC_TRANSPORT},
        "scope": {"prefix": prefix, "tenant": tenant},
        "v": 1,
    }
    return spec_msgpack(document)


# ------------------------------------------------- the vectors


@pytest.mark.parametrize("case", VECTORS, ids=[case["name"] for case in VECTORS])
def test_every_vector_gives_its_published_bytes_and_key(case: dict) -> None:
    data = canonical_bytes(case["endpoint"], case["request"], scope_of(case))
    assert data.hex() == case["canonical_hex"]
    assert cache_key(case["endpoint"], case["request"], scope_of(case)).hex == case["key"]
    assert xxhash.xxh3_128_digest(bytes.fromhex(case["canonical_hex"])).hex() == case["key"]


@pytest.mark.parametrize("case", VECTORS, ids=[case["name"] for case in VECTORS])
def test_the_spec_alone_reproduces_every_vector(case: dict) -> None:
    data = spec_canonical(case["endpoint"], case["request"], case["tenant"], case["prefix"])
    assert data.hex() == case["canonical_hex"]


@pytest.mark.parametrize("case", VECTORS, ids=[case["name"] for case in VECTORS])
def test_vectors_key_the_same_when_parsed_as_the_edge_parses(case: dict) -> None:
    raw = (DOCS / "cache-key-vectors.json").read_bytes()
    request = {c["name"]: c for c in orjson.loads(raw)}[case["name"]]["request"]
    assert cache_key(case["endpoint"], request, scope_of(case)).hex == case["key"]


def test_vectors_share_a_key_exactly_when_they_say_so() -> None:
    distinct = [case["key"] for case in VECTORS if "same_key_as" not in case]
    assert len(set(distinct)) == len(distinct)
    for case in VECTORS:
        if "same_key_as" in case:
            assert case["key"] == BY_NAME[case["same_key_as"]]["key"], case["name"]


def test_vectors_cover_what_the_spec_promises() -> None:
    assert 12 <= len(VECTORS) <= 30
    assert {case["endpoint"] for case in VECTORS} == {"chat", "completions"}
    assert BY_NAME["chat-integral-floats"]["request"]["temperature"] == 1.0
    assert BY_NAME["chat-integral-floats"]["same_key_as"] == "chat-integer-numbers"
    assert BY_NAME["chat-stream-ignored"]["same_key_as"] == "chat-simple"
    assert BY_NAME["chat-unicode-nfc"]["key"] != BY_NAME["chat-unicode-nfd"]["key"]
    assert BY_NAME["chat-prefix-v1"]["key"] != BY_NAME["chat-prefix-v2"]["key"]
    assert isinstance(BY_NAME["completions-token-prompt"]["request"]["prompt"][0], int)


def test_the_spec_names_the_implemented_transport_fields() -> None:
    assert SPEC_TRANSPORT == TRANSPORT_FIELDS


def test_the_worked_example_in_the_spec_matches_its_vector() -> None:
    assert f"hashes to `{BY_NAME['chat-simple']['key']}`" in SPEC


# ------------------------------------------------- the spec and the code agree beyond the vectors

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=6), inner, max_size=20),
    max_leaves=40,
)


@given(
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.sampled_from(["chat", "completions"]),
    st.text(min_size=1, max_size=40),
    st.none() | st.fixed_dictionaries({"id": st.text(max_size=8), "version": st.text(max_size=40)}),
)
def test_the_spec_and_the_code_encode_any_request_alike(
    extra: dict, endpoint: str, tenant: str, prefix: dict | None
) -> None:
    extra.pop("stream", None)  # validated fields: their shapes are tested elsewhere
    extra.pop("n", None)
    request = {**extra, "model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "p"}
    scope = Scope(tenant, prefix and prefix["id"], prefix and prefix["version"])
    assert canonical_bytes(endpoint, request, scope) == spec_canonical(endpoint, request, tenant, prefix)
