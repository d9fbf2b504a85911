"""OpenAI response bodies, shaped as vLLM's OpenAI server sends them.

Chat: ``chat.completion`` and a ``chat.completion.chunk`` stream (a role chunk per choice,
content chunks, a closing chunk per choice with ``finish_reason``; with
``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last chunk has
``"choices": []`` and the usage). Completions: ``text_completion`` and its stream.
SSE framing is ``data: <json>\\n\\n`` ending with ``data: [DONE]\\n\\n``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Choice", "Reply", "body", "chunk", "sse", "sse_done", "usage", "usage_chunk"]

_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Reply:
    """What every body of one response shares."""

    kind: str  # "chat" or "completion"
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, kind: str, model: str) -> Reply:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"   # sortable, like a UUIDv7: see generated_at
        return cls(kind, model, f"{prefix}-{time.time_ns() // 1000:014x}{uuid.uuid4().hex[:18]}", int(time.time()))

    @staticmethod
    def generated_at(reply_id: str) -> float | None:
        """When the reply with this id began (epoch seconds, to the microsecond), or None for an
        id this server did not make: benchmarks tell a stale answer from a fresh one by it."""
        try:
            return int(reply_id.split("-", 1)[1][:14], 16) / 1e6
        except (IndexError, ValueError):
            return None

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    finish_reason: str


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def body(reply: Reply, choices: Sequence[Choice], usage_: dict[str, Any]) -> bytes:
    """A whole (non-streamed) response."""
    if reply.kind == "chat":
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
    else:
        items = [{"index": c.index, "text": c.text, "logprobs": None,
                  "finish_reason": c.finish_reason} for c in choices]
    return orjson.dumps({"id": reply.id, "object": reply.object, "created": reply.created,
                         "model": reply.model, "choices": items, "usage": usage_})


def chunk(reply: Reply, index: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk for choice ``index``.

    Chat: ``role`` gives the opening delta ``{"role": "assistant", "content": ""}``, ``text``
    a content delta, and neither an empty delta (the closing chunk, with ``finish_reason``).
    """
    if reply.kind == "chat":
        if role:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        else:
            delta = {}
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    out = {"id": reply.id, "object": reply.chunk_object, "created": reply.created,
           "model": reply.model, "choices": [choice]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(reply: Reply, usage_: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage."""
    return {"id": reply.id, "object": reply.chunk_object, "created": reply.created,
            "model": reply.model, "choices": [], "usage": usage_}


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def sse_done() -> bytes:
    """The frame that ends every stream."""
    return _DONE
