"""Static prompt prefixes: validation, versions, and expansion into a request.

A prefix is large static text (a policy, a catalogue, a long system prompt) registered once
at the origin under an id. Its version is a hash of its text, so an update is a new version
and every cache key that used the old text stops matching. A chat request references one
with a top-level ``"prefix": "<id>"``; expanding it puts the text first, as a system message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from edgecache.errors import BadRequest, UnknownPrefix
from edgecache.tags import validate_tag

__all__ = [
    "MAX_PREFIX_TAGS",
    "Prefix",
    "expand",
    "make_prefix",
    "prefix_reference",
    "prefix_tag",
    "prefix_version",
    "route_text",
    "validate_prefix_id",
]

MAX_PREFIX_TAGS = 32
MAX_PREFIX_TENANTS = 1000
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class Prefix:
    id: str
    text: str
    version: str                 # 32 hex digits: XXH3-128 of the UTF-8 text
    tags: frozenset[str] = frozenset()
    updated: float = 0.0         # epoch seconds of the last change
    tenants: frozenset[str] = frozenset()   # who may reference it (empty: every tenant)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "tags": sorted(self.tags),
                "bytes": len(self.text.encode()), "updated": self.updated, "tenants": sorted(self.tenants)}

    def allows(self, tenant: str | None) -> bool:
        """Whether ``tenant`` may reference this prefix (every tenant when ``tenants`` is empty)."""
        return not self.tenants or tenant in self.tenants


def prefix_version(text: str) -> str:
    """The version of a prefix text: XXH3-128 of its UTF-8 bytes, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def prefix_tag(prefix_id: str) -> str:
    """The tag every entry built on a prefix carries, so a purge can find them all."""
    return f"prefix:{prefix_id}"


def validate_prefix_id(value: object, *, param: str = "id") -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadRequest(f"A prefix id is 1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit; "
                         f"got {value!r}", param=param)
    return value


def make_prefix(body: object, *, max_bytes: int, now: float) -> Prefix:
    """Validate an admin ``{"id", "text", "tags"}`` body into a ``Prefix``."""
    if not isinstance(body, Mapping):
        raise BadRequest("The body must be a JSON object with 'id' and 'text'")
    unknown = set(body) - {"id", "text", "tags", "tenants"}
    if unknown:
        raise BadRequest(f"Unknown field(s) {sorted(unknown)}; expected 'id', 'text', 'tags' and 'tenants'",
                         param=min(unknown))
    prefix_id = validate_prefix_id(body.get("id"))
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise BadRequest("'text' must be a non-empty string", param="text")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise BadRequest(f"'text' is {size} bytes; a prefix holds at most {max_bytes}", param="text",
                         code="prefix_too_large")
    raw_tags = body.get("tags", [])
    if not isinstance(raw_tags, list) or len(raw_tags) > MAX_PREFIX_TAGS:
        raise BadRequest(f"'tags' must be a list of at most {MAX_PREFIX_TAGS} tags", param="tags")
    tags = frozenset(validate_tag(t) for t in raw_tags)
    raw_tenants = body.get("tenants", [])
    if not isinstance(raw_tenants, list) or len(raw_tenants) > MAX_PREFIX_TENANTS or not all(
            isinstance(t, str) and 0 < len(t) <= 200 and t.isprintable() and " " not in t for t in raw_tenants):
        raise BadRequest(f"'tenants' must be a list of at most {MAX_PREFIX_TENANTS} tenant names (1-200 printable "
                         "characters, no spaces)", param="tenants")
    return Prefix(id=prefix_id, text=text, version=prefix_version(text), tags=tags, updated=now,
                  tenants=frozenset(raw_tenants))


def prefix_reference(body: Mapping[str, Any], endpoint: str) -> str | None:
    """The prefix id a request references, or None; a bad reference is a ``BadRequest``."""
    ref = body.get("prefix")
    if ref is None:
        return None
    if endpoint != "chat":
        raise BadRequest("'prefix' is supported on /v1/chat/completions only", param="prefix")
    return validate_prefix_id(ref, param="prefix")


def expand(body: Mapping[str, Any], prefixes: Mapping[str, Prefix], *, tenant: str | None,
           version: str | None = None) -> dict[str, Any]:
    """The request as the backend must see it: the prefix text as the first system message.

    A prefix that does not allow ``tenant`` (``Prefix.tenants``) is an ``UnknownPrefix``, the
    same answer as for an id that does not exist: another tenant's prefix stays unseen.
    ``version``: the version the edge keyed the request with; a different current version is
    an ``UnknownPrefix`` naming both, so the edge refreshes its replica instead of caching an
    answer built on other text under the old key.
    """
    prefix_id = prefix_reference(body, "chat")
    out = {k: v for k, v in body.items() if k != "prefix"}
    if prefix_id is None:
        return out
    prefix = prefixes.get(prefix_id)
    if prefix is None or not prefix.allows(tenant):
        raise UnknownPrefix(f"Unknown prefix {prefix_id!r}", param="prefix")
    if version is not None and version != prefix.version:
        raise UnknownPrefix(f"Prefix {prefix_id!r} is at version {prefix.version}, not {version}",
                            param="prefix", code="prefix_version_mismatch")
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array", param="messages")
    out["messages"] = [{"role": "system", "content": prefix.text}, *messages]
    return out


def route_text(body: Mapping[str, Any]) -> str:
    """The prompt a backend will see, as text to route on: message contents in order, or the prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: Iterable[object] = (m.get("content") for m in messages if isinstance(m, Mapping))
        return "\n".join(p if isinstance(p, str) else str(p) for p in parts if p is not None)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""
