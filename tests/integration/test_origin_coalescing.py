"""Origin coalescing and back-pressure on a real topology: identical misses from several edges
share one backend request, streams fan out byte for byte, tenants and bypassing requests never
share, a leaving waiter leaves the others alone, and a full origin answers 429."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest

from origin.app import ORIGIN
from tests.conftest import NODE_TOKEN, Stack, StackFactory
from tests.integration.upstreams import CutStream, Dropping, Gate

pytestmark = pytest.mark.integration

CHAT = {"model": "sim-llm", "max_tokens": 8, "messages": [{"role": "user", "content": "What is our refund policy?"}]}
STREAM = {**CHAT, "stream": True}


async def post(url: str, body: object = CHAT, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        kwargs = {"data": raw} if raw is not None else {"json": body}
        async with s.post(url + "/v1/chat/completions",
                          headers={"Authorization": "Bearer sk-test", **(headers or {})}, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def as_edge(tenant: str = "acme", **extra: str) -> dict[str, str]:
    """The headers an edge sends to the origin."""
    return {"Authorization": f"Bearer {NODE_TOKEN}", "Content-Type": "application/json",
            "X-EdgeCache-Tenant": tenant, "X-EdgeCache-Region": "test", **extra}


async def until(predicate: Callable[[], Awaitable[bool]], deadline_s: float = 5.0) -> None:
    """Wait for a condition observable over HTTP, with a deadline (polls; asserts no timing)."""
    async with asyncio.timeout(deadline_s):
        while not await predicate():  # noqa: ASYNC110 - the condition lives in another server
            await asyncio.sleep(0.005)


async def gated(make_stack: StackFactory, serve_app, **kw) -> tuple[Stack, Gate, str]:
    """A topology whose one backend is a gate in front of a simulated server; returns the sim's URL."""
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(sims=0, backends=(await serve_app(gate.app()),), **kw)
    return stack, gate, sims.sim_urls[0]


async def coalesced(stack: Stack) -> float:
    return await stack.metric(stack.origin_url, "edgecache_origin_coalesced_total")


async def test_identical_misses_from_two_regions_reach_the_backend_once(make_stack, serve_app) -> None:
    stack, gate, sim = await gated(make_stack, serve_app, regions=("us-east", "eu-west"))
    east, west = stack.edges["us-east"], stack.edges["eu-west"]
    n = 4
    # eu-west's clients write the same request with other field order and whitespace
    other = b'{ "stream": true, "messages": [{"content": "What is our refund policy?", "role": "user"}],' \
            b' "max_tokens": 8,\n "model": "sim-llm" }'
    tasks = [asyncio.create_task(post(east, STREAM)) for _ in range(n)]
    tasks += [asyncio.create_task(post(west, raw=other, headers={"Content-Type": "application/json"}))
              for _ in range(n)]

    async def both_edges_joined() -> bool:   # each edge collapsed its own n; the origin joined them
        return gate.arrived == 1 and await coalesced(stack) == 1

    await until(both_edges_joined)
    gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert {status for status, _, _ in results} == {200}
    assert gate.arrived == 1
    assert await stack.metric(sim, "vllm:request_success_total") == 1
    assert await stack.origin_requests() == 1
    bodies = {body for _, _, body in results}
    assert len(bodies) == 1 and next(iter(bodies)).endswith(b"data: [DONE]\n\n")


async def test_streams_fan_out_byte_identical_and_json_waits_for_its_own(make_stack, serve_app) -> None:
    stack, gate, sim = await gated(make_stack, serve_app, regions=())
    streams = [asyncio.create_task(post(stack.origin_url, {**STREAM, "stream_options": {"include_usage": True}},
                                        headers=as_edge())) for _ in range(4)]
    plain = asyncio.create_task(post(stack.origin_url, CHAT, headers=as_edge()))   # another wire format

    async def joined() -> bool:
        return gate.arrived == 2 and await coalesced(stack) == 3

    await until(joined)
    gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*streams), 10)
    status, _, body = await asyncio.wait_for(plain, 10)
    assert status == 200 and orjson.loads(body)["object"] == "chat.completion"
    assert {s for s, _, _ in results} == {200}
    assert all(h["Content-Type"].startswith("text/event-stream") for _, h, _ in results)
    sent = {b for _, _, b in results}
    assert len(sent) == 1
    stream = next(iter(sent))
    assert stream.count(b"data: ") > 3 and b'"usage"' in stream and stream.endswith(b"data: [DONE]\n\n")
    assert await stack.metric(sim, "vllm:request_success_total") == 2


