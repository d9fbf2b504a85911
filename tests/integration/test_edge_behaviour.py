"""Edge node behaviour a CDN user relies on: collapsing, tenants, errors, Cache-Control, restarts."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest

from edgecache.config import TenantConfig
from nodes.app import create_app
from tests.conftest import NODE_TOKEN, Stack, async_openai
from tests.integration.upstreams import CutStream, Failing, Gate, Trickle

pytestmark = pytest.mark.integration

CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": "What is our refund policy?"}]}
AUTH = {"Authorization": "Bearer sk-test"}


async def post(url: str, body: object = CHAT, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        kwargs = {"data": raw} if raw is not None else {"json": body}
        async with s.post(url + "/v1/chat/completions", headers={**AUTH, **(headers or {})}, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def healthz(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as resp:
        return await resp.json()


async def until(predicate, deadline_s: float = 5.0) -> None:
    """Wait for a condition observable over HTTP, with a deadline (polls; asserts no timing)."""
    async with asyncio.timeout(deadline_s):
        while not await predicate():  # noqa: ASYNC110 - the condition lives in another server
            await asyncio.sleep(0.005)


async def test_concurrent_identical_misses_make_one_origin_request(make_stack, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(sims=0, backends=(await serve_app(gate.app()),))
    edge = stack.edges["us-east"]
    n = 8
    tasks = [asyncio.create_task(post(edge)) for _ in range(n)]
    tasks += [asyncio.create_task(post(edge, {**CHAT, "stream": True})) for _ in range(n)]

    async def all_waiting() -> bool:
        return (await healthz(edge))["waiters"] == 2 * n

    await until(all_waiting)
    gate.opened.set()
    results = await asyncio.gather(*tasks)
    assert gate.arrived == 1
    assert await stack.origin_requests() == 1
    assert {status for status, _, _ in results} == {200}
    jsons = {body for _, _, body in results[:n]}
    assert len(jsons) == 1
    assert sum("collapsed" in h["Cache-Status"] for _, h, _ in results) == 2 * n - 1
    streams = {body for _, _, body in results[n:]}
    assert len(streams) == 1 and next(iter(streams)).endswith(b"data: [DONE]\n\n")


async def test_tenants_never_share_entries(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    await post(edge, headers={"Authorization": "Bearer sk-tenant-a"})
    status, headers, _ = await post(edge, headers={"Authorization": "Bearer sk-tenant-b"})
    assert status == 200 and "fwd=miss" in headers["Cache-Status"]
    _, again, _ = await post(edge, headers={"Authorization": "Bearer sk-tenant-a"})
    assert "; hit;" in again["Cache-Status"]
    assert await stack.origin_requests() == 2


async def test_listed_tenants_require_a_known_key(make_stack) -> None:
    tenants = (TenantConfig("acme", ("sk-acme-1", "sk-acme-2")), TenantConfig("globex", ("sk-globex",)))
    stack = await make_stack(tenants=tenants)
    edge = stack.edges["us-east"]
    status, _, body = await post(edge, headers={"Authorization": "Bearer sk-nobody"})
    assert status == 401 and b"invalid_api_key" in body
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
    await post(edge, headers={"Authorization": "Bearer sk-acme-1"})
    _, same_tenant, _ = await post(edge, headers={"Authorization": "Bearer sk-acme-2"})
    _, other_tenant, _ = await post(edge, headers={"Authorization": "Bearer sk-globex"})
    assert "; hit;" in same_tenant["Cache-Status"]
    assert "fwd=miss" in other_tenant["Cache-Status"]
    async with aiohttp.ClientSession() as s:   # the model list too, as OpenAI's
        async with s.get(edge + "/v1/models") as resp:
            assert resp.status == 401
        async with s.get(edge + "/v1/models", headers={"Authorization": "Bearer sk-globex"}) as resp:
            assert resp.status == 200 and (await resp.json())["data"]


async def test_an_azure_style_api_key_header_is_the_same_tenant_as_its_bearer_key(make_stack) -> None:
    stack = await make_stack(tenants=(TenantConfig("acme", ("sk-acme-1",)),))
    edge = stack.edges["us-east"]
    await post(edge, headers={"Authorization": "Bearer sk-acme-1"})
    status, headers, _ = await post(edge, headers={"Authorization": "", "api-key": "sk-acme-1"})
    assert status == 200 and "; hit;" in headers["Cache-Status"]
    status, _, _ = await post(edge, headers={"Authorization": "", "api-key": "sk-nobody"})
    assert status == 401


async def test_upstream_errors_pass_through_and_are_not_stored(make_stack, serve_app) -> None:
    failing = Failing(400)
    stack = await make_stack(sims=0, backends=(await serve_app(failing.app()),))
    for _ in range(2):
        status, headers, body = await post(stack.edges["us-east"])
        assert status == 400 and b"model overloaded" in body
        assert "stored" not in headers["Cache-Status"]
    assert failing.requests == 2


async def test_every_backend_down_is_a_502_with_an_error_body(make_stack, serve_app) -> None:
    failing = Failing(503)
    stack = await make_stack(sims=0, backends=(await serve_app(failing.app()), "http://127.0.0.1:9"))
    status, _, body = await post(stack.edges["us-east"])
    assert status == 502 and b'"error"' in body and b"upstream" in body


async def test_an_edge_the_origin_refuses_answers_502_not_the_origins_401(make_stack) -> None:
    stack = await make_stack(node_overrides={"node_token": "not-the-node-token"})
    edge = stack.edges["us-east"]
    status, headers, body = await post(edge)
    assert status == 502 and orjson.loads(body)["error"]["code"] == "upstream_unavailable"   # the client's key is fine
    assert "stored" not in headers["Cache-Status"]
    async with aiohttp.ClientSession() as s, s.get(edge + "/v1/models", headers=AUTH) as r:
        assert r.status == 502


async def test_origin_unreachable_is_a_502(make_stack) -> None:
    stack = await make_stack(node_overrides={"origin_url": "http://127.0.0.1:9"})
    status, _, body = await post(stack.edges["us-east"])
    assert status == 502 and b"upstream_unavailable" in body


async def test_cut_stream_is_not_stored(make_stack, serve_app) -> None:
    cut = CutStream()
    stack = await make_stack(sims=0, backends=(await serve_app(cut.app()),))
    async with await async_openai(stack.edges["us-east"] + "/v1") as c:
        with pytest.raises(openai.APIError):
            stream = await c.chat.completions.create(stream=True, **CHAT)
            async for _ in stream:
                pass
    status, _, _ = await post(stack.edges["us-east"], {**CHAT, "stream": True})
    assert cut.requests == 2
    assert status == 200   # the second attempt got headers too, and was not answered from cache


async def test_client_leaving_mid_stream_leaves_no_entry_and_cancels_the_fill(make_stack, serve_app) -> None:
    held = CutStream(hold=True)
    stack = await make_stack(sims=0, backends=(await serve_app(held.app()),))
    edge = stack.edges["us-east"]
    async with aiohttp.ClientSession() as s:
        resp = await s.post(edge + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        resp.close()   # the client goes away mid-stream
    await asyncio.wait_for(held.cancelled.wait(), 5)
    status, headers, _ = await post(edge, headers={"Cache-Control": "only-if-cached"})
    assert status == 504 and "only-if-cached" in headers["Cache-Status"]


async def test_a_stream_longer_than_origin_timeout_completes_while_chunks_keep_coming(make_stack,
                                                                                     serve_app) -> None:
    # origin_timeout_s bounds the wait for the first byte and each silence, not the whole answer
    trickle = Trickle(count=20, gap_s=0.05)   # about 1 s in all, never silent for more than 0.05 s
    stack = await make_stack(sims=0, backends=(await serve_app(trickle.app()),),
                             node_overrides={"origin_timeout_s": 0.5})
    async with await async_openai(stack.edges["us-east"] + "/v1") as c:
        stream = await c.chat.completions.create(stream=True, **CHAT)
        text = "".join([part.choices[0].delta.content or "" async for part in stream if part.choices])
    assert text == "".join(f"w{i} " for i in range(20))
    status, headers, body = await post(stack.edges["us-east"], {**CHAT, "stream": True})
    assert status == 200 and "; hit;" in headers["Cache-Status"] and b"w19" in body
    assert trickle.requests == 1


async def test_a_stream_silent_for_longer_than_origin_timeout_is_cut_and_not_stored(make_stack,
                                                                                  serve_app) -> None:
    held = CutStream(hold=True)   # two chunks, then silence
    stack = await make_stack(sims=0, backends=(await serve_app(held.app()),),
                             node_overrides={"origin_timeout_s": 0.5})
    async with await async_openai(stack.edges["us-east"] + "/v1") as c:
        with pytest.raises(openai.APIError):
            stream = await c.chat.completions.create(stream=True, **CHAT)
            async for _ in stream:
                pass
    status, _, _ = await post(stack.edges["us-east"], {**CHAT, "stream": True},
                                    headers={"Cache-Control": "only-if-cached"})
    assert status == 504
    held.release.set()


async def purge_and_wait(stack: Stack, tag: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/v1/purge?wait=true", json={"tags": [tag]},
                                                    headers={"Authorization": "Bearer dev-admin-token"}) as r:
        assert r.status == 200, await r.text()


async def test_an_answer_serves_a_request_only_if_it_carries_the_requests_tags(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    await post(edge)                                               # stored without tags
    status, headers, _ = await post(edge, headers={"Cache-Tag": "doc:42"})
    assert status == 200 and "fwd=vary-miss" in headers["Cache-Status"] and "stored" in headers["Cache-Status"]
    for tags in ({"Cache-Tag": "doc:42"}, {}):   # the new answer carries both: it serves both
        _, headers, _ = await post(edge, headers=tags)
        assert "; hit;" in headers["Cache-Status"]
    await purge_and_wait(stack, "doc:42")
    for tags in ({"Cache-Tag": "doc:42"}, {}):
        status, headers, _ = await post(edge, headers={**tags, "Cache-Control": "only-if-cached"})
        assert status == 504, headers["Cache-Status"]
    assert await stack.origin_requests() == 2


async def test_a_request_that_joins_a_fill_puts_its_tags_on_the_stored_answer(make_stack, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(sims=0, backends=(await serve_app(gate.app()),))
    edge = stack.edges["us-east"]
    first = asyncio.create_task(post(edge))
    await until(lambda: _waiters(edge, 1))
    second = asyncio.create_task(post(edge, headers={"Cache-Tag": "doc:7"}))
    await until(lambda: _waiters(edge, 2))
    gate.opened.set()
    (_, _, one), (_, headers, two) = await asyncio.gather(first, second)
    assert one == two and "collapsed" in headers["Cache-Status"]
    await purge_and_wait(stack, "doc:7")
    status, headers, _ = await post(edge, headers={"Cache-Control": "only-if-cached"})
    assert status == 504, headers["Cache-Status"]


async def _waiters(edge: str, n: int) -> bool:
    return (await healthz(edge))["waiters"] == n


async def test_misses_beyond_max_fills_are_a_429_with_retry_after_and_identical_ones_still_join(
        make_stack, serve_app) -> None:
    sims = await make_stack(regions=(), sims=1)
    gate = Gate(sims.sim_urls[0])
    stack = await make_stack(sims=0, backends=(await serve_app(gate.app()),), node_overrides={"max_fills": 2})
    edge = stack.edges["us-east"]
    held = [asyncio.create_task(post(edge, {**CHAT, "seed": i})) for i in range(2)]
    await until(lambda: _waiters(edge, 2))
    status, headers, body = await post(edge, {**CHAT, "seed": 99})   # a third distinct miss
    assert status == 429 and headers["Retry-After"] == "1"
    assert orjson.loads(body)["error"]["code"] == "edge_overloaded" and "overloaded" in headers["Cache-Status"]
    joined = asyncio.create_task(post(edge, {**CHAT, "seed": 0}))   # identical to one in flight: joins it
    await until(lambda: _waiters(edge, 3))
    gate.opened.set()
    assert [s for s, _, _ in await asyncio.gather(*held, joined)] == [200, 200, 200]
    status, _, _ = await post(edge, {**CHAT, "seed": 99})   # room again
    assert status == 200
    metrics = await stack.metric(edge, "edgecache_requests_total", cache_result="error")
    assert metrics == 1


async def test_cache_control_directives(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    status, headers, _ = await post(edge, headers={"Cache-Control": "only-if-cached"})
    assert status == 504
    _, headers, _ = await post(edge, headers={"Cache-Control": "no-store"})
    assert "stored" not in headers["Cache-Status"]
    _, headers, _ = await post(edge)
    assert "fwd=miss" in headers["Cache-Status"] and "stored" in headers["Cache-Status"]
    _, headers, _ = await post(edge, headers={"Cache-Control": "no-cache"})
    assert "fwd=request" in headers["Cache-Status"]
    _, headers, _ = await post(edge, headers={"Cache-Control": "max-age=0"})
    assert "fwd=stale" in headers["Cache-Status"]
    _, headers, _ = await post(edge, headers={"Cache-Control": "max-age=3600, only-if-cached"})
    assert "; hit;" in headers["Cache-Status"]
    assert await stack.origin_requests() == 4


async def test_client_ttl_is_capped_and_reported(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    await post(edge, headers={"X-EdgeCache-TTL": "30"})
    _, headers, _ = await post(edge)
    ttl = int(headers["Cache-Status"].split("ttl=")[1].split(";")[0])
    assert 0 <= ttl <= 30


@pytest.mark.parametrize(("raw", "headers", "status", "needle"), [
    (b"{not json", {}, 400, b"not valid JSON"),
    (b"[]", {}, 400, b"invalid_request_error"),
    (b'{"model": "sim-llm"}', {}, 400, b"messages"),
    (b'{"model": "sim-llm", "messages": "hi"}', {}, 400, b"messages"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400, b"model"),
    (b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', {}, 400, b"error"),
    (b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}]}', {"Cache-Control": "max-age=soon"},
     400, b"max-age"),
    (b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}]}', {"X-EdgeCache-TTL": "-5"},
     400, b"X-EdgeCache-TTL"),
    (b'{"model": "sim-llm", "messages": [{"role": "user", "content": "x"}]}', {"Cache-Tag": "bad tag!"},
     400, b"error"),
])
async def test_bad_input_gets_a_clear_4xx(stack: Stack, raw: bytes, headers: dict, status: int, needle: bytes) -> None:
    got, answer_headers, body = await post(stack.edges["us-east"], raw=raw,
                                           headers={"Content-Type": "application/json", **headers})
    assert got == status and needle in body
    assert answer_headers["Cache-Status"] == "edgecache-us-east; fwd=bypass; detail=rejected"
    assert b'"error"' in body
    assert await stack.origin_requests() == 0


async def test_oversized_body_is_413_at_the_edge_and_at_the_origin(make_stack) -> None:
    stack = await make_stack(node_overrides={"max_body_bytes": 4096}, origin_overrides={"max_body_bytes": 4096})
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    for url in (stack.edges["us-east"], stack.origin_url):
        status, _, body = await post(url, big, headers={"Authorization": f"Bearer {NODE_TOKEN}"})
        assert status == 413 and orjson.loads(body)["error"]["code"] == "payload_too_large"


async def test_a_wrong_method_is_a_405_that_says_which_methods_the_path_takes(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        for url in (stack.edges["us-east"], stack.origin_url):
            async with s.get(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {NODE_TOKEN}"}) as r:
                assert r.status == 405 and "POST" in r.headers["Allow"]
                assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_edge_restarted_on_the_same_disk_keeps_its_entries(make_stack, tmp_path) -> None:
    stack = await make_stack(data_root=tmp_path)
    status, _, first = await post(stack.edges["us-east"])
    assert status == 200
    await stack.servers["us-east"].close()   # waits for the disk write
    from aiohttp.test_utils import TestServer

    restarted = TestServer(create_app(stack.node_configs["us-east"]), host="127.0.0.1")
    await restarted.start_server()
    try:
        url = str(restarted.make_url("")).rstrip("/")
        status, headers, again = await post(url, headers={"Cache-Control": "only-if-cached"})
        assert status == 200 and "hit; detail=disk" in headers["Cache-Status"]
        assert again == first
    finally:
        await restarted.close()


async def test_unknown_model_is_passed_through_from_the_backend(stack: Stack) -> None:
    status, _, body = await post(stack.edges["us-east"], {**CHAT, "model": "no-such-model"})
    assert 400 <= status < 500 and b"error" in body


async def test_models_and_health_endpoints(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.edges["us-east"] + "/v1/models", headers=AUTH) as resp:
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == ["sim-llm"]
    health = await healthz(stack.edges["us-east"])
    assert health["status"] == "ok" and health["region"] == "us-east"
    await post(stack.edges["us-east"])
    await post(stack.edges["us-east"])
    assert await stack.metric(stack.edges["us-east"], "edgecache_requests_total", cache_result="hit") == 1
    assert await stack.metric(stack.edges["us-east"], "edgecache_tier_entries", tier="memory") == 1


async def test_origin_refuses_requests_without_the_node_token(stack: Stack) -> None:
    status, _, body = await post(stack.origin_url, headers={"Authorization": "Bearer sk-client-key"})
    assert status == 401 and b"node token" in body


async def test_streams_carry_usage_only_when_the_client_asks(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    plain = {**CHAT, "stream": True}
    with_usage = {**plain, "stream_options": {"include_usage": True}}
    for body in (plain, plain, with_usage, plain):   # miss, hit, hit with usage, hit
        status, headers, raw = await post(edge, body)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        if body is with_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        else:
            assert all("usage" not in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert await stack.origin_requests() == 1


async def test_bad_headers_are_refused_on_hits_too(stack: Stack) -> None:
    edge = stack.edges["us-east"]
    assert (await post(edge))[0] == 200
    for headers in ({"Cache-Tag": "a b"}, {"X-EdgeCache-TTL": "forever"}, {"Cache-Control": "max-age=x"}):
        status, _, body = await post(edge, headers=headers)
        assert status == 400 and b"invalid_request_error" in body
    _, headers, _ = await post(edge)
    assert "; hit;" in headers["Cache-Status"]


async def test_origin_reports_every_backend(stack: Stack) -> None:
    await post(stack.edges["us-east"])
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/health") as resp:
        health = await resp.json()
    assert [b["url"] for b in health["backends"]] == stack.sim_urls
    assert all(b["healthy"] and b["in_flight"] == 0 for b in health["backends"])
    assert sum(b["requests"] for b in health["backends"]) == 1
    assert await stack.metric(stack.origin_url, "edgecache_origin_backend_healthy") == len(stack.sim_urls)
    assert await stack.metric(stack.origin_url, "edgecache_origin_routed_total") == 1
