"""Purges at the origin reach every edge through the invalidation log (embedded bus)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer dev-admin-token"}
CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": "What is the warranty on chairs?"}]}
REGIONS = ("us-east", "eu-west", "ap-south")


async def ask(edge: str, headers: dict | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=CHAT,
                                                    headers={"Authorization": "Bearer k", **(headers or {})}) as r:
        await r.read()
        return r.status, r.headers["Cache-Status"]


async def purge(stack: Stack, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/v1/purge", json=body,
                                                    headers={**ADMIN, **(headers or {})}) as r:
        return r.status, orjson.loads(await r.read())


async def applied(edge: str, seq: int) -> None:
    """Wait (with a deadline) until the edge reports it applied ``seq``."""
    async with asyncio.timeout(10), aiohttp.ClientSession() as s:
        while True:
            async with s.get(edge + "/healthz") as r:
                if (await r.json())["invalidation"]["applied_seq"] >= seq:
                    return
            await asyncio.sleep(0.01)


@pytest.fixture
async def three(make_stack) -> Stack:
    return await make_stack(regions=REGIONS)


async def test_purge_by_key_and_purge_all(three: Stack) -> None:
    edge = three.edges["us-east"]
    _, status = await ask(edge)
    key = status.split('key="')[1].split('"')[0]
    _, answer = await purge(three, {"keys": [key]})
    await applied(edge, answer["seq"])
    assert (await ask(edge, {"Cache-Control": "only-if-cached"}))[0] == 504
    await ask(edge)
    _, answer = await purge(three, {"all": True})
    await applied(edge, answer["seq"])
    assert (await ask(edge, {"Cache-Control": "only-if-cached"}))[0] == 504


async def test_a_retried_purge_is_recorded_once(three: Stack) -> None:
    first = await purge(three, {"tags": ["doc:1"]}, {"Idempotency-Key": "cms-delivery-7"})
    again = await purge(three, {"tags": ["doc:1"]}, {"Idempotency-Key": "cms-delivery-7"})
    assert first[1]["seq"] == again[1]["seq"] and first[1]["new"] and not again[1]["new"]
    assert again[1]["event"]["source_id"] == "purge:cms-delivery-7"   # never a webhook's id


@pytest.mark.parametrize("body", [{}, {"tags": []}, {"tags": ["bad tag"]}, {"keys": ["xyz"]},
                                  {"all": False}, {"tags": ["a"], "all": True}, {"tags": ["a"], "soft": "yes"},
                                  {"prefix_ids": ["bad id!"]}])
async def test_bad_purges_are_400_and_record_nothing(stack: Stack, body: dict) -> None:
    status, answer = await purge(stack, body)
    assert status == 400 and "error" in answer
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/v1/events",
                                                   headers={"Authorization": "Bearer test-node-token"}) as r:
        assert (await r.json())["last_seq"] == 0


async def test_purging_needs_the_admin_token(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/v1/purge", json={"all": True},
                                                    headers={"Authorization": "Bearer test-node-token"}) as r:
        assert r.status == 401


async def test_an_edge_that_lost_the_stream_stops_serving_tagged_entries(stack: Stack) -> None:
    from nodes.app import NODE

    edge = stack.edges["us-east"]
    untagged = {**CHAT, "messages": [{"role": "user", "content": "Where is your office?"}]}
    await ask(edge, {"Cache-Tag": "doc:5"})
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=untagged) as r:
        assert r.status == 200
    follower = stack.servers["us-east"].app[NODE].events
    heard = follower.clock()
    follower.clock = lambda: heard + follower.max_staleness_s + 1   # the stream has been silent too long
    status, cache_status = await ask(edge, {"Cache-Control": "only-if-cached"})
    assert status == 504 and cache_status.count("detail=") == 1 and "detail=fenced+only-if-cached" in cache_status
    status, cache_status = await ask(edge)
    assert status == 200 and "fwd=miss; detail=fenced" in cache_status
    async with aiohttp.ClientSession() as s:
        async with s.post(edge + "/v1/chat/completions", json=untagged) as r:
            assert "; hit;" in r.headers["Cache-Status"]    # untagged answers cannot have been purged
        async with s.get(edge + "/healthz") as r:
            assert (await r.json())["invalidation"]["fenced"] is True
