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
from the OS per process. They identify, they do not authenticate.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_REQUEST_ID",
    "MAX_TRACESTATE",
    "TraceContext",
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

_HEX = frozenset("0123456789abcdef")
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@/+=")
_KNOWN_FLAGS = 0x03                # sampled, random
_NEW_FLAGS = 0x01                  # a trace we start is sampled: parent-based samplers downstream record it
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One hop's span. ``span_id`` is this hop's; ``parent_id`` the caller's (None: we started
    the trace). ``state`` is the ``tracestate`` passed on ("" for none)."""

    trace_id: str
    span_id: str
    flags: int = _NEW_FLAGS
    parent_id: str | None = None
    state: str = ""

    @property
    def traceparent(self) -> str:
        """The header to send to the next hop (and back to the client): our span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 0x01)


def _is_hex(s: str) -> bool:
    return all(c in _HEX for c in s)


def parse_traceparent(value: str | None) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid header, None otherwise."""
    if not value:
        return None
    value = value.strip(" \t")
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if not _is_hex(version) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id) and _is_hex(parent_id) and _is_hex(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def _valid_tracestate(value: str) -> bool:
    return len(value) <= MAX_TRACESTATE and all(" " <= c <= "~" for c in value)


def _span_id(rand: Rand) -> str:
    while True:
        n = rand(64)
        if n:
            return f"{n:016x}"


def _trace_id(rand: Rand) -> str:
    while True:
        n = rand(128)
        if n:
            return f"{n:032x}"


def start_span(traceparent: str | None, tracestate: str | None = None, *,
               rand: Rand = random.getrandbits) -> TraceContext:
    """This hop's span: a child of a valid ``traceparent``, else the root of a new trace."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return TraceContext(_trace_id(rand), _span_id(rand))
    trace_id, parent_id, flags = parsed
    state = tracestate.strip(" \t") if tracestate else ""
    return TraceContext(trace_id, _span_id(rand), flags & _KNOWN_FLAGS, parent_id,
                        state if _valid_tracestate(state) else "")


def new_request_id(rand: Rand = random.getrandbits) -> str:
    """32 lowercase hex characters (128 random bits)."""
    return f"{rand(128):032x}"


def request_id(value: str | None, *, rand: Rand = random.getrandbits) -> str:
    """The caller's ``X-Request-Id`` when it is sane (1..128 characters of ``A-Z a-z 0-9 - _ .
    : @ / + =``), else a new one: safe to log and to pass on as a header."""
    if value and len(value) <= MAX_REQUEST_ID and all(c in _ID_CHARS for c in value):
        return value
    return new_request_id(rand)
