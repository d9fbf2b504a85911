"""Security properties of a real topology on loopback.

Each test states a property we rely on and would fail if the hole existed: tenant scoping
(exact tier, origin shield, prefixes, request coalescing at the edge and at the origin), what
the edge forwards to the origin (never the client's own ``X-EdgeCache-*`` headers or API key),
which origin behaviour a client can reach through an edge, signed and replay-safe webhooks,
tokens on every origin route, bounded bodies and per-request memory, no secret or prompt in any
log line, no injection into ``Cache-Status`` or the access log, and the signed NATS bus.

The review that wrote this file found nine holes (node token in a log line, a deeply nested body
crashing the key code, answers served to requests naming tags they lack, an unbounded vector
index, backend credentials in messages, forged access-log lines, webhook ids taken for purge
keys, non-Bearer credentials sharing a tenant, a NATS signature that crashed the check); each
test here failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from edgecache.bus.base import signed_by
from edgecache.config import AuthConfig, BusConfig, SemanticConfig
from edgecache.keys import tenant_id
from edgecache.logs import JsonFormatter, TextFormatter
from edgecache.webhook import sign
from nodes.app import NODE, create_app
from nodes.memo import Memo
from nodes.semantic import SLACK_VECTORS
from tests.conftest import NODE_TOKEN, Stack, StackFactory, require_service
from tests.integration.upstreams import Gate

pytestmark = pytest.mark.integration


def precondition(ok: object, why: object = "") -> None:
    if not ok:
        pytest.fail(f"precondition: {why}")


ADMIN_TOKEN = AuthConfig().admin_token
WEBHOOK_SECRET = AuthConfig().webhook_secret
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NODE_AUTH = {"Authorization": f"Bearer {NODE_TOKEN}"}
QUESTION = "What is the refund window for chairs?"
CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": QUESTION}]}


# -- helpers ------------------------------------------------------------------------------


async def ask(edge: str, body: object = CHAT, key: str | None = "sk-alice",
              **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    """POST a chat completion to ``edge`` as the holder of API key ``key`` (None: no key)."""
    sent = {**({"Authorization": f"Bearer {key}"} if key is not None else {}), **headers}
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=body, headers=sent) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def call(method: str, url: str, headers: dict[str, str] | None = None,
               body: bytes | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers or {}, data=body) as r:
        return r.status, await r.read()


async def last_seq(stack: Stack) -> int:
    status, body = await call("GET", stack.origin_url + "/v1/events", NODE_AUTH)
    precondition(status == 200, body)
    return orjson.loads(body)["last_seq"]


async def purge(stack: Stack, body: dict, **headers: str) -> dict:
    status, answer = await call("POST", stack.origin_url + "/v1/purge?wait=true", {**ADMIN, **headers},
                                orjson.dumps(body))
    precondition(status == 200, answer)
    return orjson.loads(answer)


async def deliver(stack: Stack, payload: object, *, msg_id: str, timestamp: int | None = None,
                  body: bytes | None = None, signature: str | None = None) -> tuple[int, dict]:
    """A CMS webhook delivery, signed with the topology's secret unless ``signature`` is given."""
    raw = body if body is not None else orjson.dumps(payload)
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "Content-Type": "application/json",
               "webhook-signature": signature or sign(WEBHOOK_SECRET, msg_id, ts, raw)}
    status, answer = await call("POST", stack.origin_url + "/hooks/cms", headers, raw)
    return status, orjson.loads(answer)


async def arrivals(gate: Gate, n: int, deadline_s: float = 5.0) -> None:
    """Wait until ``n`` requests have reached ``gate`` (a deadline, no sleeps)."""
    async with asyncio.timeout(deadline_s):
        while gate.arrived < n:
            gate.arrival.clear()
            if gate.arrived < n:
                await gate.arrival.wait()


