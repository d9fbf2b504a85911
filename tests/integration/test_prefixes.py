"""Static prefixes end to end: the registry API, references through edge and origin, versions."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from edgecache.config import AuthConfig, BackendConfig, Config, OriginConfig
from edgecache.sdk import cache_key, prefix_version, prefixed_request
from nodes.app import NODE
from origin.app import create_origin_app
from tests.conftest import NODE_TOKEN, Stack, async_openai

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer dev-admin-token"}
POLICY = "Acme returns policy. " * 200   # about 4 KB of static text
QUESTION = [{"role": "user", "content": "Can I return a laptop after 20 days?"}]


async def call(method: str, url: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
    headers = {**(ADMIN if headers is None else headers), "Content-Type": "application/json"}
    data = None if body is None else io.BytesIO(orjson.dumps(body))
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


async def put_prefix(stack: Stack, prefix_id: str, text: str, tags: list[str] | None = None) -> tuple[int, dict]:
    return await call("POST", stack.origin_url + "/v1/prefixes", {"id": prefix_id, "text": text, "tags": tags or []})


async def test_registry_create_update_read_delete(stack: Stack) -> None:
    url = stack.origin_url + "/v1/prefixes"
    status, created = await put_prefix(stack, "returns", POLICY, ["doc:42"])
    assert status == 201 and created["version"] == prefix_version(POLICY) and created["bytes"] == len(POLICY)
    status, same = await put_prefix(stack, "returns", POLICY, ["doc:42"])
    assert status == 200 and same["changed"] is False and same["version"] == created["version"]
    status, updated = await put_prefix(stack, "returns", POLICY + "Updated.", ["doc:42"])
    assert status == 200 and updated["changed"] is True and updated["version"] != created["version"]
    status, listing = await call("GET", url)
    assert status == 200 and [p["id"] for p in listing["data"]] == ["returns"]
    assert "text" not in listing["data"][0]
    status, one = await call("GET", url + "/returns")
    assert status == 200 and one["text"] == POLICY + "Updated." and one["tags"] == ["doc:42"]
    assert (await call("DELETE", url + "/returns"))[0] == 200
    status, missing = await call("GET", url + "/returns")
    assert status == 404 and "returns" in missing["error"]["message"]


async def test_edges_read_prefix_versions_but_never_their_texts(stack: Stack) -> None:
    await put_prefix(stack, "returns", POLICY, ["doc:42"])
    node = {"Authorization": f"Bearer {NODE_TOKEN}"}
    url = stack.origin_url + "/v1/prefixes"
    status, one = await call("GET", url + "/returns", headers=node)
    assert status == 200 and one["version"] == prefix_version(POLICY) and "text" not in one
    status, refused = await call("GET", url + "?text=1", headers=node)
    assert status == 403 and refused["error"]["code"] == "admin_token_required"
    status, listing = await call("GET", url + "?text=1")   # the admin token reads them
    assert status == 200 and listing["data"][0]["text"] == POLICY


@pytest.mark.parametrize(("body", "needle"), [
    ({"id": "bad id!", "text": "x"}, "prefix id"),
    ({"id": "ok", "text": ""}, "text"),
    ({"id": "ok", "text": "x", "tags": ["bad tag"]}, "tag"),
    ({"id": "ok", "text": "x", "colour": "blue"}, "colour"),
    ({"text": "x"}, "prefix id"),
])
async def test_registry_rejects_bad_prefixes_with_clear_errors(stack: Stack, body: dict, needle: str) -> None:
    status, answer = await call("POST", stack.origin_url + "/v1/prefixes", body)
    assert status == 400 and needle in answer["error"]["message"]
    assert (await call("GET", stack.origin_url + "/v1/prefixes"))[1]["data"] == []


async def test_registry_needs_the_admin_token_to_change(stack: Stack) -> None:
    url = stack.origin_url + "/v1/prefixes"
    node = {"Authorization": f"Bearer {NODE_TOKEN}"}
    assert (await call("POST", url, {"id": "a", "text": "x"}, headers=node))[0] == 401
    assert (await call("POST", url, {"id": "a", "text": "x"}, headers={}))[0] == 401
    assert (await call("GET", url, headers=node))[0] == 200
    assert (await call("GET", url, headers={"Authorization": "Bearer nope"}))[0] == 401


async def test_oversized_prefix_is_refused(make_stack) -> None:
    stack = await make_stack()
    status, answer = await put_prefix(stack, "big", "x" * (2 * 1024 * 1024))
    assert status in (400, 413) and "error" in answer


async def test_registry_survives_an_origin_restart(tmp_path) -> None:
    config = Config(origin=OriginConfig(data_dir=str(tmp_path / "origin")),
                    backends=(BackendConfig(url="http://127.0.0.1:9"),), auth=AuthConfig(node_token=NODE_TOKEN))
    for attempt in range(2):
        server = TestServer(create_origin_app(config), host="127.0.0.1")
        await server.start_server()
        try:
            url = str(server.make_url("/v1/prefixes"))
            if attempt == 0:
                assert (await call("POST", url, {"id": "kb", "text": POLICY, "tags": ["doc:1"]}))[0] == 201
            else:
                status, one = await call("GET", url + "/kb")
                assert status == 200 and one["text"] == POLICY and one["tags"] == ["doc:1"]
        finally:
            await server.close()


async def test_prefixed_request_is_expanded_at_the_origin_and_cached_at_the_edge(stack: Stack) -> None:
    await put_prefix(stack, "returns", POLICY, ["doc:42"])
    async with await async_openai(stack.edges["us-east"] + "/v1", "sk-shop") as c:
        first = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=QUESTION,
                                                                    extra_body={"prefix": "returns"})
        again = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=QUESTION,
                                                                    extra_body={"prefix": "returns"})
        inline = await c.chat.completions.create(model="sim-llm",
                                                 messages=[{"role": "system", "content": POLICY}, *QUESTION])
    assert "fwd=miss" in first.headers["Cache-Status"] and "; hit;" in again.headers["Cache-Status"]
    # The backend saw the policy as the first system message: same answer as sending it inline.
    assert first.parse().choices[0].message.content == inline.choices[0].message.content
    assert first.parse().usage.prompt_tokens == inline.usage.prompt_tokens
    body = prefixed_request("returns", model="sim-llm", messages=QUESTION)
    key = cache_key(body, api_key="sk-shop", prefix_version=prefix_version(POLICY))
    assert f'key="{key}"' in first.headers["Cache-Status"]
    saved = await stack.metric(stack.edges["us-east"], "edgecache_prefix_bytes_saved_total")
    assert saved == 2 * len(POLICY)


async def test_unknown_prefix_is_a_400_naming_it(stack: Stack) -> None:
    status, answer = await call("POST", stack.edges["us-east"] + "/v1/chat/completions",
                                {"model": "sim-llm", "messages": QUESTION, "prefix": "nope"},
                                headers={"Authorization": "Bearer k"})
    assert status == 400 and "'nope'" in answer["error"]["message"] and answer["error"]["param"] == "prefix"
    assert await stack.origin_requests() == 0


async def test_updated_prefix_never_serves_the_answer_built_on_the_old_text(make_stack) -> None:
    stack = await make_stack(node_overrides={"prefix_refresh_s": 3600.0})   # only the stream refreshes
    edge = stack.edges["us-east"]
    request = {"model": "sim-llm", "messages": QUESTION, "prefix": "returns"}
    auth = {"Authorization": "Bearer k"}
    await put_prefix(stack, "returns", POLICY)
    status, old = await call("POST", edge + "/v1/chat/completions", request, auth)
    assert status == 200
    await put_prefix(stack, "returns", "A completely different policy.")
    state = stack.servers["us-east"].app[NODE]
    async with asyncio.timeout(10):   # the edge learns the new version from the invalidation stream
        while state.prefixes.prefixes["returns"].version != prefix_version("A completely different policy."):
            await state.events.progress.wait()
    status, new = await call("POST", edge + "/v1/chat/completions", request, auth)
    assert status == 200 and new["choices"][0]["message"]["content"] != old["choices"][0]["message"]["content"]


async def test_an_edge_that_has_not_heard_of_a_prefix_update_yet_still_answers_with_the_new_text(
        make_stack) -> None:
    stack = await make_stack(node_overrides={"prefix_refresh_s": 3600.0})   # only the stream refreshes
    edge = stack.edges["us-east"]
    auth = {"Authorization": "Bearer k"}
    await put_prefix(stack, "returns", POLICY)
    status, _ = await call("POST", edge + "/v1/chat/completions",
                           {"model": "sim-llm", "messages": QUESTION, "prefix": "returns"}, auth)
    assert status == 200
    state = stack.servers["us-east"].app[NODE]
    stale = state.prefixes.prefixes["returns"]
    new_text = "A completely different policy."
    await put_prefix(stack, "returns", new_text)
    async with asyncio.timeout(10):   # the edge hears of it; then, as if it had not yet:
        while state.prefixes.prefixes["returns"].version != prefix_version(new_text):
            await state.events.progress.wait()
    state.prefixes.apply(stale)
    other = [{"role": "user", "content": "Can I return shoes I wore once?"}]   # not cached under either version
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", headers=auth, json={
            "model": "sim-llm", "messages": other, "prefix": "returns"}) as r:
        # not the origin's 400 prefix_version_mismatch: the edge caught up and asked again
        assert r.status == 200, await r.text()
        cache_status = r.headers["Cache-Status"]
    assert state.prefixes.prefixes["returns"].version == prefix_version(new_text)
    key = cache_key(prefixed_request("returns", model="sim-llm", messages=other), api_key="k",
                    prefix_version=prefix_version(new_text))
    assert f'key="{key}"' in cache_status and "stored" in cache_status   # keyed and stored under the new version


async def test_a_prefix_listing_tenants_serves_only_them(make_stack) -> None:
    from edgecache.config import TenantConfig

    stack = await make_stack(tenants=(TenantConfig("acme", ("sk-acme",)), TenantConfig("globex", ("sk-globex",))))
    status, created = await call("POST", stack.origin_url + "/v1/prefixes",
                                 {"id": "acme-rules", "text": POLICY, "tenants": ["acme"]})
    assert status == 201 and created["tenants"] == ["acme"]
    await put_prefix(stack, "faq", "Questions everyone may ask about.")
    edge = stack.edges["us-east"]

    async def ask(key: str, prefix: str) -> tuple[int, dict]:
        return await call("POST", edge + "/v1/chat/completions", {"model": "sim-llm", "messages": QUESTION,
                                                                   "prefix": prefix},
                          {"Authorization": f"Bearer {key}"})

    status, _ = await ask("sk-acme", "acme-rules")
    assert status == 200
    before = await stack.origin_requests()
    status, refused = await ask("sk-globex", "acme-rules")
    _, unknown = await ask("sk-globex", "no-such-prefix")
    assert status == 400 and refused["error"]["code"] == "prefix_not_found"
    assert refused["error"]["message"] == unknown["error"]["message"].replace("no-such-prefix", "acme-rules")
    status, _ = await ask("sk-globex", "acme-rules")   # refused again: nothing was stored for it
    assert status == 400
    assert (await ask("sk-globex", "faq"))[0] == 200 and (await ask("sk-acme", "faq"))[0] == 200
    assert await stack.origin_requests() == before + 2   # the refusals were forwarded nowhere: only the two faq


async def test_origin_refuses_to_expand_a_prefix_under_a_stale_version(stack: Stack) -> None:
    await put_prefix(stack, "returns", POLICY)
    await put_prefix(stack, "returns", "A completely different policy.")
    status, refused = await call("POST", stack.origin_url + "/v1/chat/completions",
                                 {"model": "sim-llm", "messages": QUESTION, "prefix": "returns"},
                                 {"Authorization": f"Bearer {NODE_TOKEN}",
                                  "X-EdgeCache-Prefix-Version": prefix_version(POLICY)})
    assert status == 400 and refused["error"]["code"] == "prefix_version_mismatch"


async def test_entries_built_on_a_prefix_carry_its_tags(stack: Stack) -> None:
    await put_prefix(stack, "returns", POLICY, ["doc:42"])
    edge = stack.edges["us-east"]
    request = {"model": "sim-llm", "messages": QUESTION, "prefix": "returns"}
    await call("POST", edge + "/v1/chat/completions", request, {"Authorization": "Bearer k"})
    state = stack.servers["us-east"].app[NODE]
    assert await state.purge_tags(frozenset({"prefix:returns"})) == 1
    await call("POST", edge + "/v1/chat/completions", request, {"Authorization": "Bearer k"})
    assert await state.purge_tags(frozenset({"doc:42"})) == 1


async def test_warm_up_prefills_the_prefix_where_its_requests_will_go(make_stack) -> None:
    stack = await make_stack(sims=3, origin_overrides={"routing": "prefix_aware"})
    status, created = await put_prefix(stack, "returns", POLICY)
    assert status == 201 and len(created["warmed"]) == 1
    async with await async_openai(stack.edges["us-east"] + "/v1", "sk-shop") as c:
        first = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=QUESTION,
                                                                    extra_body={"prefix": "returns"})
    assert "fwd=miss" in first.headers["Cache-Status"]
    usage = first.parse().usage
    # The very first user of the prefix finds nearly all of it in the backend's KV cache.
    assert usage.prompt_tokens_details.cached_tokens >= 0.8 * usage.prompt_tokens
