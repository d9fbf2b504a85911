"""Generated malformed and edge-case requests against a real stack: bad input is a 4xx with an
OpenAI-style error body, never a 5xx or a crash, and an answer stored before still hits.

Hypothesis runs synchronously in a worker thread (``asyncio.to_thread``) with a blocking
``http.client`` client while the stack serves on the test's event loop: one stack per test,
shrinking works (each shrink step is a real request), and ``@example`` pins regressions.
A blocking client also sends exactly the bytes drawn (no header or JSON re-encoding).

Not generated, because aiohttp answers them itself before any handler or middleware runs:
header bytes HTTP forbids (controls, DEL: a plain-text 400), ``Content-Encoding: br`` or
``zstd`` without their optional packages (a plain-text 400), and a ``deflate`` body that does
not decode. aiohttp 3.14 fails the latter when the message ends, and about one keep-alive
request in ten then gets no answer at all (edge and origin alike: a connection held open).
``gzip`` on a body that is not gzip fails at its first bytes, which the handler reads: it is
generated (aiohttp's parser sometimes answers it first, with a plain-text 400: tolerated).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import time
import zlib
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgecache.config import AuthConfig, TenantConfig
from edgecache.webhook import sign
from tests.conftest import NODE_TOKEN

pytestmark = [
    pytest.mark.integration,
    # The stack draws trace ids from the global ``random`` on the loop thread while hypothesis
    # generates in the worker thread; hypothesis would take that for a strategy using ``random``.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"),
]

ADMIN_TOKEN = AuthConfig().admin_token
SECRET = AuthConfig().webhook_secret
API_KEY = "sk-fuzz"
CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": "What is our refund policy?"}]}
COMPLETION = {"model": "sim-llm", "prompt": "Our refund policy is"}
PREFIX = {"id": "p1", "text": "You answer questions about refunds.", "tags": ["policy:refunds"]}
BASELINE = {"model": "sim-llm", "messages": [{"role": "user", "content": "Stored before the fuzzing."}]}
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- a blocking client (worker thread) and what every answer must be ----------------------


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...] = ()
    body: bytes | None = None

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]   # lower-case names
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI-style error object of a 4xx/5xx, asserting its shape."""
        try:
            body = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"{self.status} without a JSON body: {self.body[:200]!r}") from None
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), f"{self.status} without an 'error' object: {self.body[:200]!r}"
        assert isinstance(error.get("message"), str) and error["message"], self.body[:200]
        assert isinstance(error.get("type"), str) and error["type"], self.body[:200]
        return error


def send(base_url: str, call: Call) -> Reply:
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.putrequest(call.method, call.path, skip_accept_encoding=True)
        for name, value in call.headers:
            conn.putheader(name, value)
        if call.body is not None:
            conn.putheader("Content-Length", str(len(call.body)))
        conn.endheaders(call.body)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def check(reply: Reply, call: Call, target: str) -> None:
    """Below 500 (but a miss under only-if-cached, 504 by design); a 4xx says why in an OpenAI
    body; a 200 of a completion endpoint is a whole answer. ``target``: "edge" or "origin"."""
    where = f"{target}: {call} -> {reply.status} {reply.body[:300]!r}"
    if reply.status == 400 and reply.headers.get("content-type", "").startswith("text/plain") \
            and _not_compressed(call):
        return   # aiohttp's parser found it first (the body arrived with the headers): no handler ran
    if reply.status >= 400:
        error = reply.error()
        only_if_cached = b"only-if-cached" in (call.header("Cache-Control") or b"").lower()
        if reply.status == 504 and only_if_cached:
            assert error["type"] == "cache_miss", where
        else:
            assert reply.status < 500, where
    if call.path.split("?")[0] in COMPLETION_PATHS and reply.status == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            assert reply.body.rstrip().endswith(b"data: [DONE]"), where
        else:
            assert isinstance(orjson.loads(reply.body).get("choices"), list), where


def ask(body: dict[str, Any], *headers: tuple[str, bytes]) -> Call:
    return Call("POST", "/v1/chat/completions", (("Content-Type", b"application/json"), *headers),
                orjson.dumps(body))