class Records(logging.Handler):
    """Every record of the ``edgecache`` loggers while installed; ``seen`` is set (thread-safely)
    once a record matches ``until``."""

    def __init__(self, until: Callable[[logging.LogRecord], bool] = lambda r: False) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.until = until
        self.loop = asyncio.get_running_loop()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.until(record):
            self.loop.call_soon_threadsafe(self.seen.set)

    def lines(self) -> list[str]:
        """Each record as the services write it: the text format and the JSON format."""
        text, as_json = TextFormatter(), JsonFormatter("test")
        return [f(r) for r in self.records for f in (text.format, as_json.format)]


@contextlib.contextmanager
def recording(until: Callable[[logging.LogRecord], bool] = lambda r: False):
    logger = logging.getLogger("edgecache")
    handler, level = Records(until), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


class Recorder:
    """A transparent proxy in front of the origin: records every request an edge sends it."""

    _HOP = {"host", "content-length", "transfer-encoding", "accept-encoding", "connection"}

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[Seen] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, CIMultiDict(request.headers), body))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._HOP}
        async with aiohttp.ClientSession() as s, s.request(request.method, self.target + request.path_qs,
                                                           data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in self._HOP | {"content-encoding"}})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


@contextlib.asynccontextmanager
async def edge_through(stack: Stack, origin_url: str, data_dir: Path) -> AsyncIterator[str]:
    """Another us-east edge of ``stack`` that reaches the origin at ``origin_url``."""
    config = replace(stack.node_configs["us-east"], origin_url=origin_url, data_dir=str(data_dir))
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


# -- tenant scoping -----------------------------------------------------------------------


async def test_no_tenant_gets_another_tenants_answer_from_the_edge_the_shield_or_a_prefix(
        make_stack: StackFactory) -> None:
    """Bob sends Alice's hashed tenant id as X-EdgeCache-Tenant: neither the edge's tiers nor
    the origin shield serve him Alice's answer, plain or built on a shared static prefix."""
    stack = await make_stack(regions=("us-east", "eu-west"))
    east, west = stack.edges["us-east"], stack.edges["eu-west"]
    status, _ = await call("POST", stack.origin_url + "/v1/prefixes", ADMIN,
                           orjson.dumps({"id": "policy", "text": "Chairs may be returned within 30 days."}))
    assert status == 201
    spoof = {"X-EdgeCache-Tenant": tenant_id("sk-alice"), "X-EdgeCache-Region": "us-east"}
    for body in (CHAT, {**CHAT, "prefix": "policy"}):
        status, headers, _ = await ask(east, body, "sk-alice")
        assert status == 200 and headers["Cache-Status"].endswith("; stored")
        status, headers, _ = await ask(east, body, "sk-bob", **spoof, **{"Cache-Control": "only-if-cached"})
        assert status == 504, headers["Cache-Status"]
        for key in ("sk-bob", None):   # another key, and no key at all (the anonymous tenant)
            before = await stack.origin_requests()
            status, headers, _ = await ask(west, body, key, **spoof)
            assert status == 200 and "fwd=miss" in headers["Cache-Status"]
            assert "shield-hit" not in headers["Cache-Status"] and "Age" not in headers
            assert await stack.origin_requests() == before + 1   # a backend answered, not the shield


