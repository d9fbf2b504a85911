"""The approximate radix tree: exact longest-prefix matches within capacity, a hard bound beyond."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecache.radix import RadixTree, common_prefix_length

# A small alphabet makes long shared prefixes (and so splits) common.
texts = st.text(alphabet="abc", max_size=24)
token_seqs = st.lists(st.integers(0, 3), max_size=24).map(tuple)


def true_longest_prefix(query, inserted) -> int:
    return max((common_prefix_length(query, s) for s in inserted), default=0)


def naive_common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(st.text(alphabet="ab", max_size=40), st.text(alphabet="ab", max_size=40))
def test_common_prefix_length_agrees_with_a_plain_loop(a: str, b: str) -> None:
    assert common_prefix_length(a, b) == naive_common_prefix(a, b)
    assert common_prefix_length(tuple(a), tuple(b)) == naive_common_prefix(a, b)


@given(st.lists(texts, max_size=30), st.lists(texts, max_size=10))
def test_match_is_the_longest_common_prefix_with_any_inserted_text_within_capacity(inserted, queries) -> None:
    tree = RadixTree(capacity=10_000)
    for s in inserted:
        tree.insert(s)
    for q in [*queries, *inserted]:
        assert tree.match(q) == true_longest_prefix(q, inserted)


@given(st.lists(token_seqs, max_size=30), st.lists(token_seqs, max_size=10))
def test_token_sequences_match_like_text(inserted, queries) -> None:
    tree = RadixTree(capacity=10_000)
    for s in inserted:
        tree.insert(s)
    for q in queries:
        assert tree.match(q) == true_longest_prefix(q, inserted)


@given(st.lists(texts, max_size=30), texts)
def test_insert_returns_the_match_it_found_before_recording(inserted, last) -> None:
    tree = RadixTree(capacity=10_000)
    for s in inserted:
        tree.insert(s)
    expected = tree.match(last)
    assert tree.insert(last) == expected
    assert tree.match(last) == len(last)


@settings(max_examples=300)
@given(st.integers(1, 40), st.lists(texts, min_size=1, max_size=40), st.lists(texts, max_size=10))
def test_eviction_keeps_the_bound_and_never_invents_a_match(capacity, inserted, queries) -> None:
    tree = RadixTree(capacity=capacity)
    for s in inserted:
        tree.insert(s)
        assert tree.size <= capacity
        assert tree.nodes <= tree.size
        # the most recent insert survives, up to the bound
        assert tree.match(s) == min(len(s), capacity)
    for q in [*queries, *inserted]:
        assert tree.match(q) <= true_longest_prefix(q, inserted)


def test_least_recently_inserted_prefix_is_evicted_first() -> None:
    tree = RadixTree(capacity=12)
    tree.insert("aaaa")
    tree.insert("bbbb")
    tree.insert("aaaa")          # "a…" is now more recent than "b…"
    tree.insert("cccc")
    tree.insert("dddd")          # 16 > 12: the oldest, "bbbb", goes
    assert tree.match("bbbb") == 0
    assert tree.match("aaaa") == 4
    assert tree.match("dddd") == 4
    assert tree.size == 12


def test_eviction_trims_the_tail_of_the_oldest_prompt_before_its_shared_head() -> None:
    tree = RadixTree(capacity=10)
    tree.insert("system:q1")     # 9
    tree.insert("system:q2")     # shares "system:q", adds 1
    tree.insert("zz")            # 12 > 10: the oldest leaf ("1") goes, then "2" is trimmed to fit
    assert tree.size == 10
    assert tree.match("system:q9") == len("system:q")
    assert tree.match("zz") == 2


def test_a_sequence_longer_than_capacity_keeps_its_head() -> None:
    tree = RadixTree(capacity=5)
    tree.insert("abcdefgh")
    assert tree.size == 5
    assert tree.match("abcdefgh") == 5


def test_clear_forgets_everything() -> None:
    tree = RadixTree(capacity=100)
    tree.insert("hello world")
    tree.clear()
    assert tree.match("hello world") == 0
    assert tree.size == 0 and tree.nodes == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RadixTree(capacity=0)