async def test_different_tenants_never_coalesce(make_stack, serve_app) -> None:
    stack, gate, sim = await gated(make_stack, serve_app, regions=("us-east", "eu-west"))
    tasks = [asyncio.create_task(post(stack.edges["us-east"], headers={"Authorization": "Bearer sk-tenant-a"})),
             asyncio.create_task(post(stack.edges["eu-west"], headers={"Authorization": "Bearer sk-tenant-b"})),
             asyncio.create_task(post(stack.origin_url, headers=as_edge("tenant-c")))]

    async def all_at_the_backend() -> bool:
        return gate.arrived == 3

    await until(all_at_the_backend)
    gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert {status for status, _, _ in results} == {200}
    assert await coalesced(stack) == 0
    assert await stack.metric(sim, "vllm:request_success_total") == 3


@pytest.mark.parametrize("headers", [{"Cache-Control": "no-cache"}, {"Cache-Control": "no-store"},
                                     {"X-EdgeCache-Tenant": ""}])
async def test_bypassing_or_unscoped_requests_never_coalesce(make_stack, serve_app, headers) -> None:
    stack, gate, _ = await gated(make_stack, serve_app, regions=())
    tasks = [asyncio.create_task(post(stack.origin_url, headers={**as_edge(), **headers})) for _ in range(2)]

    async def both_at_the_backend() -> bool:
        return gate.arrived == 2

    await until(both_at_the_backend)
    gate.opened.set()
    assert {s for s, _, _ in await asyncio.wait_for(asyncio.gather(*tasks), 10)} == {200}
    assert await coalesced(stack) == 0


async def test_a_disconnecting_waiter_does_not_break_the_others(make_stack, serve_app) -> None:
    cut = CutStream(hold=True)
    stack = await make_stack(regions=(), sims=0, backends=(await serve_app(cut.app()),))
    origin = stack.servers["origin"].app[ORIGIN]
    async with aiohttp.ClientSession() as s:
        responses = [await s.post(stack.origin_url + "/v1/chat/completions", json=STREAM, headers=as_edge())
                     for _ in range(3)]
        assert cut.requests == 1 and origin.flights.coalesced == 2
        for resp in responses:   # every waiter has the head and the chunks so far
            assert resp.status == 200 and b"partial" in await resp.content.readuntil(b"\n\n")
        responses[0].close()     # the first one (the flight's starter) leaves
        cut.release.set()
        bodies = [await asyncio.wait_for(r.read(), 10) for r in responses[1:]]
    assert all(b.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in b for b in bodies)
    assert bodies[0] == bodies[1]
    assert cut.requests == 1 and not cut.cancelled.is_set()
    assert [b.in_flight for b in origin.pool.backends] == [0] and len(origin.flights) == 0


async def test_a_failure_before_the_first_byte_fails_every_waiter_alike(make_stack, serve_app) -> None:
    drop = Dropping()
    backends = (await serve_app(drop.app()), await serve_app(drop.app()))
    stack = await make_stack(regions=(), sims=0, backends=backends, origin_overrides={"health_interval_s": 0})
    tasks = [asyncio.create_task(post(stack.origin_url, STREAM, headers=as_edge())) for _ in range(4)]

    async def joined() -> bool:
        return drop.requests == 1 and await coalesced(stack) == 3

    await until(joined)
    drop.release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert {(status, orjson.loads(body)["error"]["code"]) for status, _, body in results} == \
        {(502, "upstream_unavailable")}
    assert drop.requests == 2   # the pool tried the second backend once, for all four
    assert await stack.metric(stack.origin_url, "edgecache_origin_failures_total") == 1


