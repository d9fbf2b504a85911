"""Simulated answers and prompts are deterministic, and tokenise consistently."""

from __future__ import annotations

import pytest

from edgecache.errors import BadRequest
from origin.sim import tokenizer
from origin.sim.answer import answer_marker, make_answer
from origin.sim.protocol import parse_body, parse_chat, parse_completion

MODEL = "sim-llm"


def test_tokenizer_is_stable_and_drops_whitespace():
    assert tokenizer.pieces("Hello,  world!\n") == ["Hello", ",", "world", "!"]
    assert tokenizer.encode("a b", bos=False) == tokenizer.encode("a   b", bos=False)
    # fixed vector: ids must not change between runs, processes or machines
    assert tokenizer.token_id("hello") == 0x7B0077F9


def test_special_markers_are_single_tokens():
    assert tokenizer.pieces("<|im_start|>user\nhi") == ["<|im_start|>", "user", "hi"]


def test_encode_puts_one_bos_first():
    ids = tokenizer.encode("hi")
    assert ids[0] == tokenizer.token_id(tokenizer.BOS)
    assert tokenizer.encode(tokenizer.BOS + " hi") == ids


def test_shared_system_prompt_gives_a_shared_token_prefix():
    system = {"role": "system", "content": "You answer questions about the cache. " * 10}
    a = tokenizer.encode(tokenizer.render_chat([system, {"role": "user", "content": "one?"}]))
    b = tokenizer.encode(tokenizer.render_chat([system, {"role": "user", "content": "two?"}]))
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common > 60


def test_answer_is_deterministic_and_names_its_prompt():
    prompt = tokenizer.encode("what is an edge cache?")
    a = make_answer(MODEL, prompt, max_tokens=20, seed=1)
    assert a == make_answer(MODEL, prompt, max_tokens=20, seed=1)
    assert a.text.startswith(f"sim-answer {answer_marker(MODEL, prompt)} ")
    other = make_answer(MODEL, tokenizer.encode("what is an origin?"), max_tokens=20, seed=1)
    assert answer_marker(MODEL, prompt) not in other.text
    assert make_answer("other-model", prompt, max_tokens=20).text != a.text


def test_answer_has_exactly_max_tokens_tokens():
    prompt = tokenizer.encode("count")
    for n in (1, 2, 4, 5, 37):
        a = make_answer(MODEL, prompt, max_tokens=n)
        assert len(a.token_ids) == len(a.pieces) == n
        assert a.finish_reason == "length"


def test_answer_retokenises_to_the_generated_ids():
    a = make_answer(MODEL, tokenizer.encode("q"), max_tokens=64, seed=3)
    assert tuple(tokenizer.encode(a.text, bos=False)) == a.token_ids


def test_seed_temperature_and_index_change_the_words_not_the_marker():
    prompt = tokenizer.encode("q")
    base = make_answer(MODEL, prompt, max_tokens=30, seed=1, temperature=0.7)
    for other in (make_answer(MODEL, prompt, max_tokens=30, seed=2, temperature=0.7),
                  make_answer(MODEL, prompt, max_tokens=30, seed=1, temperature=0.8),
                  make_answer(MODEL, prompt, max_tokens=30, seed=1, temperature=0.7, index=1)):
        assert other.text != base.text
        assert other.text.split()[:2] == base.text.split()[:2]


def test_greedy_answers_ignore_seed_and_index():
    prompt = tokenizer.encode("q")
    a = make_answer(MODEL, prompt, max_tokens=30, seed=1, temperature=0.0)
    assert make_answer(MODEL, prompt, max_tokens=30, seed=9, temperature=0.0, index=3) == a


def test_stop_string_ends_the_text_before_it():
    prompt = tokenizer.encode("q")
    full = make_answer(MODEL, prompt, max_tokens=30)
    word = full.text.split()[5]
    start = full.text.index(" " + word)
    a = make_answer(MODEL, prompt, max_tokens=30, stop=["zzz-never", " " + word])
    assert a.finish_reason == "stop"
    assert a.text == full.text[:start]
    assert len(a.token_ids) == len(tokenizer.pieces(full.text[:start + len(word) + 1]))


def test_stop_string_not_in_the_text_changes_nothing():
    prompt = tokenizer.encode("q")
    assert make_answer(MODEL, prompt, max_tokens=9, stop=["zzz"]) == make_answer(
        MODEL, prompt, max_tokens=9)


def test_chat_body_parses_into_one_prompt_with_defaults():
    req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert req.kind == "chat"
    assert req.n == 1 and req.max_tokens is None and req.temperature == 1.0
    assert req.prompts[0].text.endswith("<|im_start|>assistant\n")


def test_text_parts_render_like_plain_content():
    plain = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "a b"}]})
    parts = parse_chat({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text",
                                                                      "text": "b"}]}]})
    assert parts.prompts == plain.prompts


def test_max_completion_tokens_wins_over_max_tokens():
    req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": 5, "max_completion_tokens": 7})
    assert req.max_tokens == 7


def test_completion_prompt_forms():
    assert len(parse_completion({"model": MODEL, "prompt": "a"}).prompts) == 1
    assert len(parse_completion({"model": MODEL, "prompt": ["a", "b"]}).prompts) == 2
    req = parse_completion({"model": MODEL, "prompt": [1, 2, 3]})
    assert req.prompts[0].tokens == (1, 2, 3)
    assert len(parse_completion({"model": MODEL, "prompt": [[1], [2]]}).prompts) == 2


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}]},
    {"model": MODEL},
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
     "stream_options": {"include_usage": True}},
])
def test_malformed_chat_bodies_are_bad_requests(body):
    with pytest.raises(BadRequest):
        parse_chat(body)


@pytest.mark.parametrize("prompt", [None, [], [[]], [1, "a"], [-1], {"a": 1}])
def test_malformed_prompts_are_bad_requests(prompt):
    with pytest.raises(BadRequest):
        parse_completion({"model": MODEL, "prompt": prompt})


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_a_bad_request(raw):
    with pytest.raises(BadRequest):
        parse_body(raw)
