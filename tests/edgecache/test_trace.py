"""W3C Trace Context parsing and propagation, and request ids (edgecache/trace.py)."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecache.trace import (
    MAX_REQUEST_ID,
    MAX_TRACESTATE,
    Span,
    new_request_id,
    parse_traceparent,
    request_id,
    start_span,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

hex_ids = st.integers(1, 2**128 - 1).map(lambda n: f"{n:032x}")
span_ids = st.integers(1, 2**64 - 1).map(lambda n: f"{n:016x}")
flags = st.integers(0, 255)


def test_the_spec_example_parses() -> None:
    assert parse_traceparent(VALID) == (TRACE, PARENT, 1)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, 0)


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    f"00-{TRACE.upper()}-{PARENT}-01",                    # uppercase hex
    f"00-{TRACE}-{PARENT.upper()}-01",
    f"00-{TRACE}-{PARENT}-0A",
    f"00-{'0' * 32}-{PARENT}-01",                          # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",                           # all-zero parent id
    f"ff-{TRACE}-{PARENT}-01",                             # version ff is invalid
    f"0g-{TRACE}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-01-extra",                       # version 00 is exactly 55 characters
    f"00-{TRACE}-{PARENT}-01x",
    f"00-{TRACE[:-1]}-{PARENT}-01",                        # short trace id
    f"00-{TRACE}-{PARENT[:-1]}-01",
    f"00-{TRACE}-{PARENT}-1",
    f"00_{TRACE}_{PARENT}_01",
    f"00-{TRACE[:-1]}z-{PARENT}-01",
    f"cc-{TRACE}-{PARENT}-01x",                            # a later version: a "-" after the flags
])
def test_invalid_traceparents_are_rejected(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_parsed_by_its_first_fields() -> None:
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01") == (TRACE, PARENT, 1)
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-holds") == (TRACE, PARENT, 1)
    span = start_span(f"cc-{TRACE}-{PARENT}-01-future")
    assert span.traceparent.startswith(f"00-{TRACE}-")   # forwarded as version 00


@given(hex_ids, span_ids, flags)
def test_any_valid_header_round_trips(trace_id: str, parent_id: str, flag: int) -> None:
    assert parse_traceparent(f"00-{trace_id}-{parent_id}-{flag:02x}") == (trace_id, parent_id, flag)


@given(st.text(max_size=80))
def test_parsing_never_raises_and_accepts_only_lowercase_hex(value: str) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, parent_id, _ = parsed
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        assert re.fullmatch(r"[0-9a-f]{16}", parent_id) and parent_id != "0" * 16


@given(hex_ids, span_ids, flags)
def test_a_hop_keeps_the_trace_and_makes_its_own_span(trace_id: str, parent_id: str, flag: int) -> None:
    span = start_span(f"00-{trace_id}-{parent_id}-{flag:02x}", "vendor=abc")
    assert span.trace_id == trace_id
    assert span.parent_id == parent_id
    assert TRACEPARENT.match(span.traceparent)
    assert span.traceparent.split("-")[2] == span.span_id
    assert span.flags == flag & 0x03   # only the flags the spec defines are passed on
    assert span.state == "vendor=abc"


def test_the_next_hop_sees_this_hop_as_its_parent() -> None:
    edge = start_span(VALID)
    origin = start_span(edge.traceparent)
    assert origin.trace_id == edge.trace_id == TRACE
    assert origin.parent_id == edge.span_id != PARENT
    assert origin.span_id != edge.span_id


@pytest.mark.parametrize("value", [None, "", "junk", f"ff-{TRACE}-{PARENT}-01"])
def test_without_a_valid_traceparent_a_new_sampled_trace_starts(value: str | None) -> None:
    span = start_span(value, "vendor=abc")
    assert span.parent_id is None
    assert span.state == ""     # tracestate is dropped with an invalid traceparent
    assert span.sampled
    assert TRACEPARENT.match(span.traceparent)
    assert span.trace_id != "0" * 32 and span.span_id != "0" * 16


def test_new_ids_are_never_all_zero() -> None:
    # one draw per span: span id (64 bits), then trace id (128), then request id (128)
    draws = iter([0, 5 << 128, 7 << 256, (7 << 256) | (5 << 128) | 9])
    span = start_span(None, rand=lambda bits: next(draws))
    trace_id, span_id = f"{5:032x}", f"{7:016x}"
    assert span == Span(trace_id, span_id, f"00-{trace_id}-{span_id}-01", f"{9:032x}")


def test_one_draw_makes_every_id() -> None:
    calls: list[int] = []

    def rand(bits: int) -> int:
        calls.append(bits)
        return random.getrandbits(bits)

    start_span(None, rand=rand)
    start_span(VALID, None, "given", rand=rand)
    assert calls == [64 + 128 + 128, 64]


def test_new_traces_and_request_ids_differ() -> None:
    spans = [start_span(None) for _ in range(100)]
    assert len({s.trace_id for s in spans}) == len({s.request_id for s in spans}) == 100
    assert all(s.request_id != s.trace_id and re.fullmatch(r"[0-9a-f]{32}", s.request_id) for s in spans)


def test_the_span_keeps_a_sane_request_id_and_replaces_an_insane_one() -> None:
    assert start_span(VALID, None, "client-1").request_id == "client-1"
    assert re.fullmatch(r"[0-9a-f]{32}", start_span(VALID, None, "no spaces please").request_id)


@pytest.mark.parametrize("state", ["x" * (MAX_TRACESTATE + 1), "a=1\nb=2", "a=\u00e9"])
def test_an_oversized_or_unprintable_tracestate_is_dropped(state: str) -> None:
    assert start_span(VALID, state).state == ""


def test_a_sane_request_id_is_kept() -> None:
    for rid in ("abc", "req-1", "0b1e-4f.x:y@z/+=", "A" * MAX_REQUEST_ID):
        assert request_id(rid) == rid


@pytest.mark.parametrize("rid", [None, "", "a b", "a\nb", "x" * (MAX_REQUEST_ID + 1), "é", '"quoted"', "a;b"])
def test_an_insane_request_id_is_replaced(rid: str | None) -> None:
    new = request_id(rid)
    assert new != rid and re.fullmatch(r"[0-9a-f]{32}", new)


def test_generated_request_ids_are_128_random_bits() -> None:
    rng = random.Random(7)
    assert new_request_id(rng.getrandbits) == f"{random.Random(7).getrandbits(128):032x}"
    assert len({new_request_id() for _ in range(100)}) == 100
