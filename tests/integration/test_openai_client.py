"""The official openai client against a real edge → origin → simulated GPU topology."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import Stack, async_openai

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "You are a support bot."},
            {"role": "user", "content": "How do I reset my password?"}]


async def client(stack: Stack, region: str = "us-east", key: str = "sk-test") -> openai.AsyncOpenAI:
    return await async_openai(stack.edges[region] + "/v1", key)


async def test_second_identical_chat_request_is_an_edge_hit_with_identical_content(stack: Stack) -> None:
    async with await client(stack) as c:
        first = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
        before = await stack.origin_requests()
        second = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
    assert first.headers["Cache-Status"].startswith("edgecache-us-east; fwd=miss")
    assert "stored" in first.headers["Cache-Status"]
    assert second.headers["Cache-Status"].startswith("edgecache-us-east; hit; detail=memory")
    assert int(second.headers["Age"]) >= 0
    assert await stack.origin_requests() == before == 1
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content.strip()
    assert a.id == b.id and a.usage == b.usage


async def test_streamed_answer_replays_as_stream_and_as_json(stack: Stack) -> None:
    async with await client(stack) as c:
        stream = await c.chat.completions.create(model="sim-llm", messages=MESSAGES, stream=True)
        live = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        replay = await c.chat.completions.create(model="sim-llm", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [ch async for ch in replay]
        whole = await c.chat.completions.create(model="sim-llm", messages=MESSAGES)
    assert await stack.origin_requests() == 1
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == live
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert whole.choices[0].message.content == live
    assert whole.choices[0].finish_reason in ("stop", "length")


async def test_json_answer_replays_as_a_stream_in_openai_chunk_format(stack: Stack) -> None:
    async with await client(stack) as c:
        whole = await c.chat.completions.create(model="sim-llm", messages=MESSAGES)
        stream = await c.chat.completions.create(model="sim-llm", messages=MESSAGES, stream=True)
        chunks = [ch async for ch in stream]
    assert await stack.origin_requests() == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(ch.usage is None for ch in chunks)


async def test_completions_endpoint_hits_streamed_and_not(stack: Stack) -> None:
    async with await client(stack) as c:
        first = await c.completions.create(model="sim-llm", prompt="The capital of France is")
        stream = await c.completions.create(model="sim-llm", prompt="The capital of France is", stream=True)
        text = "".join([ch.choices[0].text async for ch in stream])
        again = await c.completions.with_raw_response.create(model="sim-llm", prompt="The capital of France is")
    assert await stack.origin_requests() == 1
    assert text == first.choices[0].text and first.choices[0].text
    assert "hit" in again.headers["Cache-Status"]
    assert again.parse().choices[0].text == first.choices[0].text


async def test_sync_client_gets_the_cached_answer(stack: Stack) -> None:
    def ask() -> tuple[str, str]:
        with openai.OpenAI(base_url=stack.edges["us-east"] + "/v1", api_key="sk-sync", max_retries=0) as c:
            a = c.chat.completions.create(model="sim-llm", messages=MESSAGES).choices[0].message.content
            raw = c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
            return a, raw.headers["Cache-Status"] + "|" + raw.parse().choices[0].message.content

    first, second = await asyncio.to_thread(ask)
    status, content = second.split("|", 1)
    assert "; hit;" in status and content == first


async def test_different_prompts_get_different_answers(stack: Stack) -> None:
    async with await client(stack) as c:
        a = await c.chat.completions.create(model="sim-llm", messages=[{"role": "user", "content": "one"}])
        b = await c.chat.completions.create(model="sim-llm", messages=[{"role": "user", "content": "two"}])
    assert a.choices[0].message.content != b.choices[0].message.content
    assert await stack.origin_requests() == 2


async def test_output_affecting_parameter_is_a_different_entry(stack: Stack) -> None:
    async with await client(stack) as c:
        await c.chat.completions.create(model="sim-llm", messages=MESSAGES, temperature=0)
        hot = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES, temperature=0.7)
    assert "fwd=miss" in hot.headers["Cache-Status"]
    assert await stack.origin_requests() == 2


async def test_each_region_has_its_own_cache_and_the_origin_shield_fills_the_others(make_stack) -> None:
    stack = await make_stack(regions=("us-east", "eu-west", "ap-south"))
    for n, region in enumerate(stack.edges):
        async with await client(stack, region) as c:
            raw = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
            assert raw.headers["Cache-Status"].startswith(f"edgecache-{region}; fwd=miss")
            assert ("detail=shield-hit" in raw.headers["Cache-Status"]) == (n > 0)
            again = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
            assert again.headers["Cache-Status"].startswith(f"edgecache-{region}; hit")
    assert await stack.origin_requests() == 1     # one GPU request for three regions


async def test_without_the_shield_each_region_asks_the_backend(make_stack) -> None:
    stack = await make_stack(regions=("us-east", "eu-west", "ap-south"), origin_overrides={"shield": False})
    for region in stack.edges:
        async with await client(stack, region) as c:
            raw = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
            assert "shield" not in raw.headers["Cache-Status"]
    assert await stack.origin_requests() == 3
