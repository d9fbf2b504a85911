"""What the semantic tier compares: the last user question, inside a scope of everything else.

Two chat requests may share an answer through the semantic tier only when they are equal in
every respect but the wording of their last user message: same tenant, model, prefix version,
every parameter, and the exact earlier turns. ``semantic_query`` returns that scope as a
digest, and the question as text, or None when the request may not take a semantic hit:

- the completions endpoint (a raw prompt has no question to isolate);
- ``tools`` or ``functions`` in the request, or ``n`` other than 1;
- a last message that is not from the user, or not text only (images, audio);
- a question longer than ``max_chars`` (the embedding model reads about 256 word pieces;
  two long questions differing after that point would look identical to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import xxhash

from edgecache.keys import SPEC_VERSION, Scope, canonical_request

__all__ = ["MAX_QUERY_CHARS", "SemanticQuery", "semantic_query"]

MAX_QUERY_CHARS = 500


@dataclass(frozen=True, slots=True)
class SemanticQuery:
    scope: bytes   # 16-byte digest of the request without the last question's wording
    text: str      # the last user question


def _question(message: object) -> str | None:
    if not isinstance(message, dict) or message.get("role") != "user":
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            parts.append(part["text"])
        return "\n".join(parts)
    return None


def semantic_query(endpoint: str, body: object, scope: Scope, *,
                   max_chars: int = MAX_QUERY_CHARS) -> SemanticQuery | None:
    """The scope and question of a request, or None when it may not take a semantic hit."""
    if endpoint != "chat":
        return None
    request = canonical_request(endpoint, body)
    if request.get("tools") or request.get("functions") or request.get("n", 1) != 1:
        return None
    messages = request["messages"]
    text = _question(messages[-1])
    if text is None or not text.strip() or len(text) > max_chars:
        return None
    last = dict(messages[-1])
    last["content"] = None
    request["messages"] = [*messages[:-1], last]
    prefix = None if scope.prefix_id is None else {"id": scope.prefix_id, "version": scope.prefix_version}
    document = {"endpoint": endpoint, "request": request, "scope": {"prefix": prefix, "tenant": scope.tenant},
                "tier": "semantic", "v": SPEC_VERSION}
    return SemanticQuery(scope=xxhash.xxh3_128_digest(msgpack.packb(document, use_bin_type=True)), text=text)