async def test_identical_misses_of_different_tenants_never_share_a_fill_at_the_edge_or_origin(
        make_stack: StackFactory, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(regions=("us-east", "eu-west"), sims=0, backends=(await serve_app(gate.app()),))
    east, west = stack.edges["us-east"], stack.edges["eu-west"]
    tasks = [asyncio.create_task(ask(east, CHAT, "sk-alice")), asyncio.create_task(ask(east, CHAT, "sk-bob")),
             asyncio.create_task(ask(west, CHAT, "sk-carol"))]
    await arrivals(gate, 3)   # a fill shared across tenants would leave fewer at the backend
    gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert not any("collapsed" in headers["Cache-Status"] for _, headers, _ in results)
    assert await stack.metric(stack.origin_url, "edgecache_origin_coalesced_total") == 0


# -- what the edge forwards, and what a client can reach through it ----------------------


async def test_the_origin_sees_only_what_the_edge_vouches_for(make_stack: StackFactory, serve_app,
                                                              tmp_path: Path) -> None:
    """Client-sent X-EdgeCache-* headers, Age, cookies and the API key never reach the origin;
    the tenant, region and TTL it sees are the edge's own (the TTL capped at max_ttl_s)."""
    stack = await make_stack()
    recorder = Recorder(stack.origin_url)
    key = f"sk-live-{uuid.uuid4().hex}"
    forged = {"X-EdgeCache-Tenant": "victim", "X-EdgeCache-Region": "nowhere", "X-EdgeCache-Shield": "hit",
              "X-EdgeCache-Prefix-Version": "0" * 32, "X-EdgeCache-TTL": "999999999999", "Age": "999",
              "Cache-Tag": "doc:1", "Cookie": "session=abc", "X-Forwarded-For": "203.0.113.9"}
    async with edge_through(stack, await serve_app(recorder.app()), tmp_path / "proxied") as edge:
        status, headers, _ = await ask(edge, CHAT, key, **forged)
        assert status == 200
    assert not {"X-EdgeCache-Shield", "X-EdgeCache-Tenant", "Authorization"} & set(headers)
    completions = [r for r in recorder.seen if r.path == "/v1/chat/completions"]
    assert len(completions) == 1
    sent = completions[0].headers
    assert sent["Authorization"] == f"Bearer {NODE_TOKEN}"
    assert sent["X-EdgeCache-Tenant"] == tenant_id(key)
    assert sent["X-EdgeCache-Region"] == "us-east"
    assert sent["X-EdgeCache-TTL"] == str(int(stack.node_configs["us-east"].max_ttl_s))
    assert sent["Cache-Tag"] == "doc:1"
    assert not {"X-EdgeCache-Shield", "X-EdgeCache-Prefix-Version", "Age", "Cookie", "X-Forwarded-For"} & set(sent)
    for r in recorder.seen:   # every call, completions, polls and prefix reads alike
        assert r.headers.get("Authorization") == f"Bearer {NODE_TOKEN}"
        assert key not in str(r.headers) and key.encode() not in r.body


async def test_clients_cannot_reach_origin_only_endpoints_through_an_edge(stack: Stack) -> None:
    """Purges, prefix writes and reads, the event log and webhooks are the origin's alone, even
    with the admin or node token; a prefix id cannot walk the origin's paths either."""
    edge = stack.edges["us-east"]
    routes = [("POST", "/v1/purge", b'{"all": true}'), ("GET", "/v1/prefixes?text=1", None),
              ("POST", "/v1/prefixes", b'{"id": "p", "text": "t"}'), ("DELETE", "/v1/prefixes/p", None),
              ("GET", "/v1/events?after=0", None), ("POST", "/v1/events/leave", b'{"edge": "us-east/x/0"}'),
              ("POST", "/hooks/cms", b'{"tags": ["doc:1"]}')]
    for method, path, body in routes:
        for auth in (ADMIN, NODE_AUTH):
            status, _ = await call(method, edge + path, {**auth, "Content-Type": "application/json"}, body)
            assert status in (404, 405), (method, path)
    for ref in ("../../v1/purge", "a/../../v1/events", "p?text=1", "%2e%2e"):
        status, _, body = await ask(edge, {**CHAT, "prefix": ref})
        assert status == 400 and orjson.loads(body)["error"]["param"] == "prefix"
    assert await last_seq(stack) == 0
    status, body = await call("GET", stack.origin_url + "/v1/prefixes", ADMIN)
    assert status == 200 and orjson.loads(body)["data"] == []


# -- cache poisoning ----------------------------------------------------------------------


async def test_a_purge_reaches_every_answer_served_to_a_request_tagged_with_it(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    status, _, _ = await ask(edge, CHAT, "sk-alice")   # stored without tags (by anyone of the tenant)
    precondition(status == 200)
    await purge(stack, {"tags": ["doc:42"]})   # acknowledged: applied at every edge
    status, headers, _ = await ask(edge, CHAT, "sk-alice", **{"Cache-Tag": "doc:42",
                                                               "Cache-Control": "only-if-cached"})
    assert status == 504, headers["Cache-Status"]


async def test_cache_status_carries_nothing_a_client_sent(stack: Stack) -> None:
    """RFC 9211 members built from the node's own values only: a quote, a semicolon or a
    parameter in the API key, request id or body cannot add one."""
    edge = stack.edges["us-east"]
    key = 'sk-"; hit; detail=memory'
    body = {"model": "sim-llm", "messages": [{"role": "user", "content": 'x"; hit; key="00"'}]}
    rid = {"X-Request-Id": 'id"; hit'}
    miss = r'^edgecache-us-east; fwd=miss; key="[0-9a-f]{32}"; stored$'
    hit = r'^edgecache-us-east; hit; detail=memory; ttl=\d+; key="[0-9a-f]{32}"$'
    for pattern in (miss, hit):
        status, headers, _ = await ask(edge, body, key, **rid)
        assert status == 200 and re.fullmatch(pattern, headers["Cache-Status"]), headers["Cache-Status"]
        assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])   # the client's invalid id was replaced
    status, headers, _ = await ask(edge, body, key, **{"Cache-Tag": 'doc:1"; hit'})
    assert status == 400 and headers["Cache-Status"] == "edgecache-us-east; fwd=bypass; detail=rejected"