def register_prefix(origin: str) -> None:
    admin = ("Authorization", f"Bearer {ADMIN_TOKEN}".encode())
    assert send(origin, Call("POST", "/v1/prefixes", (admin,), orjson.dumps(PREFIX))).status == 201


def store_baseline(edge: str, *headers: tuple[str, bytes]) -> Reply:
    """Fetch and store BASELINE, then return its first hit."""
    first = send(edge, ask(BASELINE, *headers))
    assert first.status == 200 and "; stored" in first.headers["cache-status"], first
    hit = send(edge, ask(BASELINE, *headers))
    assert "; hit;" in hit.headers["cache-status"], hit
    return hit


def assert_baseline_kept(edge: str, before: Reply, *headers: tuple[str, bytes]) -> None:
    after = send(edge, ask(BASELINE, *headers))
    assert "; hit;" in after.headers["cache-status"], after
    assert after.body == before.body


# -- strategies -----------------------------------------------------------------------------

EXTREME_INTS = [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
                10**30, -(10**30)]
ODD_CHARS = ["\x00", "\ud800", "\udfff", "\u2028", "\ufeff", "\u202e", "é", "²", "٣", "😀", "\uffff",
             "\U0010ffff", "\\", '"']

numbers = st.one_of(st.integers(-2, 20), st.sampled_from(EXTREME_INTS),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0.5, -0.0, 2.0, 1e308, 5e-324]))
text = st.text(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)), max_size=12)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)

DROP = object()   # an override that removes the field
NUMERIC_FIELDS = ("max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed",
                  "presence_penalty", "logprobs", "top_logprobs")
OTHER_FIELDS = ("model", "messages", "prompt", "stream", "stream_options", "stop", "prefix", "tools",
                "user", "echo", "logit_bias", "metadata")

content_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["text", "image_url", "refusal"]), text),
                           "text": st.one_of(text, json_values)}),
    json_values), max_size=3)
message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", ""]),
                           json_values),
         "content": st.one_of(text, st.none(), content_parts, json_values)},
        optional={"name": json_values, "tool_calls": json_values, "tool_call_id": json_values}),
    json_values)