async def test_a_full_origin_answers_429_with_retry_after(make_stack, serve_app) -> None:
    stack, gate, _ = await gated(make_stack, serve_app, regions=(), origin_overrides={
        "max_in_flight_per_backend": 1, "queue_size": 0, "retry_after_s": 2})
    held = asyncio.create_task(post(stack.origin_url, headers=as_edge("a")))

    async def held_at_the_backend() -> bool:
        return gate.arrived == 1

    await until(held_at_the_backend)
    status, headers, body = await post(stack.origin_url, headers=as_edge("b"))
    assert status == 429 and headers["Retry-After"] == "2"
    error = orjson.loads(body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "origin_overloaded")
    assert await stack.metric(stack.origin_url, "edgecache_origin_overloaded_total") == 1
    gate.opened.set()
    assert (await asyncio.wait_for(held, 10))[0] == 200


async def test_a_queued_request_is_served_when_a_slot_frees(make_stack, serve_app) -> None:
    stack, gate, sim = await gated(make_stack, serve_app, regions=(), origin_overrides={
        "max_in_flight_per_backend": 1, "queue_size": 1, "queue_timeout_s": 30})
    first = asyncio.create_task(post(stack.origin_url, headers=as_edge("a")))
    second = asyncio.create_task(post(stack.origin_url, headers=as_edge("b")))

    async def one_held_one_queued() -> bool:
        return gate.arrived == 1 and await stack.metric(stack.origin_url, "edgecache_origin_queued") == 1

    await until(one_held_one_queued)
    status, _, _ = await post(stack.origin_url, headers=as_edge("c"))   # the queue is full
    assert status == 429
    gate.opened.set()
    assert [r[0] for r in await asyncio.wait_for(asyncio.gather(first, second), 10)] == [200, 200]
    assert await stack.metric(sim, "vllm:request_success_total") == 2


async def test_the_edge_passes_the_origins_429_through_and_never_stores_it(make_stack, serve_app) -> None:
    stack, gate, _ = await gated(make_stack, serve_app, origin_overrides={
        "max_in_flight_per_backend": 1, "queue_size": 0})
    edge = stack.edges["us-east"]
    held = asyncio.create_task(post(stack.origin_url, headers=as_edge("someone-else")))

    async def held_at_the_backend() -> bool:
        return gate.arrived == 1

    await until(held_at_the_backend)
    status, headers, body = await post(edge)
    assert status == 429 and orjson.loads(body)["error"]["code"] == "origin_overloaded"
    assert "fwd=miss" in headers["Cache-Status"] and "stored" not in headers["Cache-Status"]
    assert int(headers["Retry-After"]) >= 1     # the origin's advice reaches the client
    gate.opened.set()
    await asyncio.wait_for(held, 10)
    status, headers, _ = await post(edge)   # the 429 was not kept: this one goes to the origin
    assert status == 200 and "fwd=miss" in headers["Cache-Status"] and gate.arrived == 2
    status, headers, _ = await post(edge)
    assert status == 200 and "hit" in headers["Cache-Status"]


async def test_an_edge_tells_the_origin_when_its_client_wants_a_fresh_answer(make_stack, serve_app) -> None:
    stack, gate, _ = await gated(make_stack, serve_app, regions=("us-east", "eu-west"))
    tasks = [asyncio.create_task(post(stack.edges[r], headers={"Cache-Control": "no-cache"}))
             for r in ("us-east", "eu-west")]

    async def both_at_the_backend() -> bool:
        return gate.arrived == 2

    await until(both_at_the_backend)   # with coalescing, the second would have joined the first
    gate.opened.set()
    assert {s for s, _, _ in await asyncio.wait_for(asyncio.gather(*tasks), 10)} == {200}
    assert await coalesced(stack) == 0