async def test_credentials_other_than_a_bearer_key_never_share_a_tenant(stack: Stack) -> None:
    """An Authorization that is not 'Bearer <key>' is refused, never taken for the anonymous
    tenant, where every such user's answers would mix."""
    edge = stack.edges["us-east"]
    # alice:s3cret, bob:hunter2, a bare key
    for authorization in ("Basic YWxpY2U6czNjcmV0", "Basic Ym9iOmh1bnRlcjI=", "sk-alice"):
        status, headers, body = await ask(edge, CHAT, None, Authorization=authorization)
        assert status == 401, headers["Cache-Status"]
        assert "Authorization: Bearer <key>" in orjson.loads(body)["error"]["message"]
    status, headers, _ = await ask(edge, CHAT, None)   # no credentials: the anonymous tenant, nothing stored there
    assert status == 200 and "fwd=miss" in headers["Cache-Status"], headers["Cache-Status"]


# -- webhooks and the event log -----------------------------------------------------------


async def test_webhooks_cannot_be_forged_replayed_or_re_signed_for_another_delivery(stack: Stack) -> None:
    now = int(time.time())
    raw = orjson.dumps({"tags": ["doc:1"]})
    signature = sign(WEBHOOK_SECRET, "msg_1", now, raw)
    status, first = await deliver(stack, None, msg_id="msg_1", timestamp=now, body=raw, signature=signature)
    assert status == 200 and first["new"] and first["seq"] == 1
    status, again = await deliver(stack, None, msg_id="msg_1", timestamp=now, body=raw, signature=signature)
    assert status == 200 and not again["new"] and again["seq"] == 1           # a replay applies nothing
    forgeries = [
        {"msg_id": "msg_2", "timestamp": now, "body": raw, "signature": signature},       # another id
        {"msg_id": "msg_1", "timestamp": now, "body": orjson.dumps({"all": True}), "signature": signature},
        {"msg_id": "msg_1", "timestamp": now + 1, "body": raw, "signature": signature},   # another time
        {"msg_id": "msg_3", "timestamp": now - 301, "body": raw},                          # too old
        {"msg_id": "msg_4", "timestamp": now + 301, "body": raw},                          # too far ahead
        {"msg_id": "msg_5", "timestamp": now, "body": raw, "signature": "v1," + "A" * 43 + "="},
        {"msg_id": "msg_6", "timestamp": now, "body": raw, "signature": signature.replace("v1,", "v2,")},
    ]
    for forged in forgeries:
        status, answer = await deliver(stack, None, **forged)
        assert status == 401 and answer["error"]["code"] == "invalid_webhook_signature", forged
    assert await last_seq(stack) == 1


