"""The guards refuse semantic hits between questions that differ in what matters, and only then."""

from __future__ import annotations

import pytest

from edgecache.guards import ALL_GUARDS, DEFAULT_GUARDS, facts, refusal


@pytest.mark.parametrize(("a", "b"), [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "what is the capital of france"),
    ("Why can't I sleep at night?", "Why can I not sleep at night?"),          # negated both ways
    ('What does "carpe diem" mean?', "What does carpe diem mean?"),           # quote absent, words present
    ("How do I get 1,000 followers?", "How can I get 1000 followers?"),       # the same number
    ("Is 2.50 more than 2.5?", "Is 2.5 more than 2.50?"),
    ("Email bob@example.com about order ORD-1234", "Write to bob@example.com about ORD-1234"),
])
def test_paraphrases_are_not_refused(a: str, b: str) -> None:
    assert refusal(a, b) is None


@pytest.mark.parametrize(("a", "b", "reason"), [
    ("What is the balance of account 1234?", "What is the balance of account 5678?", "numbers"),
    ("How do I lose 10 pounds in a month?", "How do I lose weight in a month?", "numbers"),
    ("Show my last 5 orders", "Show my last 50 orders", "numbers"),
    ('What does "carpe diem" mean?', 'What does "memento mori" mean?', "quoted"),
    ("Why is Spotify available in India?", "Why is Spotify not available in India?", "negation"),
    ("Which phones support 5G?", "Which phones don't support 5G?", "negation"),
    ("How do I cook rice with a rice cooker?", "How do I cook rice without a rice cooker?", "negation"),
    ("Why did my email to bob@example.com bounce?", "Why did my email to alice@example.com bounce?",
     "identifier"),
    ("What is new in https://example.com/docs?", "What is new in https://example.org/docs?", "identifier"),
    ("What changed in release v2.3.1?", "What changed in release v2.4.0?", "numbers"),
])
def test_questions_differing_in_what_matters_are_refused(a: str, b: str, reason: str) -> None:
    assert refusal(a, b) == reason
    assert refusal(b, a) == reason


def test_account_numbers_differ_so_no_hit() -> None:
    assert refusal("Balance of account 1234", "Balance of account 5678") == "numbers"


def test_identifier_guard_refuses_different_codes_without_digits_in_common() -> None:
    assert refusal("Status of ticket ABC-12?", "Status of ticket ABC-12?") is None
    assert refusal("Is @alice online?", "Is @bob online?", ["identifier"]) == "identifier"
    assert refusal("Notes on #python", "Notes on #rust", ["identifier"]) == "identifier"


def test_entity_guard_is_opt_in_and_refuses_a_name_in_one_question_only() -> None:
    assert "entity" not in DEFAULT_GUARDS
    assert refusal("Who is Donald Trump?", "Who is Hillary Clinton?") is None
    assert refusal("Who is Donald Trump?", "Who is Hillary Clinton?", ["entity"]) == "entity"
    assert refusal("Who is Donald Trump?", "Who's Donald Trump?", ["entity"]) is None
    assert refusal("What is life like in NYC?", "What is life like in LA?", ["entity"]) == "entity"


def test_guards_run_in_the_order_given_and_report_the_first() -> None:
    a, b = "Why is account 12 not blocked?", "Why is account 13 blocked?"
    assert refusal(a, b, ["negation", "numbers"]) == "negation"
    assert refusal(a, b, ["numbers", "negation"]) == "numbers"
    assert refusal(a, b, []) is None


def test_facts_are_computed_once_per_text_and_accepted_in_place_of_text() -> None:
    f = facts("How many 9s are in 99,999?")
    assert facts("How many 9s are in 99,999?") is f
    assert f.numbers == {"9", "99999"}
    assert refusal(f, "How many 9s are in 99999?") is None


def test_every_default_guard_is_known() -> None:
    assert set(DEFAULT_GUARDS) <= set(ALL_GUARDS)


@pytest.mark.parametrize(("a", "b"), [
    ("What does 多少 mean?", "What does 几 mean?"),                      # the word checks see only Latin
    ("What is the difference between C and C++?", "What is the difference between C++ and C#?"),
    ("What is the name of the ~ symbol?", "What is the name of the \u2722 symbol?"),
    ("What does \u211d\u00b2 mean?", "What does \u5475\u5475 mean?"),
])
def test_symbols_guard_refuses_questions_whose_other_scripts_or_symbols_differ(a: str, b: str) -> None:
    assert refusal(a, b) == "symbols"


@pytest.mark.parametrize(("a", "b"), [
    ("Which books for the examinat\u00edon?", "Which books for the examination?"),   # accented Latin
    ("Why was the \u20b9500 note banned?", "Why was the Rs 500 note banned?"),            # currency sign
    ("What is 多少 in English?", "What does 多少 mean in English?"),
    ("Is C++ hard to learn?", "Is c++ difficult to learn?"),
])
def test_symbols_guard_lets_equal_or_latin_variants_through(a: str, b: str) -> None:
    assert refusal(a, b, ["symbols"]) is None
