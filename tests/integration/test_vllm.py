"""The origin against real vLLM servers (skipped unless ``EDGECACHE_VLLM_URL`` names them).

    EDGECACHE_VLLM_URL=http://127.0.0.1:18300 .venv/bin/pytest tests/integration/test_vllm.py

``../shared/tools/vllm-cpu/`` starts one on this CPU (tiny dummy-weight model, automatic
prefix caching, block size 128). Several URLs may be given, separated by commas.
"""

from __future__ import annotations

import os

import aiohttp
import orjson
import pytest

from tests.conftest import Stack, async_openai

URLS = tuple(u.strip().rstrip("/") for u in os.environ.get("EDGECACHE_VLLM_URL", "").split(",") if u.strip())
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not URLS, reason="EDGECACHE_VLLM_URL names no vLLM server")]

# Long enough to fill several 128-token KV blocks on the CPU build.
POLICY = " ".join(f"Rule {i}: items of category {i % 7} may be returned within {10 + i % 20} days."
                  for i in range(120))


async def vllm_counter(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def served_model(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
        return orjson.loads(await r.read())["data"][0]["id"]


@pytest.fixture
async def vllm_stack(make_stack) -> Stack:
    return await make_stack(sims=0, backends=URLS, origin_overrides={"routing": "prefix_aware"})


async def test_prefixed_traffic_reuses_the_real_engines_prefix_cache(vllm_stack: Stack) -> None:
    model = await served_model(URLS[0])
    async with aiohttp.ClientSession() as s, s.post(
            vllm_stack.origin_url + "/v1/prefixes", json={"id": "returns", "text": POLICY},
            headers={"Authorization": "Bearer dev-admin-token"}) as r:
        created = orjson.loads(await r.read())
    assert r.status in (200, 201) and created["warmed"], created
    hits_before = sum([await vllm_counter(u, "vllm:prefix_cache_hits_total") for u in URLS])
    cached = []
    async with await async_openai(vllm_stack.edges["us-east"] + "/v1") as c:
        for i in range(3):
            answer = await c.chat.completions.create(
                model=model, max_tokens=4, temperature=0, extra_body={"prefix": "returns"},
                messages=[{"role": "user", "content": f"Question {i}: can I return a chair after 12 days?"}])
            cached.append(answer.usage.prompt_tokens_details.cached_tokens)
    hits_after = sum([await vllm_counter(u, "vllm:prefix_cache_hits_total") for u in URLS])
    assert all(c >= 128 for c in cached), cached            # the warmed prefix was already there
    assert hits_after - hits_before >= sum(cached)


async def test_edge_answers_repeats_without_reaching_vllm(vllm_stack: Stack) -> None:
    model = await served_model(URLS[0])
    queries_before = sum([await vllm_counter(u, "vllm:prefix_cache_queries_total") for u in URLS])
    async with await async_openai(vllm_stack.edges["us-east"] + "/v1") as c:
        messages = [{"role": "user", "content": "Say hello."}]
        first = await c.chat.completions.create(model=model, max_tokens=4, messages=messages, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in first if ch.choices])
        again = await c.chat.completions.with_raw_response.create(model=model, max_tokens=4, messages=messages)
    assert "; hit;" in again.headers["Cache-Status"]
    assert again.parse().choices[0].message.content == text
    queries_after = sum([await vllm_counter(u, "vllm:prefix_cache_queries_total") for u in URLS])
    assert queries_after - queries_before > 0   # exactly the one miss reached the engine


async def test_a_second_region_is_answered_by_the_origin_shield_without_vllm(make_stack) -> None:
    stack = await make_stack(sims=0, backends=URLS, regions=("us-east", "eu-west"))
    model = await served_model(URLS[0])
    messages = [{"role": "user", "content": "Which chairs can be returned?"}]
    done_before = sum([await vllm_counter(u, "vllm:request_success_total") for u in URLS])
    answers = []
    for region in ("us-east", "eu-west"):
        async with await async_openai(stack.edges[region] + "/v1") as c:
            stream = await c.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=messages,
                                                     stream=True, stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            answers.append(("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                            chunks[-1].usage.completion_tokens))
    done_after = sum([await vllm_counter(u, "vllm:request_success_total") for u in URLS])
    assert done_after - done_before == 1          # eu-west's miss was the shield's hit
    assert answers[0] == answers[1] and answers[0][1] > 0
