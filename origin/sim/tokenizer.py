"""A deterministic stand-in tokenizer and chat template for the simulated server.

Text splits into pieces: special markers like ``<|im_start|>``, runs of word characters,
and single punctuation characters; whitespace separates pieces and is dropped. A piece's
token id is a stable 32-bit hash of its text, so the same text always gives the same ids,
in every process and on every machine.

Chat messages render through one fixed template (ChatML-like) before tokenisation::

    <|bos|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n

so requests that share a system prompt share a token prefix, as with a real model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import orjson
import xxhash

__all__ = ["BOS", "encode", "pieces", "render_chat", "token_id"]

BOS = "<|bos|>"

_PIECE = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")


def pieces(text: str) -> list[str]:
    """The pieces ``text`` tokenises into, whitespace dropped."""
    return _PIECE.findall(text)


@lru_cache(maxsize=1 << 16)
def token_id(piece: str) -> int:
    """The stable id of one piece: a 31-bit xxh32 hash of its UTF-8 text."""
    return xxhash.xxh32_intdigest(piece.encode()) & 0x7FFFFFFF


def encode(text: str, *, bos: bool = True) -> list[int]:
    """Token ids of ``text``, with the BOS token first when ``bos``."""
    ids = [token_id(p) for p in _PIECE.findall(text)]
    if bos and (not ids or ids[0] != token_id(BOS)):
        ids.insert(0, token_id(BOS))
    return ids


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages (already validated) into the prompt text the model sees."""
    parts = [BOS]
    if tools:
        parts.append(f"<|im_start|>tools\n{orjson.dumps(list(tools)).decode()}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message['role']}\n{_content_text(message)}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _content_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(_text_parts(content or ()))
    calls = message.get("tool_calls")
    if calls:
        text += orjson.dumps(calls).decode()
    return text


def _text_parts(parts: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    for part in parts:
        yield str(part.get("text", ""))