async def test_a_webhook_is_never_taken_for_a_purge_that_shares_its_id(stack: Stack) -> None:
    await purge(stack, {"tags": ["doc:1"]}, **{"Idempotency-Key": "delivery-7"})
    status, answer = await deliver(stack, {"tags": ["doc:2"]}, msg_id="delivery-7")
    assert status == 200 and answer["new"] and answer["event"]["tags"] == ["doc:2"]


async def test_every_origin_route_takes_exactly_its_token(stack: Stack) -> None:
    """Node routes refuse the admin token and the other way round; no near-miss of a token is
    accepted; nothing a refused call asked for happens."""
    origin = stack.origin_url
    tokens = {"none": {}, "client": {"Authorization": "Bearer sk-alice"}, "admin": ADMIN, "node": NODE_AUTH,
              "admin+x": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
              "admin prefix": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
              "no scheme": {"Authorization": ADMIN_TOKEN},
              "node as basic": {"Authorization": f"Basic {NODE_TOKEN}"}}
    chat = orjson.dumps(CHAT)
    routes = {  # (method, path, body): the tokens it takes
        ("POST", "/v1/purge", b'{"all": true}'): {"admin"},
        ("POST", "/v1/prefixes", b'{"id": "p", "text": "t"}'): {"admin"},
        ("DELETE", "/v1/prefixes/nope", None): {"admin"},
        ("GET", "/v1/prefixes", None): {"admin", "node"},
        ("GET", "/v1/events?after=0", None): {"node"},
        ("POST", "/v1/events/leave", b'{"edge": "us-east/x/0"}'): {"node"},
        ("POST", "/v1/chat/completions", chat): {"node"},
        ("GET", "/v1/models", None): {"node"},
    }
    for (method, path, body), allowed in routes.items():
        for name, auth in tokens.items():
            status, _ = await call(method, origin + path, {**auth, "Content-Type": "application/json"}, body)
            assert (status != 401) == (name in allowed), (method, path, name, status)
    assert await last_seq(stack) == 2   # the admin's purge and prefix write; no refused call recorded one
    for path in ("/health", "/healthz", "/metrics"):   # public, and they hold no secret
        status, body = await call("GET", origin + path)
        assert status == 200 and not any(t.encode() in body for t in (ADMIN_TOKEN, NODE_TOKEN))


# -- bounded input and memory -------------------------------------------------------------


async def test_a_compressed_body_is_bounded_by_its_decompressed_size(stack: Stack) -> None:
    bomb = await asyncio.to_thread(gzip.compress, b'{"model": "sim-llm", "pad": "' + b" " * (6 * 1024 * 1024) + b'"}')
    assert len(bomb) < 64 * 1024
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _ = await call("POST", stack.edges["us-east"] + "/v1/chat/completions",
                           {"Authorization": "Bearer sk-alice", **headers}, bomb)
    assert status == 413
    status, _ = await call("POST", stack.origin_url + "/v1/chat/completions", {**NODE_AUTH, **headers}, bomb)
    assert status == 413
    assert await stack.origin_requests() == 0


async def test_a_deeply_nested_body_is_a_400_without_a_traceback(stack: Stack) -> None:
    depth = 600
    raw = b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}], "x": ' + \
        b"[" * depth + b"]" * depth + b"}"
    with recording() as records:
        status, _ = await call("POST", stack.edges["us-east"] + "/v1/chat/completions",
                               {"Authorization": "Bearer sk-alice", "Content-Type": "application/json"}, raw)
    assert status == 400
    assert not [r for r in records.records if r.levelno >= logging.ERROR]


