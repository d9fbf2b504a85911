"""Purge tags: what a ``Cache-Tag`` request header may carry.

A tag names something an answer depends on (``doc:42``, ``prefix:<id>``, ``kb/faq@v3``) so
that a purge of the tag removes every answer carrying it. Tags are case-sensitive, made of
``A-Z a-z 0-9 . _ : / @ + -``, at most ``MAX_TAG_LEN`` characters, at most ``MAX_TAGS`` per
answer. The header lists them separated by commas (``Cache-Tag: doc:42, doc:43``); an absent
or blank header means no tags.
"""

from __future__ import annotations

import re

from edgecache.errors import BadRequest

__all__ = ["MAX_TAGS", "MAX_TAG_LEN", "format_cache_tag_header", "parse_cache_tag_header",
           "validate_tag"]

MAX_TAGS: int = 32
MAX_TAG_LEN: int = 128

_TAG = re.compile(r"[A-Za-z0-9._:/@+\-]+")
_CODE = "invalid_cache_tag"


def validate_tag(tag: str) -> str:
    """Return ``tag`` unchanged if it is a valid tag, else raise ``BadRequest``."""
    if not isinstance(tag, str) or not tag:
        raise BadRequest("A cache tag must be a non-empty string", param="Cache-Tag", code=_CODE)
    if len(tag) > MAX_TAG_LEN:
        raise BadRequest(f"Cache tag {tag[:40]!r}... is longer than {MAX_TAG_LEN} characters",
                         param="Cache-Tag", code=_CODE)
    if _TAG.fullmatch(tag) is None:
        raise BadRequest(f"Cache tag {tag!r} may only contain letters, digits and . _ : / @ + -",
                         param="Cache-Tag", code=_CODE)
    return tag


def parse_cache_tag_header(value: str) -> frozenset[str]:
    """``"doc:42, doc:43"`` -> ``{"doc:42", "doc:43"}``; blank -> no tags; ``BadRequest`` if invalid.

    Whitespace around each tag is ignored; an empty item (``"a,,b"``, a trailing comma), a bad
    tag or more than ``MAX_TAGS`` distinct tags is rejected rather than silently dropped, so a
    client never believes an answer is purgeable by a tag it does not carry.
    """
    if not value or value.isspace():
        return frozenset()
    if len(value) > MAX_TAGS * (MAX_TAG_LEN + 2) * 2:
        raise BadRequest(f"Cache-Tag header is too long ({len(value)} characters)",
                         param="Cache-Tag", code=_CODE)
    tags = frozenset(validate_tag(item.strip()) for item in value.split(","))
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"Cache-Tag lists {len(tags)} tags; at most {MAX_TAGS} are allowed",
                         param="Cache-Tag", code=_CODE)
    return tags


def format_cache_tag_header(tags: frozenset[str] | set[str]) -> str:
    """The header value for ``tags``, sorted so that equal sets give equal headers."""
    return ", ".join(sorted(tags))
