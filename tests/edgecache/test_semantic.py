"""The semantic scope: everything but the last question's wording."""

from __future__ import annotations

import pytest

from edgecache.keys import Scope
from edgecache.semantic import semantic_query

T = Scope("tenant-a")
BASE = {"model": "sim-llm", "temperature": 0,
        "messages": [{"role": "system", "content": "You are a support bot."},
                     {"role": "user", "content": "How do I reset my password?"}]}


def ask(text: str, **changes: object) -> dict:
    body = {**BASE, **changes}
    body["messages"] = [*body["messages"][:-1], {"role": "user", "content": text}]
    return body


def test_paraphrases_share_a_scope_and_keep_their_wording() -> None:
    a = semantic_query("chat", ask("How do I reset my password?"), T)
    b = semantic_query("chat", ask("How can I reset my password?", stream=True), T)
    assert a is not None and b is not None
    assert a.scope == b.scope and len(a.scope) == 16
    assert (a.text, b.text) == ("How do I reset my password?", "How can I reset my password?")


@pytest.mark.parametrize(("body", "scope"), [
    (ask("q", model="other-model"), T),
    (ask("q", temperature=0.7), T),
    (ask("q", max_tokens=5), T),
    (ask("q"), Scope("tenant-b")),
    (ask("q"), Scope("tenant-a", "kb", "v2")),
    ({**BASE, "messages": [{"role": "system", "content": "You are a sales bot."}, {"role": "user", "content": "q"}]}, T),
    ({**BASE, "messages": [*BASE["messages"], {"role": "assistant", "content": "Go to settings."},
                           {"role": "user", "content": "q"}]}, T),
])
def test_any_other_difference_is_another_scope(body: dict, scope: Scope) -> None:
    base = semantic_query("chat", ask("q"), T)
    other = semantic_query("chat", body, scope)
    assert base is not None and other is not None and base.scope != other.scope


@pytest.mark.parametrize("body", [
    ask("q", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ask("q", n=2),
    {**BASE, "messages": [*BASE["messages"], {"role": "assistant", "content": "hi"}]},
    ask("x" * 501),
    ask("   "),
    {**BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
])
def test_requests_that_may_not_take_semantic_hits(body: dict) -> None:
    assert semantic_query("chat", body, T) is None


def test_completions_never_take_semantic_hits() -> None:
    assert semantic_query("completions", {"model": "m", "prompt": "How do I reset my password?"}, T) is None


def test_text_parts_are_joined() -> None:
    body = {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "How do I"},
                                                               {"type": "text", "text": "reset it?"}]}]}
    query = semantic_query("chat", body, T)
    assert query is not None and query.text == "How do I\nreset it?"
