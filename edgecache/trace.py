"""W3C Trace Context (https://www.w3.org/TR/trace-context/) and request ids, as pure functions.

Every hop (edge, origin) takes the ``traceparent`` it was sent, or starts a trace when there
is none or it is invalid, and makes a span of its own: the same trace id, a new span id, and
the flags it was given. It forwards ``traceparent`` with its own span id as the parent id,
and ``tracestate`` unchanged (dropped with an invalid ``traceparent``, as the spec says).

    version "-" trace-id "-" parent-id "-" trace-flags      00-<32 hex>-<16 hex>-<2 hex>

Rules kept here: lowercase hex only; an all-zero trace id or parent id is invalid; version
``ff`` is invalid; version 00 is exactly 55 characters; a later version is parsed by its
first four fields (and must be followed by ``-`` when longer) and forwarded as version 00.
Only the flags the spec defines (sampled 0x01, random 0x02) are passed on.

Ids come from ``random.getrandbits`` (the way OpenTelemetry makes them): fast, and seeded
from the OS per process. They identify, they do not authenticate. ``start_span`` runs on
every request, hits included, so it draws every id it needs at once and compiles its checks.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "MAX_REQUEST_ID",
    "MAX_TRACESTATE",
    "Span",
    "new_request_id",
    "parse_traceparent",
    "request_id",
    "start_span",
]

Rand = Callable[[int], int]

MAX_REQUEST_ID = 128
"""Longest ``X-Request-Id`` kept from a client; a longer one is replaced."""
MAX_TRACESTATE = 512
"""Longest ``tracestate`` passed on (the spec lets a vendor drop what it cannot carry)."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_REQUEST_ID = re.compile(rf"[A-Za-z0-9\-_.:@/+=]{{1,{MAX_REQUEST_ID}}}")
_TRACESTATE = re.compile(rf"[ -~]{{0,{MAX_TRACESTATE}}}")   # printable ASCII
_KNOWN_FLAGS = 0x03                # sampled, random
_NEW_FLAGS = 0x01                  # a trace we start is sampled: parent-based samplers downstream record it
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class Span(NamedTuple):
    """One hop's span of one request, and the ids its log lines carry.

    ``span_id`` is this hop's; ``parent_id`` the caller's (None: this hop started the
    trace); ``traceparent`` the header to send on (our span as the parent) and to answer
    with; ``state`` the ``tracestate`` passed on ("" for none). A NamedTuple rather than a
    frozen dataclass: one is built per request on the hit path, and a frozen dataclass's
    ``__init__`` costs four times as much.
    """

    trace_id: str
    span_id: str
    traceparent: str
    request_id: str
    flags: int = _NEW_FLAGS
    parent_id: str | None = None
    state: str = ""

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)

    def response_headers(self) -> dict[str, str]:
        """What every hop answers with: its span and the request id."""
        return {"traceparent": self.traceparent, "X-Request-Id": self.request_id}


def parse_traceparent(value: str | None) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid header, None otherwise."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def start_span(traceparent: str | None, tracestate: str | None = None, request_id: str | None = None,
               *, rand: Rand = random.getrandbits) -> Span:
    """This hop's span: a child of a valid ``traceparent``, else the root of a new trace;
    the caller's ``X-Request-Id`` when it is sane, else a new one (see ``request_id``)."""
    parsed = parse_traceparent(traceparent)
    rid = request_id if request_id and _REQUEST_ID.fullmatch(request_id) else None
    bits = 64 + (128 if parsed is None else 0) + (128 if rid is None else 0)
    while True:   # one draw for every id needed; an all-zero id (p = 2**-64) is drawn again
        ids = f"{rand(bits):0{bits // 4}x}"
        span_id = ids[:16]
        if span_id == _ZERO_SPAN or (parsed is None and ids[16:48] == _ZERO_TRACE):
            continue
        break
    if rid is None:
        rid = ids[-32:]
    if parsed is None:
        trace_id = ids[16:48]
        return Span(trace_id, span_id, f"00-{trace_id}-{span_id}-01", rid)
    trace_id, parent_id, flags = parsed
    flags &= _KNOWN_FLAGS
    state = tracestate.strip(" \t") if tracestate else ""
    if state and not _TRACESTATE.fullmatch(state):
        state = ""
    return Span(trace_id, span_id, f"00-{trace_id}-{span_id}-{flags:02x}", rid, flags, parent_id, state)


def new_request_id(rand: Rand = random.getrandbits) -> str:
    """32 lowercase hex characters (128 random bits)."""
    return f"{rand(128):032x}"


def request_id(value: str | None, *, rand: Rand = random.getrandbits) -> str:
    """The caller's ``X-Request-Id`` when it is sane (1..128 characters of ``A-Z a-z 0-9 - _ .
    : @ / + =``), else a new one: safe to log and to pass on as a header."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return new_request_id(rand)
