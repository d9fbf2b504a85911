"""The official OpenAI SDK talks to the simulated server, streamed and not."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI, NotFoundError

from edgecache.config import SimConfig
from origin.sim import create_sim_app

MODEL = "sim-llm"
SYSTEM = "You are a terse assistant for an edge cache deployment. " * 10


@pytest.fixture
async def openai_client(aiohttp_client):
    client = await aiohttp_client(create_sim_app(SimConfig(time_scale=0.0)))
    # The SDK reads files (certificates, package metadata) while it is built: off the loop.
    oa = await asyncio.to_thread(AsyncOpenAI, base_url=str(client.make_url("/v1")),
                                 api_key="sk-test", max_retries=0)
    async with oa:
        yield oa


def messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


async def test_sdk_chat_completion_reports_cached_tokens(openai_client):
    first = await openai_client.chat.completions.create(model=MODEL, messages=messages("one"),
                                                        max_tokens=10)
    second = await openai_client.chat.completions.create(model=MODEL, messages=messages("two"),
                                                         max_tokens=10)
    assert first.choices[0].message.content.startswith("sim-answer ")
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 10
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0


async def test_sdk_chat_stream_matches_the_whole_answer(openai_client):
    whole = await openai_client.chat.completions.create(model=MODEL, messages=messages("s"),
                                                        max_tokens=12, seed=3)
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=messages("s"), max_tokens=12, seed=3, stream=True,
        stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens_details.cached_tokens > 0


async def test_sdk_completions_stream_and_not(openai_client):
    whole = await openai_client.completions.create(model=MODEL, prompt="Hello", max_tokens=6)
    stream = await openai_client.completions.create(model=MODEL, prompt="Hello", max_tokens=6,
                                                    stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == whole.choices[0].text
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_sdk_sees_an_unknown_model_as_not_found(openai_client):
    with pytest.raises(NotFoundError):
        await openai_client.chat.completions.create(model="gpt-x", messages=messages("x"))
