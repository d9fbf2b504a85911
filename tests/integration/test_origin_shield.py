"""The origin shield on a real topology: a miss at a second region for an answer the first one
caused is answered by the origin without a backend request; tenants never share; purges reach
the shield before they are acknowledged; errors, cut streams and no-store answers are never kept;
the edge keeps the shield's age; and with the shield off everything works as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest

from edgecache.stream import SSEParser
from edgecache.webhook import sign
from origin.app import ORIGIN
from origin.shield import Shield
from tests.conftest import NODE_TOKEN, Stack, StackFactory, async_openai
from tests.integration.upstreams import CutStream, Failing, Gate

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer dev-admin-token"}
QUESTION = [{"role": "user", "content": "How long does shipping to Lisbon take?"}]
CHAT = {"model": "sim-llm", "max_tokens": 8, "messages": QUESTION}
STREAM = {**CHAT, "stream": True}


async def post(url: str, body: object = CHAT, headers: dict[str, str] | None = None,
               key: str = "sk-test") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.read()


async def admin(stack: Stack, method: str, path: str, body: object = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, stack.origin_url + path, json=body,
                                                       headers=ADMIN) as r:
        return r.status, orjson.loads(await r.read())


async def until(predicate: Callable[[], Awaitable[bool]], deadline_s: float = 5.0) -> None:
    """Wait for a condition observable over HTTP, with a deadline (polls; asserts no timing)."""
    async with asyncio.timeout(deadline_s):
        while not await predicate():  # noqa: ASYNC110 - the condition lives in another server
            await asyncio.sleep(0.005)


def shield_of(stack: Stack) -> Shield:
    shield = stack.servers["origin"].app[ORIGIN].shield
    assert shield is not None
    return shield


async def backend_requests(stack: Stack, sim: str | None = None) -> float:
    return await stack.metric(sim or stack.sim_urls[0], "vllm:request_success_total")


async def health(stack: Stack) -> dict:
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/health") as r:
        return (await r.json())["shield"]


def key_of(cache_status: str) -> str:
    return cache_status.split('key="')[1].split('"')[0]


@pytest.fixture
async def two(make_stack: StackFactory) -> Stack:
    return await make_stack(regions=("us-east", "eu-west"), sims=1)


# -- a second region is answered by the shield --------------------------------------------------


async def test_second_regions_miss_is_answered_by_the_shield_through_the_openai_client(two: Stack) -> None:
    async with await async_openai(two.edges["us-east"] + "/v1") as east:
        first = await east.chat.completions.create(model="sim-llm", messages=QUESTION, max_tokens=8)
    async with await async_openai(two.edges["eu-west"] + "/v1") as west:
        raw = await west.chat.completions.with_raw_response.create(
            model="sim-llm", messages=QUESTION, max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in raw.parse()]
        again = await west.chat.completions.with_raw_response.create(model="sim-llm", messages=QUESTION, max_tokens=8)
    assert await backend_requests(two) == 1
    assert await two.origin_requests() == 1
    status = raw.headers["Cache-Status"]
    assert status.startswith('edgecache-eu-west; fwd=miss; detail=shield-hit; key="') and status.endswith("; stored")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == first.choices[0].message.content and content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    assert again.headers["Cache-Status"].startswith("edgecache-eu-west; hit; detail=memory")   # kept at the edge
    assert again.parse().choices[0].message.content == content
    assert await two.metric(two.origin_url, "edgecache_origin_shield_total", result="hit") == 1
    assert await two.metric(two.origin_url, "edgecache_origin_shield_total", result="stored") == 1


@pytest.mark.parametrize(("first", "then"), [(STREAM, CHAT), (CHAT, STREAM),
                                              (STREAM, {**STREAM, "stream_options": {"include_usage": True}})],
                         ids=["stream-then-json", "json-then-stream", "stream-then-stream-with-usage"])
async def test_the_shield_answers_in_the_wire_format_asked(two: Stack, first: dict, then: dict) -> None:
    status, _, body = await post(two.edges["us-east"], first)
    assert status == 200
    status, headers, body = await post(two.edges["eu-west"], then)
    assert status == 200 and "detail=shield-hit" in headers["Cache-Status"]
    assert await backend_requests(two) == 1
    # what the origin sends the edge, byte for byte: the edge asks for usage when its client streams
    status, origin_headers, origin_body = await post(two.origin_url, {**then, **(
        {"stream_options": {"include_usage": True}} if then.get("stream") else {})}, headers={
        "X-EdgeCache-Tenant": shield_of(two).tier.peek(bytes.fromhex(key_of(headers["Cache-Status"]))).tenant,
        "X-EdgeCache-TTL": "3600"}, key=NODE_TOKEN)
    assert status == 200 and origin_headers["X-EdgeCache-Shield"] == "hit"
    assert origin_headers["Cache-Status"].startswith("edgecache-origin; hit; ttl=")
    assert int(origin_headers["Age"]) >= 0
    if not then.get("stream"):
        assert headers["Content-Type"].startswith("application/json")
        answer = orjson.loads(body)
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        assert orjson.loads(origin_body) == answer
        return
    assert headers["Content-Type"].startswith("text/event-stream")
    assert origin_headers["Content-Type"].startswith("text/event-stream")
    for stream, usage_expected in ((body, bool(then.get("stream_options"))), (origin_body, True)):
        payloads = list(SSEParser().feed(stream))
        assert payloads[-1] == b"[DONE]"
        chunks = [orjson.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert (chunks[-1].get("usage") is not None) is usage_expected
        assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


async def test_tenants_never_share_the_shield(two: Stack) -> None:
    assert (await post(two.edges["us-east"], key="sk-tenant-a"))[0] == 200
    status, headers, _ = await post(two.edges["eu-west"], key="sk-tenant-b")
    assert status == 200 and "shield-hit" not in headers["Cache-Status"]
    assert await backend_requests(two) == 2
    status, headers, _ = await post(two.edges["eu-west"], key="sk-tenant-a")   # tenant a's answer, from eu-west
    assert "detail=shield-hit" in headers["Cache-Status"] and await backend_requests(two) == 2


async def test_a_different_parameter_or_prefix_version_is_not_served(two: Stack) -> None:
    await post(two.edges["us-east"])
    await post(two.edges["eu-west"], {**CHAT, "max_tokens": 9})
    assert await backend_requests(two) == 2
    assert (await admin(two, "POST", "/v1/prefixes", {"id": "ship", "text": "Shipping rules. " * 50}))[0] == 201
    prefixed = {**CHAT, "prefix": "ship"}
    assert (await post(two.edges["us-east"], prefixed))[0] == 200
    assert (await admin(two, "POST", "/v1/prefixes", {"id": "ship", "text": "New shipping rules. " * 50}))[0] == 200

    async def west_has_the_new_version() -> bool:   # eu-west follows the registry through the event log
        from edgecache.sdk import prefix_version
        from nodes.app import NODE

        replica = two.servers["eu-west"].app[NODE].prefixes.prefixes.get("ship")
        return replica is not None and replica.version == prefix_version("New shipping rules. " * 50)

    await until(west_has_the_new_version)
    before = await backend_requests(two)
    status, headers, _ = await post(two.edges["eu-west"], prefixed)
    assert status == 200 and "shield-hit" not in headers["Cache-Status"]
    assert await backend_requests(two) == before + 1


async def test_a_coalesced_backend_request_is_stored_once_with_every_edges_tags(make_stack, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(regions=("us-east", "eu-west", "ap-south"), sims=0,
                             backends=(await serve_app(gate.app()),))
    tasks = [asyncio.create_task(post(stack.edges["us-east"], headers={"Cache-Tag": "doc:1"})),
             asyncio.create_task(post(stack.edges["eu-west"], headers={"Cache-Tag": "doc:2"}))]

    async def joined() -> bool:
        return gate.arrived == 1 and await stack.metric(stack.origin_url, "edgecache_origin_coalesced_total") == 1

    await until(joined)
    gate.opened.set()
    assert {s for s, _, _ in await asyncio.wait_for(asyncio.gather(*tasks), 10)} == {200}
    shield = shield_of(stack)
    assert shield.counts["stored"] == 1 and len(shield) == 1
    status, headers, _ = await post(stack.edges["ap-south"], headers={"Cache-Tag": "doc:2"})
    assert status == 200 and "detail=shield-hit" in headers["Cache-Status"] and gate.arrived == 1
    assert (await health(stack))["entries"] == 1


# -- purges reach the shield before they are acknowledged ---------------------------------------


@pytest.mark.parametrize("kind", ["tag", "soft-tag", "key", "all", "prefix_ids", "prefix-delete", "cms-webhook"])
async def test_a_purge_reaches_the_shield_before_its_acknowledgement(two: Stack, kind: str) -> None:
    prefix = kind in ("prefix_ids", "prefix-delete")
    body = {**CHAT, "prefix": "ship"} if prefix else CHAT
    if prefix:
        assert (await admin(two, "POST", "/v1/prefixes", {"id": "ship", "text": "Shipping rules. " * 50}))[0] == 201
    status, headers, _ = await post(two.edges["us-east"], body, {"Cache-Tag": "doc:1"})
    assert status == 200 and len(shield_of(two)) == 1
    purges = {"tag": {"tags": ["doc:1"]}, "soft-tag": {"tags": ["doc:1"], "soft": True},
              "key": {"keys": [key_of(headers["Cache-Status"])]}, "all": {"all": True},
              "prefix_ids": {"prefix_ids": ["ship"]}}
    if kind in purges:
        status, _ = await admin(two, "POST", "/v1/purge", purges[kind])
    elif kind == "prefix-delete":
        status, _ = await admin(two, "DELETE", "/v1/prefixes/ship")
    else:
        status, _ = await cms_purge(two, "doc:1")
    assert status == 200
    assert len(shield_of(two)) == 0                     # before the acknowledgement came back
    if kind == "prefix-delete":                          # a deleted prefix cannot be asked for again
        return
    before = await backend_requests(two)
    status, headers, _ = await post(two.edges["eu-west"], body, {"Cache-Tag": "doc:1"})
    assert status == 200 and "shield-hit" not in headers["Cache-Status"]
    assert await backend_requests(two) == before + 1
    assert await two.metric(two.origin_url, "edgecache_origin_shield_total", result="hit") == 0


async def cms_purge(stack: Stack, tag: str) -> tuple[int, dict]:
    """A signed generic CMS webhook purging ``tag``."""
    assert stack.config is not None
    body = orjson.dumps({"tags": [tag]})
    msg_id, ts = f"msg-{time.monotonic_ns()}", int(time.time())
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/hooks/cms", data=body, headers={
            "Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(stack.config.auth.webhook_secret, msg_id, ts, body)}) as r:
        return r.status, orjson.loads(await r.read())


async def test_an_answer_whose_backend_request_began_before_a_purge_is_not_stored(make_stack, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(regions=("us-east", "eu-west"), sims=0, backends=(await serve_app(gate.app()),))
    first = asyncio.create_task(post(stack.edges["us-east"], headers={"Cache-Tag": "doc:1"}))
    await asyncio.wait_for(gate.arrival.wait(), 5)          # the backend request is in flight
    status, _ = await admin(stack, "POST", "/v1/purge", {"tags": ["doc:1"]})
    assert status == 200
    gate.opened.set()
    status, _, _ = await asyncio.wait_for(first, 10)
    assert status == 200
    shield = shield_of(stack)
    assert len(shield) == 0 and shield.counts["stored"] == 0
    status, headers, _ = await post(stack.edges["eu-west"], headers={"Cache-Tag": "doc:1"})
    assert status == 200 and "shield-hit" not in headers["Cache-Status"] and gate.arrived == 2
    assert shield.counts["stored"] == 1                     # the answer fetched after the purge is kept


# -- what is never stored -----------------------------------------------------------------------


async def test_no_store_is_neither_served_nor_stored_and_no_cache_refreshes(two: Stack) -> None:
    await post(two.edges["us-east"], headers={"Cache-Control": "no-store"})
    assert len(shield_of(two)) == 0
    await post(two.edges["eu-west"])
    assert await backend_requests(two) == 2 and len(shield_of(two)) == 1
    status, headers, _ = await post(two.edges["us-east"], headers={"Cache-Control": "no-store"})
    assert "shield-hit" not in headers["Cache-Status"] and await backend_requests(two) == 3
    status, headers, _ = await post(two.edges["us-east"], headers={"Cache-Control": "no-cache"})
    assert status == 200 and "shield-hit" not in headers["Cache-Status"] and await backend_requests(two) == 4
    shield = shield_of(two)
    assert shield.counts["stored"] == 2 and shield.counts["bypass"] == 3


@pytest.mark.parametrize("upstream", ["500", "429", "cut"])
async def test_errors_and_cut_streams_are_not_stored(make_stack, serve_app, upstream: str) -> None:
    server = CutStream() if upstream == "cut" else Failing(int(upstream))
    stack = await make_stack(regions=("us-east", "eu-west"), sims=0, backends=(await serve_app(server.app()),),
                             origin_overrides={"breaker_failures": 100})
    body = STREAM if upstream == "cut" else CHAT
    for region in ("us-east", "eu-west"):
        status, headers, answer = await post(stack.edges[region], body)
        assert "shield-hit" not in headers.get("Cache-Status", "")
        if upstream == "cut":
            assert b"[DONE]" not in answer
        else:
            assert status == int(upstream)
    assert server.requests == 2
    assert len(shield_of(stack)) == 0 and shield_of(stack).counts["stored"] == 0


# -- the edge keeps the shield's age ------------------------------------------------------------


async def test_the_edge_keeps_the_shields_age_so_the_ttl_is_not_extended(two: Stack) -> None:
    shield = shield_of(two)
    shield.clock = lambda: time.time() - 1000          # the answer the shield keeps was made 1000 s ago
    await post(two.edges["us-east"], headers={"X-EdgeCache-TTL": "3600"})
    shield.clock = time.time
    _, headers, _ = await post(two.edges["eu-west"], headers={"X-EdgeCache-TTL": "3600"})
    assert "detail=shield-hit" in headers["Cache-Status"] and int(headers["Age"]) >= 1000
    _, headers, _ = await post(two.edges["eu-west"], headers={"X-EdgeCache-TTL": "3600"})
    assert "; hit; detail=memory" in headers["Cache-Status"]
    assert int(headers["Cache-Status"].split("ttl=")[1].split(";")[0]) <= 2600
    assert int(headers["Age"]) >= 1000
    assert await backend_requests(two) == 1


@pytest.mark.parametrize("headers", [{"X-EdgeCache-TTL": "1000"}, {"Cache-Control": "max-age=999"}])
async def test_an_answer_older_than_the_edges_ttl_or_max_age_goes_to_the_backend(two: Stack, headers) -> None:
    shield = shield_of(two)
    shield.clock = lambda: time.time() - 1000
    await post(two.edges["us-east"])
    shield.clock = time.time
    status, answer_headers, _ = await post(two.edges["eu-west"], headers=headers)
    assert status == 200 and "shield-hit" not in answer_headers["Cache-Status"]
    assert await backend_requests(two) == 2


# -- off ----------------------------------------------------------------------------------------


async def test_with_the_shield_off_every_region_reaches_the_backend(make_stack: StackFactory) -> None:
    stack = await make_stack(regions=("us-east", "eu-west"), sims=1, origin_overrides={"shield": False})
    assert stack.servers["origin"].app[ORIGIN].shield is None
    for region in stack.edges:
        status, headers, _ = await post(stack.edges[region], STREAM)
        assert status == 200 and "shield" not in headers["Cache-Status"]
        status, headers, _ = await post(stack.edges[region])
        assert "; hit; detail=memory" in headers["Cache-Status"]
    assert await backend_requests(stack) == 2
    status, headers, _ = await post(stack.origin_url, headers={"X-EdgeCache-Tenant": "t"}, key=NODE_TOKEN)
    assert status == 200 and "X-EdgeCache-Shield" not in headers
    assert await health(stack) == {"enabled": False}
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/metrics") as r:
        assert "edgecache_origin_shield" not in await r.text()
    status, _ = await admin(stack, "POST", "/v1/purge", {"all": True})   # purges work without it
    assert status == 200


async def test_health_shows_the_shields_entries_and_bytes(two: Stack) -> None:
    assert (await health(two))["entries"] == 0
    await post(two.edges["us-east"])
    shield = await health(two)
    assert shield["enabled"] is True and shield["entries"] == 1 and shield["bytes"] > 0
    assert await two.metric(two.origin_url, "edgecache_origin_shield_bytes") == shield["bytes"]
    assert await two.metric(two.origin_url, "edgecache_origin_shield_entries") == 1