prefix_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Values for one request field: its own odd cases, any JSON value, or none at all."""
    own: dict[str, st.SearchStrategy[Any]] = {
        "messages": st.lists(message, max_size=4),
        "prompt": st.one_of(text, st.lists(st.one_of(text, numbers, st.lists(numbers, max_size=3)), max_size=3)),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}),
        "prefix": st.one_of(st.just(PREFIX["id"]), prefix_ids, text),
        "model": st.sampled_from(["sim-llm", "", "other-model", "sim-llm\x00"]),
    }
    return st.one_of(numbers if name in NUMERIC_FIELDS else own.get(name, text), json_values, st.just(DROP))


overrides = st.lists(st.sampled_from(NUMERIC_FIELDS + OTHER_FIELDS).flatmap(
    lambda name: st.tuples(st.just(name), field_values(name))), max_size=3)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a client might send it: escaped (lone surrogates as \\udXXX) or raw UTF-8
    (lone surrogates then make the bytes invalid UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False).encode("utf-8", "surrogatepass")


def mutated(base: dict[str, Any]) -> st.SearchStrategy[Any]:
    def apply(changes: list[tuple[str, Any]]) -> dict[str, Any]:
        body = dict(base)
        for name, value in changes:
            if value is DROP:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return overrides.map(apply)


RAW_BODIES = [b"", b"null", b"NaN", b"[", b"{", b'{"model":', b"\xef\xbb\xbf" + orjson.dumps(CHAT),
              orjson.dumps(CHAT) + b"garbage", b"[" * 5000 + b"]" * 5000, b"1" * 5000, b"1e400",
              b'{"model": "sim-llm", "messages": [{"role": "user", "content": "\\ud800"}]}',
              b'{"model": "sim-llm", "prompt": "x", "max_tokens": 1e400}',
              b'{"model": "sim-llm", "model": 7, "prompt": "x"}', b"\xff\xfe{}", b"\x00"]


def bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    as_json = st.one_of(mutated(base), mutated(base), mutated(base), json_values)
    valid = orjson.dumps(base)
    return st.one_of(
        st.builds(encode, as_json, st.booleans()),
        st.builds(encode, as_json, st.booleans()),
        st.binary(max_size=64),
        st.sampled_from(RAW_BODIES),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
    )


CONTENT_ENCODINGS = [b"gzip", b"deflate", b"GZIP", b"identity", b"x-foo"]   # (not br, zstd: see the docstring)
CONTENT_TYPES = [b"application/json", b"text/plain", b"application/x-www-form-urlencoded",
                 b"multipart/form-data; boundary=x", b"application/json; charset=latin-1", b"", b"*/*"]
_HEADER_BYTES = bytes([9, *range(32, 127), *range(128, 256)])   # what HTTP allows in a field value
header_text = st.text(st.one_of(st.characters(min_codepoint=32, max_codepoint=126),
                                st.sampled_from(["\t", "é", "²", "٣", "😀", "\u2028"])), max_size=40)
header_values = st.one_of(header_text.map(str.encode),
                          st.binary(max_size=40).map(lambda b: bytes(c for c in b if c in _HEADER_BYTES)))


def query_string(query: dict[str, str]) -> str:
    return "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query.items())


sometimes = st.sampled_from([False] * 7 + [True])   # one in eight, shrinking to False


def gzip_claim(body: bytes, claim: bool) -> tuple[tuple[str, bytes], ...]:
    """``Content-Encoding: gzip`` on a body that is not gzip (it fails at its first bytes)."""
    return (("Content-Encoding", b"gzip"),) if claim and not body.startswith(b"\x1f\x8b") else ()


def optional_header(name: str, values: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple]:
    return st.one_of(st.just(()), values.map(lambda v: ((name, v),)))


@st.composite
def edge_body_calls(draw: st.DrawFn) -> Call:
    path = draw(st.sampled_from(COMPLETION_PATHS))
    body = draw(bodies(CHAT if path == COMPLETION_PATHS[0] else COMPLETION))
    headers = (*draw(optional_header("Content-Type", st.sampled_from(CONTENT_TYPES))),
               *draw(optional_header("Authorization", st.sampled_from([b"Bearer sk-test", b"Bearer", b"x"]))))
    return Call("POST", path, headers, body)


tags = st.one_of(st.from_regex(r"[A-Za-z0-9._:/@+\-]{1,12}", fullmatch=True), header_text)
cache_control = st.one_of(header_values, st.lists(st.one_of(st.sampled_from([
    "no-store", "no-cache", "only-if-cached", "max-age=0", "max-age=60", "max-age=", "max-age=-1",
    "max-age=1.5", 'max-age="5"', "max-age=²", "max-age=٣", "max-age=" + "9" * 400,
    "max-age=99999999999999999999", "private", "NO-CACHE", "=", ""]), header_text), max_size=3)
    .map(lambda parts: ", ".join(parts).encode()))
ttls = st.one_of(header_values, st.integers().map(lambda n: str(n).encode()), st.sampled_from([
    b"0", b"1", b"60", b"-1", b"1.5", b" 7 ", "²".encode(), "٣".encode(), b"9" * 5000,
    b"99999999999999999999", b"+5", b"0x10", b""]))
cache_tags = st.one_of(header_values, st.lists(tags, max_size=40).map(lambda t: ", ".join(t).encode()))
FUZZ_AUTH = ("Authorization", f"Bearer {API_KEY}".encode())
odd_authorizations = st.one_of(
    st.sampled_from([b"bearer sk-fuzz", b"Bearer  sk-fuzz ", b"Bearer", b"Bearer ", b"Basic c2stZnV6eg==",
                     b"sk-fuzz", b"Bearer sk-fuzzz", b"Bearer sk-fuz"]),
    header_values.map(lambda v: b"Bearer " + v), header_values)
traceparents = st.one_of(header_values, st.sampled_from([
    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
    b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"]))


@st.composite
def edge_header_calls(draw: st.DrawFn) -> Call:
    path = draw(st.sampled_from(COMPLETION_PATHS))
    base = CHAT if path == COMPLETION_PATHS[0] else COMPLETION
    wire = st.fixed_dictionaries({}, optional={"stream": st.booleans(),
                                               "stream_options": st.just({"include_usage": True})})
    body = {**base, **draw(wire)}
    # Mostly the valid key: the other headers are only read once the key is accepted.
    auth = draw(st.sampled_from(["valid", "valid", "valid", "odd", "none"]))
    headers = (*((FUZZ_AUTH,) if auth == "valid" else ()),
               *((("Authorization", draw(odd_authorizations)),) if auth == "odd" else ()),
               *draw(optional_header("Cache-Control", cache_control)),
               *draw(optional_header("Cache-Tag", cache_tags)),
               *draw(optional_header("X-EdgeCache-TTL", ttls)),
               *draw(optional_header("X-EdgeCache-Semantic", header_values)),
               *draw(optional_header("traceparent", traceparents)),
               *draw(optional_header("tracestate", header_values)),
               *draw(optional_header("X-Request-Id", header_values)),
               *draw(optional_header("Content-Type", st.one_of(st.sampled_from(CONTENT_TYPES), header_values))))
    raw = orjson.dumps(body)
    encoding = draw(st.sampled_from([None, None, None, *CONTENT_ENCODINGS]))
    if encoding is not None:
        headers += (("Content-Encoding", encoding),)
        if encoding.lower() == b"deflate":   # (garbage deflate is not generated: see the docstring)
            raw = zlib.compress(raw)
        elif encoding.lower() == b"gzip" and draw(st.booleans()):   # else not gzip: fails at once
            raw = gzip.compress(raw)
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE"]))
    return Call(method, path, headers, raw)


# -- calls that once crashed a service -------------------------------------------------------


def _not_compressed(call: Call) -> bool:
    """Content-Encoding gzip or deflate on a body that is neither: aiohttp's ContentEncodingError
    (400), raised to whoever reads the body, or by its parser when the body ends."""
    if (call.header("Content-Encoding") or b"").strip().lower() not in (b"gzip", b"deflate"):
        return False
    try:
        zlib.decompress(call.body or b"x", wbits=47)   # gzip or zlib
    except zlib.error:
        return True
    return False


@dataclass(frozen=True, slots=True)
class Crash:
    """A call this file found answered with a 5xx (``reason``), fixed in ``where``; each is
    replayed as a regression test."""

    where: str
    reason: str
    target: str
    minimal: Call


NODE_AUTH = ("Authorization", f"Bearer {NODE_TOKEN}".encode())
CRASHES = [
    Crash("nodes/state.py NodeState.tenant_for", "an API key that is not UTF-8 fails the key's "
          "encode(): 500 instead of 401", "edge",
          ask(CHAT, ("Authorization", b"Bearer \x80"))),
    Crash("origin/app.py _bearer_is", "an Authorization header that is not UTF-8 fails encode(): "
          "plain-text 500 instead of 401", "origin",
          Call("POST", "/v1/purge", (("Authorization", b"Bearer \x80"),), b"{}")),
    Crash("origin/sim/protocol.py _check_message", "a role that is a list or object is looked up in "
          "a frozenset: TypeError, plain-text 500 (the edge refuses it first)", "origin",
          Call("POST", "/v1/chat/completions", (NODE_AUTH,),
               b'{"model": "sim-llm", "messages": [{"role": []}]}')),
    Crash("edgecache/webhook.py verify (webhook-timestamp)", "a webhook-timestamp that "
          "str.isdigit() accepts but int() refuses ('²', over 4300 digits): ValueError, plain-text 500 "
          "(before any signature check)", "origin",
          Call("POST", "/hooks/cms", (("webhook-id", b"msg_1"), ("webhook-timestamp", "²".encode()),
                                       ("webhook-signature", b"v1,AAAA")), b"{}")),
    Crash("origin/purge.py _events", "'after' beyond SQLite's 64-bit integers: OverflowError in "
          "EventLog.since, plain-text 500", "origin",
          Call("GET", "/v1/events?after=9223372036854775808", (NODE_AUTH,))),
    Crash("origin/shield.py _ttl", "an X-EdgeCache-TTL that str.isdigit() accepts but int() refuses "
          "('²', over 4300 digits): ValueError, plain-text 500", "origin",
          Call("POST", "/v1/completions", (NODE_AUTH, ("X-EdgeCache-Tenant", b"t"),
                                           ("X-EdgeCache-TTL", "²".encode())), orjson.dumps(COMPLETION))),
    Crash("origin/app.py _forward", "'prefix': null (no prefix, the edge agrees) still enters the "
          "expansion branch, whose assert fails: plain-text 500 from the origin, passed through by the edge",
          "edge", ask({**CHAT, "messages": [{"role": "user", "content": "null prefix"}], "prefix": None},
                      FUZZ_AUTH)),
    Crash("origin/purge.py _purge_event", "'keys' holding a list or an object: set(value) raises "
          "TypeError (unhashable), plain-text 500", "origin",
          Call("POST", "/v1/purge", (("Authorization", f"Bearer {ADMIN_TOKEN}".encode()),), b'{"keys": [[]]}')),
    Crash("origin/purge.py _purge", "an Idempotency-Key that is not UTF-8 cannot be stored in SQLite "
          "(UnicodeEncodeError): plain-text 500", "origin",
          Call("POST", "/v1/purge", (("Authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                                     ("Idempotency-Key", b"\xff")), b'{"tags": ["doc:1"]}')),
    Crash("edgecache/webhook.py verify (webhook-id)", "a webhook-id that is not UTF-8 fails the "
          "signature's encode() (UnicodeEncodeError) before any signature is checked: plain-text 500",
          "origin", Call("POST", "/hooks/cms", (("webhook-id", b"\xff"), ("webhook-timestamp", b"{now}"),
                                                ("webhook-signature", b"v1,AAAA")), b"{}")),
    Crash("edgecache/webhook.py verify (signature)", "a 'v1,' signature that is not ASCII: b64decode "
          "raises ValueError, not the binascii.Error caught: plain-text 500", "origin",
          Call("POST", "/hooks/cms", (("webhook-id", b"msg_1"), ("webhook-timestamp", b"{now}"),
                                      ("webhook-signature", "v1,é".encode())), b"{}")),
    Crash("edgecache/prefix.py expand", "a prefixed request whose 'messages' is a number, boolean or "
          "null: [..., *messages] raises TypeError at the origin, plain-text 500 (the edge refuses it first)",
          "origin", Call("POST", "/v1/chat/completions", (NODE_AUTH,),
                         b'{"model": "sim-llm", "prefix": "p1", "messages": 5}')),
    Crash("origin/app.py _origin_middleware", "aiohttp's own payload errors (Content-Encoding: gzip on a "
          "body that is not gzip: ContentEncodingError, an HttpProcessingError with code 400) are not "
          "mapped: plain-text 500, without any credential on /hooks/cms", "origin",
          Call("POST", "/hooks/cms", (("Content-Encoding", b"gzip"),), b"garbage")),
]


@pytest.mark.parametrize("crash", [pytest.param(c, id=c.where.split(" ", 1)[1].replace(" ", "")) for c in CRASHES])
async def test_a_call_that_once_crashed_is_answered(make_stack, crash: Crash) -> None:
    stack = await make_stack(tenants=(TenantConfig(name="fuzz", api_keys=(API_KEY,)),))
    url = stack.edges["us-east"] if crash.target == "edge" else stack.origin_url
    await asyncio.to_thread(register_prefix, stack.origin_url)
    now = str(int(time.time())).encode()
    call = replace(crash.minimal, headers=tuple((k, v.replace(b"{now}", now)) for k, v in crash.minimal.headers))
    reply = await asyncio.to_thread(send, url, call)
    assert reply.status < 500, reply
    if reply.status >= 400:
        reply.error()


# -- the edge's completion endpoints --------------------------------------------------------


@FUZZ
@given(call=edge_body_calls())
def fuzz_edge_bodies(edge: str, call: Call) -> None:
    check(send(edge, call), call, "edge")


def headed(*headers: tuple[str, bytes]) -> Call:
    return ask(CHAT, FUZZ_AUTH, *headers)


@FUZZ
@given(call=edge_header_calls())
# Once 500s (edgecache/policy.py): str.isdigit() accepts "²" that int() and float() refuse, int()
# refuses over 4300 digits, and 400 digits of max-age were an infinite float that a miss's
# int(max_age) (forwarding it to the origin) could not convert.
@example(call=headed(("X-EdgeCache-TTL", "²".encode())))
@example(call=headed(("X-EdgeCache-TTL", b"9" * 5000)))
@example(call=headed(("Cache-Control", "max-age=²".encode())))
@example(call=headed(("Cache-Control", b"max-age=" + b"9" * 400)))
# Once a 500 (nodes/middleware.py): aiohttp's RequestPayloadError reading a body that is not gzip.
@example(call=headed(("Content-Encoding", b"gzip")))
def fuzz_edge_headers(edge: str, call: Call) -> None:
    reply = send(edge, call)
    check(reply, call, "edge")
    assert "cache-status" in reply.headers, reply   # every answer of these paths says what the cache did


async def test_edge_bodies_never_crash_the_edge_or_lose_a_stored_answer(make_stack, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edgecache.access")   # the access log reads the request too
    stack = await make_stack()
    edge = stack.edges["us-east"]
    await asyncio.to_thread(register_prefix, stack.origin_url)   # so that 'prefix' may name one
    before = await asyncio.to_thread(store_baseline, edge)
    await asyncio.to_thread(fuzz_edge_bodies, edge)
    await asyncio.to_thread(assert_baseline_kept, edge, before)


async def test_edge_headers_never_crash_the_edge_or_lose_a_stored_answer(make_stack, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edgecache.access")
    stack = await make_stack(tenants=(TenantConfig(name="fuzz", api_keys=(API_KEY,)),))
    edge = stack.edges["us-east"]
    before = await asyncio.to_thread(store_baseline, edge, FUZZ_AUTH)
    await asyncio.to_thread(fuzz_edge_headers, edge)
    await asyncio.to_thread(assert_baseline_kept, edge, before, FUZZ_AUTH)


@pytest.mark.parametrize(("header", "value", "status"), [
    ("X-EdgeCache-TTL", "²".encode(), 400),
    ("X-EdgeCache-TTL", b"9" * 5000, 200),           # capped at the node's max_ttl_s
    ("Cache-Control", "max-age=²".encode(), 400),
    ("Cache-Control", b"max-age=" + b"9" * 400, 200),   # RFC 9111: taken as 2**31 seconds
])
async def test_header_numbers_that_once_crashed_the_edge(make_stack, header: str, value: bytes,
                                                        status: int) -> None:
    stack = await make_stack()
    call = ask({**CHAT, "messages": [{"role": "user", "content": "a miss, so it is forwarded"}]}, (header, value))
    reply = await asyncio.to_thread(send, stack.edges["us-east"], call)
    assert reply.status == status, reply
    if status == 400:
        assert reply.error()["param"] == header


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_a_body_that_is_not_its_content_encoding_is_a_400_at_the_edge(make_stack, encoding: bytes) -> None:
    stack = await make_stack()
    call = ask(CHAT, ("Content-Encoding", encoding))   # JSON, not compressed
    reply = await asyncio.to_thread(send, stack.edges["us-east"], call)
    assert reply.status == 400 and reply.error()["type"] == "invalid_request_error", reply
    assert "fwd=bypass; detail=rejected" in reply.headers["cache-status"]


# -- the origin's admin endpoints -----------------------------------------------------------

ADMIN_ROUTES = [("POST", "/v1/purge")] * 3 + [("POST", "/hooks/cms")] * 3 + [
    ("POST", "/v1/prefixes"), ("POST", "/v1/prefixes"), ("GET", "/v1/prefixes"), ("GET", "/v1/prefixes/{id}"),
    ("DELETE", "/v1/prefixes/{id}"), ("GET", "/v1/purge"), ("PUT", "/hooks/cms")]
query_values = st.one_of(st.sampled_from(["true", "false", "1", "0", "yes", "", "nan", "inf", "-1", "1e9",
                                          "0.05", "0", "120", "121", "1e-9"]), header_text)
queries = st.dictionaries(st.sampled_from(["wait", "timeout", "text", "x"]), query_values, max_size=3)
# "all": true would legitimately purge the stored answer this test checks; tests/integration/test_purge.py has it.
purge_values = json_values.filter(lambda v: v is not True)
purge_items = st.lists(st.one_of(tags, prefix_ids, st.text("0123456789abcdef", min_size=32, max_size=32),
                                 json_values), max_size=4)
purge_bodies = st.one_of(
    st.sampled_from([{"tags": ["doc:1"]}, {"prefix_ids": ["p1"]}, {"keys": ["0" * 32]},
                     {"tags": ["doc:2"], "soft": True}]),   # accepted: then the query and headers count
    st.dictionaries(st.sampled_from(["tags", "keys", "prefix_ids", "all", "soft", "x"]),
                    st.one_of(purge_values, purge_items), max_size=3))
prefix_bodies = st.dictionaries(st.sampled_from(["id", "text", "tags", "x"]),
                                st.one_of(prefix_ids, text, st.lists(tags, max_size=3), json_values), max_size=4)
cms_bodies = st.one_of(
    st.dictionaries(st.sampled_from(["tags", "prefixes", "_id", "event", "entry", "model", "sys"]), st.one_of(
        st.lists(tags, max_size=3), st.dictionaries(prefix_ids, st.one_of(st.none(), prefix_bodies), max_size=2),
        st.sampled_from(["entry.publish", "drafts.x", "doc"]), json_values), max_size=3))


@st.composite
def webhook_headers(draw: st.DrawFn, body: bytes) -> tuple[tuple[str, bytes], ...]:
    """Standard Webhooks headers: a valid signature, or one thing wrong, or garbage."""
    msg_id = draw(st.one_of(st.from_regex(r"msg_[a-z0-9]{1,6}", fullmatch=True).map(str.encode), header_values))
    now = int(time.time())
    stamp = draw(st.one_of(st.just(str(now).encode()), st.just(str(now - 3600).encode()), header_values,
                           st.sampled_from(["²".encode(), b"9" * 5000, b"-5", b" 1"])))
    try:
        signature = sign(SECRET, msg_id.decode(), int(stamp), body).encode()
    except ValueError:   # (not UTF-8, not a number: no valid signature exists)
        signature = b"v1,AAAA"
    signature = draw(st.one_of(st.just(signature), header_values, header_values.map(lambda v: b"v1," + v),
                               st.just(b"v1,!!! v2,x " + signature)))
    headers = (("webhook-id", msg_id), ("webhook-timestamp", stamp), ("webhook-signature", signature))
    return tuple(h for h in headers if draw(st.booleans()) or draw(st.booleans()))  # each kept 3 times in 4


@st.composite
def admin_calls(draw: st.DrawFn) -> Call:
    method, path = draw(st.sampled_from(ADMIN_ROUTES))
    path = path.replace("{id}", quote(draw(st.one_of(prefix_ids, text)).encode("utf-8", "surrogatepass"), safe=""))
    query = draw(queries)
    if query:
        path += "?" + query_string(query)
    shaped = {"/v1/purge": purge_bodies, "/hooks/cms": cms_bodies}.get(path.split("?")[0], prefix_bodies)
    body = draw(st.one_of(st.builds(encode, shaped, st.booleans()), st.builds(encode, shaped, st.booleans()),
                          st.builds(encode, json_values, st.booleans()), st.binary(max_size=32),
                          st.sampled_from(RAW_BODIES)))
    odd_auth = st.one_of(st.sampled_from([f"Bearer {NODE_TOKEN}".encode(), f"bearer {ADMIN_TOKEN}".encode(),
                                          f"Bearer {ADMIN_TOKEN} ".encode(), b"Bearer", b""]),
                         header_values.map(lambda v: b"Bearer " + v))
    auth = draw(st.sampled_from(["admin", "admin", "admin", "odd", "none"]))   # mostly past the check
    headers: tuple[tuple[str, bytes], ...] = ()
    if auth != "none":
        headers = (("Authorization", f"Bearer {ADMIN_TOKEN}".encode() if auth == "admin" else draw(odd_auth)),)
    if path.startswith("/hooks/cms"):
        headers += draw(webhook_headers(body))
        headers += draw(optional_header("X-Contentful-Topic", st.one_of(
            st.just(b"ContentManagement.Entry.publish"), header_values)))
    headers += draw(optional_header("Idempotency-Key", header_values))
    headers += draw(optional_header("Content-Type", st.sampled_from(CONTENT_TYPES)))
    headers += gzip_claim(body, draw(sometimes))
    return Call(method, path, headers, body)


@dataclass(slots=True)
class Ledger:
    """What the accepted admin calls may have appended to the invalidation log."""

    seqs: set[int]
    prefix_changes: int = 0

    def note(self, call: Call, reply: Reply) -> None:
        if reply.status >= 300:
            return
        answer = orjson.loads(reply.body)
        if "seq" in answer:                                   # a purge or a webhook (new or redelivered)
            self.seqs.add(answer["seq"])
        elif answer.get("changed") or answer.get("deleted"):   # a prefix put or delete
            self.prefix_changes += 1


@FUZZ
@given(call=admin_calls())
def fuzz_admin(origin: str, ledger: Ledger, call: Call) -> None:
    reply = send(origin, call)
    check(reply, call, "origin")
    ledger.note(call, reply)


async def test_admin_endpoints_refuse_bad_input_and_record_nothing_for_it(make_stack) -> None:
    stack = await make_stack()
    edge = stack.edges["us-east"]
    before = await asyncio.to_thread(store_baseline, edge)
    ledger = Ledger(seqs=set())
    await asyncio.to_thread(fuzz_admin, stack.origin_url, ledger)
    node = (("Authorization", f"Bearer {NODE_TOKEN}".encode()),)
    log = orjson.loads((await asyncio.to_thread(send, stack.origin_url, Call("GET", "/v1/events", node))).body)
    assert log["last_seq"] == len(ledger.seqs) + ledger.prefix_changes   # a refused call appended nothing
    await asyncio.to_thread(assert_baseline_kept, edge, before)


# -- the origin's endpoints for edge nodes (node token) -------------------------------------


@st.composite
def node_calls(draw: st.DrawFn) -> Call:
    """The event feed and leave, and the origin's completion endpoints called directly."""
    node = ("Authorization", f"Bearer {NODE_TOKEN}".encode())
    route = draw(st.sampled_from(["events", "leave", "chat", "completions"]))
    if route == "events":
        query = draw(st.dictionaries(st.sampled_from(["after", "edge", "max_staleness_s", "incarnation"]),
                                     st.one_of(query_values, st.integers().map(str)), max_size=4))
        # A long poll lasts 'timeout' seconds (at most 30) when no event comes: only short ones.
        query["timeout"] = draw(st.sampled_from(["0", "-1", "nan", "0.01", "1e-9", "", "x", "0x1"]))
        path = "/v1/events?" + query_string(query)
        return Call("GET", path, (node,))
    if route == "leave":
        body = draw(st.one_of(st.builds(encode, st.dictionaries(st.sampled_from(["edge", "incarnation"]),
                                                                 json_values), st.booleans()),
                              st.binary(max_size=16)))
        return Call("POST", "/v1/events/leave", (node,), body)
    base = CHAT if route == "chat" else COMPLETION
    headers = (node, *draw(optional_header("X-EdgeCache-Tenant", header_values)),
               *draw(optional_header("X-EdgeCache-Prefix-Version", header_values)),
               *draw(optional_header("Cache-Control", cache_control)),
               *draw(optional_header("Cache-Tag", cache_tags)),
               *draw(optional_header("X-EdgeCache-TTL", ttls)))
    body = draw(bodies(base))
    return Call("POST", f"/v1/{'chat/' if route == 'chat' else ''}completions",
                headers + gzip_claim(body, draw(sometimes)), body)


@FUZZ
@given(call=node_calls())
def fuzz_node_routes(origin: str, call: Call) -> None:
    check(send(origin, call), call, "origin")


async def test_origin_routes_for_edges_refuse_bad_input(make_stack) -> None:
    stack = await make_stack()
    edge = stack.edges["us-east"]
    await asyncio.to_thread(register_prefix, stack.origin_url)
    before = await asyncio.to_thread(store_baseline, edge)
    await asyncio.to_thread(fuzz_node_routes, stack.origin_url)
    await asyncio.to_thread(assert_baseline_kept, edge, before)