async def test_client_input_does_not_grow_the_edges_memo_tables_or_prefix_replica(stack: Stack) -> None:
    state = stack.servers["us-east"].app[NODE]
    for i in range(40):   # unknown prefix ids: each a 400, none remembered
        status, _, _ = await ask(stack.edges["us-east"], {**CHAT, "prefix": f"nope-{i}"}, f"sk-{i}")
        assert status == 400
    assert state.prefixes is not None and state.prefixes.prefixes == {}
    memo = Memo(capacity=8, max_item_bytes=64)   # the bound the edge's memos rely on
    for i in range(100):
        memo.put(("chat", f"t{i}", b"x" * 10), i)
    memo.put(("chat", "t", b"x" * 65), "too big")
    assert len(memo) == 8 and memo.get(("chat", "t", b"x" * 65)) is None
    assert len(state.memo) <= state.memo.capacity and len(state.tenants) <= state.tenants.capacity


async def test_the_semantic_index_is_bounded_by_the_entries_the_tiers_hold(make_stack: StackFactory) -> None:
    pytest.importorskip("faiss", reason="the semantic extra is not installed")
    pytest.importorskip("onnxruntime", reason="the semantic extra is not installed")
    stack = await make_stack(node_overrides={"semantic": SemanticConfig(enabled=True), "memory_bytes": 4096,
                                             "disk_bytes": 0})
    state = stack.servers["us-east"].app[NODE]
    if state.semantic is None:
        pytest.skip(f"semantic tier {state.semantic_status}")
    for seed in range(160):   # one new scope each
        status, _, _ = await ask(stack.edges["us-east"], {**CHAT, "seed": seed})
        precondition(status == 200)
    while state.writes:
        await asyncio.gather(*list(state.writes), return_exceptions=True)
    held = len(state.memory) + await asyncio.to_thread(len, state.disk)
    precondition(held < 160 - SLACK_VECTORS, "the tiers evicted")
    assert len(state.semantic.index) <= 2 * held + SLACK_VECTORS   # nodes/semantic.py: the bound


# -- secrets ------------------------------------------------------------------------------


async def test_no_secret_or_prompt_reaches_any_log_line(make_stack: StackFactory) -> None:
    """At DEBUG, through misses, hits, streams, refusals, purges, prefixes and webhooks, no log
    line of the edge or origin holds an API key, a token, the webhook secret or a prompt."""
    key = f"sk-live-{uuid.uuid4().hex}"
    with recording() as records:
        stack = await make_stack()
        edge = stack.edges["us-east"]
        for extra in ({}, {}, {"stream": True}):
            status, _, _ = await ask(edge, {**CHAT, **extra}, key)
            assert status == 200
        status, _, _ = await ask(edge, {**CHAT, "max_tokens": "x"}, key)   # a backend error passed through
        await call("POST", stack.origin_url + "/v1/chat/completions", {"Authorization": f"Bearer {key}"},
                   orjson.dumps(CHAT))
        await call("GET", stack.origin_url + "/v1/events", ADMIN)   # the admin token on a node route
        await call("POST", stack.origin_url + "/v1/purge", NODE_AUTH, b'{"all": true}')
        await call("POST", stack.origin_url + "/v1/prefixes", ADMIN,
                   orjson.dumps({"id": "policy", "text": "Chairs may be returned within 30 days."}))
        await purge(stack, {"tags": ["doc:1"]})
        await deliver(stack, {"tags": ["doc:2"]}, msg_id="msg_1")
        await deliver(stack, {"tags": ["doc:3"]}, msg_id="msg_2", signature="v1,bm9wZQ==")
    lines = records.lines()
    assert any("/v1/chat/completions" in line for line in lines)   # the access log was on
    secrets = (key, ADMIN_TOKEN, NODE_TOKEN, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), QUESTION,
               "Chairs may be returned")
    leaks = [(s, line) for line in lines for s in secrets if s in line]
    assert not leaks


