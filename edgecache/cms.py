"""What a CMS webhook says changed, as tags and prefix updates (pure; no signature checks here).

Payloads:

- generic: ``{"tags": ["doc:42"], "prefixes": {"<id>": {"text": "...", "tags": [...]}}}``; a
  prefix given as ``null`` is deleted.
- Contentful (header ``X-Contentful-Topic: ContentManagement.Entry.publish``, ``…unpublish``,
  ``…delete``, also ``Asset.*``): ``doc:<sys.id>``.
- Sanity (a document projection with ``_id``; ``drafts.`` ids are ignored, they were never
  published): ``doc:<_id>``.
- Strapi (``{"event": "entry.publish"|"entry.unpublish"|"entry.update"|"entry.delete",
  "model": "article", "entry": {"id": 7, "documentId": "abc"}}``): ``doc:<documentId>``, or
  ``doc:<model>-<id>`` when the entry has no documentId (Strapi 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgecache.errors import BadRequest
from edgecache.tags import MAX_TAGS, validate_tag

__all__ = ["CmsChange", "parse_cms_payload"]


@dataclass(frozen=True, slots=True)
class CmsChange:
    source: str                                      # "generic" | "contentful" | "sanity" | "strapi"
    tags: frozenset[str]
    prefixes: Mapping[str, Mapping[str, Any] | None]   # id -> {"text", "tags"} or None (delete)


def _doc(value: object, what: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise BadRequest(f"The {what} payload has no document id")
    return validate_tag(f"doc:{value}")


def parse_cms_payload(body: object, headers: Mapping[str, str]) -> CmsChange:
    """Recognise the sender by its headers and shape; ``BadRequest`` on anything malformed."""
    if not isinstance(body, dict):
        raise BadRequest("The webhook body must be a JSON object")
    topic = headers.get("X-Contentful-Topic")
    if topic is not None:
        sys = body.get("sys")
        if not topic.startswith("ContentManagement.") or not isinstance(sys, dict):
            raise BadRequest("A Contentful webhook needs a ContentManagement topic and a 'sys' object")
        return CmsChange("contentful", frozenset({_doc(sys.get("id"), "Contentful")}), {})
    if "_id" in body:
        doc_id = body["_id"]
        if isinstance(doc_id, str) and doc_id.startswith("drafts."):
            return CmsChange("sanity", frozenset(), {})
        return CmsChange("sanity", frozenset({_doc(doc_id, "Sanity")}), {})
    if isinstance(body.get("event"), str) and body["event"].startswith("entry."):
        entry = body.get("entry")
        if not isinstance(entry, dict):
            raise BadRequest("A Strapi webhook needs an 'entry' object")
        if entry.get("documentId"):
            return CmsChange("strapi", frozenset({_doc(entry["documentId"], "Strapi")}), {})
        return CmsChange("strapi", frozenset({_doc(f"{body.get('model', 'entry')}-{entry.get('id', '')}",
                                                   "Strapi")}), {})
    return _generic(body)


def _generic(body: dict[str, Any]) -> CmsChange:
    unknown = set(body) - {"tags", "prefixes"}
    if unknown or not body:
        raise BadRequest("A generic webhook carries 'tags' and/or 'prefixes'" +
                         (f"; unknown field(s) {sorted(unknown)}" if unknown else ""))
    tags = body.get("tags", [])
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise BadRequest(f"'tags' must be a list of at most {MAX_TAGS} tags", param="tags")
    prefixes = body.get("prefixes", {})
    if not isinstance(prefixes, dict):
        raise BadRequest("'prefixes' must be an object of id -> {text, tags} or null", param="prefixes")
    for prefix_id, spec in prefixes.items():
        if spec is not None and not isinstance(spec, dict):
            raise BadRequest(f"prefix {prefix_id!r} must be {{text, tags}} or null", param="prefixes")
    return CmsChange("generic", frozenset(validate_tag(t) for t in tags), prefixes)
