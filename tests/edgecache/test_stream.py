"""SSE parsing and the conversion between a stream and a whole OpenAI answer."""

from __future__ import annotations

import orjson
import pytest

from edgecache.stream import (
    DONE,
    SSEParser,
    assemble,
    frame,
    is_usage_chunk,
    synthesize_chunks,
    usage_chunk,
)

CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "logprobs": None,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]},
         "logprobs": None, "finish_reason": "tool_calls"},
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}
TEXT = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "text": "Paris.", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def test_parser_yields_whole_events_across_arbitrary_splits() -> None:
    wire = frame(b'{"a": 1}') + b": keep-alive comment\n\n" + frame(b'{"b": 2}').replace(b"\n", b"\r\n") + DONE
    for cut in range(1, len(wire)):
        parser = SSEParser()
        events = list(parser.feed(wire[:cut])) + list(parser.feed(wire[cut:]))
        assert events == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
        assert not parser.pending


def test_parser_reports_an_unfinished_event() -> None:
    parser = SSEParser()
    assert list(parser.feed(b'data: {"a"')) == []
    assert parser.pending


@pytest.mark.parametrize(("endpoint", "body"), [("chat", CHAT), ("completions", TEXT)])
def test_synthesized_stream_assembles_back_to_the_same_answer(endpoint: str, body: dict) -> None:
    chunks = synthesize_chunks(endpoint, body)
    assert all(c["object"] == ("chat.completion.chunk" if endpoint == "chat" else "text_completion") for c in chunks)
    assert assemble(endpoint, chunks, body["usage"]) == body


def test_chat_stream_starts_with_the_role_and_ends_with_the_finish_reason() -> None:
    chunks = [c for c in synthesize_chunks("chat", CHAT) if c["choices"][0]["index"] == 0]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_assemble_joins_content_and_tool_call_fragments() -> None:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                               "function": {"name": "get_", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    message = assemble("chat", chunks, None)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "c1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def test_usage_chunk_has_no_choices_and_the_whole_usage() -> None:
    chunk = orjson.loads(usage_chunk("chat", CHAT, CHAT["usage"]))
    assert is_usage_chunk(chunk)
    assert chunk["choices"] == [] and chunk["usage"] == CHAT["usage"] and chunk["id"] == "chatcmpl-1"
    assert not is_usage_chunk(synthesize_chunks("chat", CHAT)[0])