async def test_the_node_token_stays_out_of_the_log_when_the_origin_refuses_it(make_stack: StackFactory) -> None:
    token = f"node-token-{uuid.uuid4().hex}"   # rotated at the origin, not yet at this edge
    with recording(until=lambda r: r.name == "edgecache.node.prefixes") as records:
        await make_stack(node_overrides={"node_token": token})
        await asyncio.wait_for(records.seen.wait(), 10)
    assert not [line for line in records.lines() if token in line]


async def test_a_backends_url_and_credentials_never_reach_a_client(make_stack: StackFactory) -> None:
    stack = await make_stack(sims=0, backends=("http://svc:hunter2@127.0.0.1:9",))
    status, _, body = await ask(stack.edges["us-east"])
    precondition(status == 502, body)
    assert b"hunter2" not in body and b"127.0.0.1:9" not in body, body


async def test_the_origins_public_health_shows_no_backend_credentials(make_stack: StackFactory) -> None:
    stack = await make_stack(sims=0, backends=("http://svc:hunter2@127.0.0.1:9",))
    status, body = await call("GET", stack.origin_url + "/health")
    precondition(status == 200, body)
    assert b"hunter2" not in body


async def test_a_request_path_cannot_forge_an_access_log_line(stack: Stack) -> None:
    forged = "/v1/purge%0A2026-01-01 00:00:00,000 edgecache.access INFO POST /v1/purge 200 - 1.0ms"
    with recording() as records:
        status, _ = await call("POST", stack.origin_url + forged, {}, b"{}")
    precondition(status == 401)
    access = [TextFormatter().format(r) for r in records.records if r.name == "edgecache.access"]
    precondition(access, "the access log was on")
    assert not [line for line in access if "\n" in line or "\r" in line]


# -- the NATS bus -------------------------------------------------------------------------


@pytest.fixture
async def nats_bus() -> AsyncIterator[BusConfig]:
    await asyncio.to_thread(require_service, "NATS", "127.0.0.1", 4222)
    name = f"S{uuid.uuid4().hex[:12]}"
    config = BusConfig(kind="nats", stream=name, subject=f"{name.lower()}.events", heartbeat_s=0.5)
    yield config
    import nats

    nc = await nats.connect(config.nats_url)
    with contextlib.suppress(Exception):   # never created: nothing to clean
        await nc.jetstream().delete_stream(name)
    await nc.close()


async def test_a_nats_event_with_a_non_ascii_signature_is_dropped(nats_bus: BusConfig,
                                                                  make_stack: StackFactory) -> None:
    import nats

    precondition(not signed_by(NODE_TOKEN, b"{}", "0" * 64))

    def decisive(record: logging.LogRecord) -> bool:
        return "without a valid signature" in record.getMessage() or "unreadable" in record.getMessage()

    stack = await make_stack(bus=nats_bus)
    follower = stack.servers["us-east"].app[NODE].events
    async with asyncio.timeout(10):
        while follower.fenced():   # the edge's durable consumer exists from here on
            await follower.heard.wait()
    with recording(until=decisive) as records:
        nc = await nats.connect(nats_bus.nats_url)
        try:
            forged = {"seq": 1, "created": 0, "source_id": "x", "tags": [], "keys": [], "prefixes": [],
                      "all": True, "soft": False}
            await nc.jetstream().publish(nats_bus.subject, orjson.dumps(forged), stream=nats_bus.stream,
                                         headers={"EdgeCache-Signature": "é" * 64})
        finally:
            await nc.close()
        await asyncio.wait_for(records.seen.wait(), 10)
    decided = next(r for r in records.records if decisive(r))
    assert "without a valid signature" in decided.getMessage(), decided.getMessage()
