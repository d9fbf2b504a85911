from __future__ import annotations

import pytest

from edgecache.errors import BadRequest
from edgecache.tags import (
    MAX_TAG_LEN,
    MAX_TAGS,
    format_cache_tag_header,
    parse_cache_tag_header,
    validate_tag,
)


def test_header_lists_tags_separated_by_commas() -> None:
    assert parse_cache_tag_header("doc:42, doc:43") == {"doc:42", "doc:43"}


def test_whitespace_around_tags_is_ignored_and_duplicates_collapse() -> None:
    assert parse_cache_tag_header("  doc:1 ,doc:1,\tprefix:kb-7 ") == {"doc:1", "prefix:kb-7"}


@pytest.mark.parametrize("value", ["", "   "])
def test_absent_or_blank_header_means_no_tags(value: str) -> None:
    assert parse_cache_tag_header(value) == frozenset()


def test_every_allowed_character_is_accepted() -> None:
    tag = "AZaz09._:/@+-"
    assert parse_cache_tag_header(tag) == {tag}


@pytest.mark.parametrize("value", ["doc 42", "doc;42", "doc,,42", "doc:1,", ",doc:1", "é", "doc*",
                                   "a\nb", "x" * (MAX_TAG_LEN + 1)])
def test_invalid_header_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_cache_tag_header(value)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_cache_tag"


def test_at_most_max_tags_distinct_tags() -> None:
    assert len(parse_cache_tag_header(",".join(f"t{i}" for i in range(MAX_TAGS)))) == MAX_TAGS
    with pytest.raises(BadRequest, match="at most"):
        parse_cache_tag_header(",".join(f"t{i}" for i in range(MAX_TAGS + 1)))


def test_longest_allowed_tag_is_accepted() -> None:
    assert validate_tag("x" * MAX_TAG_LEN) == "x" * MAX_TAG_LEN


@pytest.mark.parametrize("tag", ["", "a b", "x" * (MAX_TAG_LEN + 1), "doc:1\n"])
def test_validate_tag_rejects_invalid_tags(tag: str) -> None:
    with pytest.raises(BadRequest):
        validate_tag(tag)


def test_formatted_header_parses_back_to_the_same_tags() -> None:
    tags = frozenset({"doc:2", "doc:1", "prefix:kb"})
    assert format_cache_tag_header(tags) == "doc:1, doc:2, prefix:kb"
    assert parse_cache_tag_header(format_cache_tag_header(tags)) == tags
