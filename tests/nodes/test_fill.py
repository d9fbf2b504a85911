"""A fill against an origin's failure modes: only a complete, well-formed answer becomes an entry."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses

from edgecache.entry import Entry
from edgecache.errors import UpstreamError, UpstreamUnavailable
from nodes.fill import Fill, FillRequest

ORIGIN = "http://origin.test"
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]}
END = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5,
                   "prompt_tokens_details": {"cached_tokens": 2}}}


def sse(*events: object, done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def request(stream: bool) -> FillRequest:
    return FillRequest(key=b"k" * 16, endpoint="chat", path="/v1/chat/completions",
                       body={"model": "m", "messages": [{"role": "user", "content": "x"}]}, stream=stream,
                       headers={}, store=True, ttl=60.0, tenant="t", tags=frozenset({"doc:1"}),
                       max_entry_bytes=1 << 20)


async def run(stream: bool, **mocked) -> tuple[Fill, list[Entry]]:
    stored: list[Entry] = []
    async with aiohttp.ClientSession(base_url=ORIGIN) as session:
        with aioresponses() as mock:
            mock.post(ORIGIN + "/v1/chat/completions", **mocked)
            fill = Fill(request(stream), session, 5.0, stored.append, clock=lambda: 1000.0)
            fill.join()
            fill.start()
            await fill.wait()
    return fill, stored


async def test_complete_stream_becomes_an_entry_with_chunks_and_usage() -> None:
    fill, stored = await run(True, body=sse(CHUNK, END, USAGE), content_type="text/event-stream")
    assert fill.failure is None
    (entry,) = stored
    assert entry.chunks is not None and len(entry.chunks) == 2
    assert orjson.loads(entry.body)["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert (entry.usage.prompt_tokens, entry.usage.cached_tokens) == (4, 2)
    assert entry.tags == frozenset({"doc:1"}) and entry.created == 1000.0


async def test_stream_without_done_is_a_failure_and_not_stored() -> None:
    fill, stored = await run(True, body=sse(CHUNK, done=False), content_type="text/event-stream")
    assert isinstance(fill.failure, UpstreamUnavailable) and stored == []


async def test_malformed_chunk_is_a_failure_and_not_stored() -> None:
    fill, stored = await run(True, body=b"data: {not json\n\n", content_type="text/event-stream")
    assert isinstance(fill.failure, UpstreamError) and stored == []


async def test_error_event_inside_a_stream_is_not_stored() -> None:
    fill, stored = await run(True, body=sse(CHUNK, {"error": {"message": "oom"}}), content_type="text/event-stream")
    assert isinstance(fill.failure, UpstreamError) and stored == []


async def test_json_answer_without_choices_is_not_stored() -> None:
    fill, stored = await run(False, payload={"object": "chat.completion"})
    assert isinstance(fill.failure, UpstreamError) and stored == []


async def test_reset_before_the_answer_is_upstream_unavailable() -> None:
    fill, stored = await run(False, exception=aiohttp.ServerDisconnectedError())
    assert isinstance(fill.failure, UpstreamUnavailable) and stored == []
    with pytest.raises(UpstreamUnavailable):
        await fill.wait_started()


async def test_error_status_is_passed_through_and_not_stored() -> None:
    fill, stored = await run(False, status=429, payload={"error": {"message": "slow down"}})
    reply = await fill.wait_started()
    assert reply is not None and reply.status == 429 and b"slow down" in reply.body
    assert stored == []
