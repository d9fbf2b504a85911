"""OpenAI streams: SSE framing, parsing, and conversion between a stream and a whole answer.

Pure functions over parsed JSON objects. A stored answer can be replayed either way:
a stream assembled into one ``chat.completion``/``text_completion`` object, or a whole
object turned into the chunks an OpenAI server would have sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

__all__ = [
    "DONE",
    "SSEParser",
    "assemble",
    "frame",
    "is_usage_chunk",
    "synthesize_chunks",
    "usage_chunk",
]

DONE = b"data: [DONE]\n\n"
_MAX_EVENT_BYTES = 16 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` (JSON bytes)."""
    return b"data: " + payload + b"\n\n"


class SSEParser:
    """Incremental parser: feed bytes, get the ``data`` payload of each complete event.

    ``[DONE]`` is yielded as ``b"[DONE]"``. Comment lines and other fields are skipped.
    Raises ``ValueError`` when one event grows beyond 16 MiB.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        buf = self._buf + data
        buf = buf.replace(b"\r\n", b"\n")
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2:]
            lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                yield b"\n".join(lines)
        if len(buf) > _MAX_EVENT_BYTES:
            raise ValueError("SSE event larger than 16 MiB")
        self._buf = buf

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered."""
        return bool(self._buf.strip())


def is_usage_chunk(chunk: dict[str, Any]) -> bool:
    """The final usage-only chunk sent under ``stream_options.include_usage``."""
    return not chunk.get("choices") and chunk.get("usage") is not None


def _completion_object(endpoint: str) -> str:
    return "chat.completion" if endpoint == "chat" else "text_completion"


def _chunk_object(endpoint: str) -> str:
    return "chat.completion.chunk" if endpoint == "chat" else "text_completion"


def assemble(endpoint: str, chunks: Iterable[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """Fold stream chunks into the whole answer an unstreamed request would have returned."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if not head:
            head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        for c in chunk.get("choices") or ():
            index = c.get("index", 0)
            acc = choices.setdefault(index, {"index": index, "text": [], "role": None, "tools": {},
                                             "finish_reason": None, "logprobs": None, "extra": {}})
            if c.get("finish_reason") is not None:
                acc["finish_reason"] = c["finish_reason"]
            if c.get("logprobs") is not None:
                acc["logprobs"] = _merge_logprobs(acc["logprobs"], c["logprobs"])
            if endpoint == "chat":
                _fold_delta(acc, c.get("delta") or {})
            elif c.get("text"):
                acc["text"].append(c["text"])
    out: dict[str, Any] = {"id": head.get("id", ""), "object": _completion_object(endpoint),
                           "created": head.get("created", 0), "model": head.get("model", "")}
    if "system_fingerprint" in head:
        out["system_fingerprint"] = head["system_fingerprint"]
    out["choices"] = [_finish_choice(endpoint, choices[i]) for i in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out


def _fold_delta(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("role"):
        acc["role"] = delta["role"]
    if delta.get("content"):
        acc["text"].append(delta["content"])
    for call in delta.get("tool_calls") or ():
        slot = acc["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                               "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += fn["arguments"]
    for key, value in delta.items():
        if key not in ("role", "content", "tool_calls") and isinstance(value, str):
            acc["extra"][key] = acc["extra"].get(key, "") + value


def _merge_logprobs(old: Any, new: Any) -> Any:
    if old is None:
        return new
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            elif value is not None:
                merged[key] = value
        return merged
    return new


def _finish_choice(endpoint: str, acc: dict[str, Any]) -> dict[str, Any]:
    text = "".join(acc["text"])
    if endpoint != "chat":
        return {"index": acc["index"], "text": text, "logprobs": acc["logprobs"],
                "finish_reason": acc["finish_reason"]}
    message: dict[str, Any] = {"role": acc["role"] or "assistant", "content": text if text or not acc["tools"] else None}
    message.update(acc["extra"])
    if acc["tools"]:
        message["tool_calls"] = [acc["tools"][i] for i in sorted(acc["tools"])]
    return {"index": acc["index"], "message": message, "logprobs": acc["logprobs"],
            "finish_reason": acc["finish_reason"]}


def synthesize_chunks(endpoint: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks an OpenAI server streams for ``body``, without the usage chunk."""
    head = {"id": body.get("id", ""), "object": _chunk_object(endpoint),
            "created": body.get("created", 0), "model": body.get("model", "")}
    if "system_fingerprint" in body:
        head["system_fingerprint"] = body["system_fingerprint"]
    chunks: list[dict[str, Any]] = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        if endpoint != "chat":
            chunks.append({**head, "choices": [{"index": index, "text": choice.get("text", ""),
                                                "logprobs": choice.get("logprobs"),
                                                "finish_reason": choice.get("finish_reason")}]})
            continue
        message = choice.get("message") or {}
        role = message.get("role", "assistant")
        chunks.append({**head, "choices": [{"index": index, "delta": {"role": role, "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        delta: dict[str, Any] = {k: v for k, v in message.items() if k not in ("role", "tool_calls") and v is not None}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        if delta:
            chunks.append({**head, "choices": [{"index": index, "delta": delta,
                                                "logprobs": choice.get("logprobs"), "finish_reason": None}]})
        chunks.append({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": choice.get("finish_reason")}]})
    return chunks


def usage_chunk(endpoint: str, body: dict[str, Any], usage: dict[str, Any]) -> bytes:
    """The final ``include_usage`` chunk: no choices, the usage of the whole answer."""
    return orjson.dumps({"id": body.get("id", ""), "object": _chunk_object(endpoint),
                         "created": body.get("created", 0), "model": body.get("model", ""),
                         "choices": [], "usage": usage})
