"""Structured logs: a JSON formatter for the stdlib ``logging``, and the request in context.

A service sets ``CURRENT`` (a ``ContextVar``) to the request's ``Span`` while answering it; every record
logged meanwhile, in that task or in tasks it starts, carries the request's ``request_id``,
``trace_id`` and ``span_id``. ``ContextFilter`` stamps them on the record when it is made
(so a handler that formats later still has them); ``JsonFormatter`` writes one JSON object
per line:

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "edgecache.access",
     "service": "edge", "region": "us-east", "msg": "...", "request_id": "...",
     "trace_id": "...", "span_id": "...", ...the record's ``fields``...}

Access-log lines pass their fields as ``extra={"fields": {...}}`` (``ACCESS_LOGGER``, INFO).
Nothing here knows an API key, a prompt or an answer: callers pass only what may be logged.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from edgecache.trace import Span

__all__ = [
    "ACCESS_LOGGER",
    "CURRENT",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "access_message",
]

ACCESS_LOGGER = "edgecache.access"
"""The logger of the one-line-per-request access log (level INFO)."""

CURRENT: ContextVar[Span | None] = ContextVar("edgecache_request", default=None)
"""The span of the request being answered (its ids go on every record)."""

_CONTEXT_FIELDS = ("request_id", "trace_id", "span_id")


class ContextFilter(logging.Filter):
    """Stamps the current request's ids on each record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = CURRENT.get()
        if ctx is not None and getattr(record, "request_id", None) is None:
            record.request_id = ctx.request_id
            record.trace_id = ctx.trace_id
            record.span_id = ctx.span_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``service`` and ``region`` name the process."""

    def __init__(self, service: str, region: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.region = region

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
        }
        if self.region is not None:
            out["region"] = self.region
        out["msg"] = record.getMessage()
        ctx = CURRENT.get()
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None and ctx is not None:
                value = getattr(ctx, name)
            if value is not None:
                out[name] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The human format (``ts logger LEVEL message``), with ``[request_id]`` inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            ctx = CURRENT.get()
            rid = ctx.request_id if ctx is not None else None
        return line if rid is None or record.name == ACCESS_LOGGER else f"{line} [{rid}]"


def access_message(fields: dict[str, Any]) -> str:
    """The human line of an access-log record (the JSON line carries every field).

    Always one line: a value's control, separator and other non-printable characters, and its
    backslashes, are written as Python escapes (a path's ``%0A`` decodes to a newline).
    """
    e = _escaped
    return (f'{e(fields.get("method"))} {e(fields.get("path"))} {e(fields.get("status"))} '
            f'{e(fields.get("cache") or "-")} {e(fields.get("duration_ms"))}ms '
            f'request_id={e(fields.get("request_id"))} trace_id={e(fields.get("trace_id"))}')


def _escaped(value: object) -> str:
    """``value`` as text on one line, unambiguously: ``\\n`` in the output was a newline."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(ch if ch.isprintable() and ch != "\\" else ascii(ch)[1:-1] for ch in text)
