"""Structured logs (edgecache/logs.py) and the logging set-up of the services (edgecache/cli.py)."""

from __future__ import annotations

import asyncio
import logging
import sys

import orjson
import pytest

from edgecache.cli import configure_logging
from edgecache.errors import ConfigError
from edgecache.logs import (
    ACCESS_LOGGER,
    CURRENT,
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    access_message,
)
from edgecache.trace import Span, start_span

CTX = start_span("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, "req-1")


def record(msg: str = "hello %s", *args: object, name: str = "edgecache.node", level: int = logging.WARNING,
           exc_info: object = None, **extra: object) -> logging.LogRecord:
    rec = logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, args or ("world",), exc_info)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def as_json(rec: logging.LogRecord, service: str = "edge", region: str | None = "us-east") -> dict:
    return orjson.loads(JsonFormatter(service, region).format(rec))


def test_a_record_is_one_json_object_on_one_line() -> None:
    rec = record()
    line = JsonFormatter("edge", "us-east").format(rec)
    assert "\n" not in line
    out = orjson.loads(line)
    assert out["msg"] == "hello world"
    assert out["level"] == "WARNING" and out["logger"] == "edgecache.node"
    assert out["service"] == "edge" and out["region"] == "us-east"
    assert out["ts"].endswith("Z") and out["ts"][:4].isdigit()
    assert "request_id" not in out   # outside a request


def test_inside_a_request_every_record_carries_its_ids() -> None:
    token = CURRENT.set(CTX)
    try:
        out = as_json(record())
    finally:
        CURRENT.reset(token)
    assert (out["request_id"], out["trace_id"], out["span_id"]) == (CTX.request_id, CTX.trace_id, CTX.span_id)


def test_the_filter_stamps_the_ids_when_the_record_is_made_so_later_formatting_keeps_them() -> None:
    rec = record()
    token = CURRENT.set(CTX)
    try:
        assert ContextFilter().filter(rec) is True
    finally:
        CURRENT.reset(token)
    assert as_json(rec)["request_id"] == "req-1"


async def test_a_task_started_inside_a_request_inherits_its_context() -> None:
    seen: list[Span | None] = []

    async def background() -> None:
        seen.append(CURRENT.get())

    token = CURRENT.set(CTX)
    try:
        task = asyncio.create_task(background())
    finally:
        CURRENT.reset(token)
    await task
    assert seen == [CTX] and CURRENT.get() is None


def test_fields_become_top_level_keys_and_exceptions_are_kept() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed %s", exc_info=sys.exc_info(), fields={"status": 500, "path": "/v1/x"})
    out = as_json(rec, "origin", None)
    assert out["status"] == 500 and out["path"] == "/v1/x"
    assert "region" not in out
    assert "ValueError: boom" in out["exc"]


def test_text_format_names_the_request() -> None:
    token = CURRENT.set(CTX)
    try:
        line = TextFormatter().format(record())
    finally:
        CURRENT.reset(token)
    assert line.endswith("hello world [req-1]")
    assert not TextFormatter().format(record()).endswith("]")


def test_access_message_is_readable() -> None:
    fields = {"method": "POST", "path": "/v1/chat/completions", "status": 200, "cache": "hit",
              "duration_ms": 0.42, "request_id": "r", "trace_id": "t"}
    assert access_message(fields) == "POST /v1/chat/completions 200 hit 0.42ms request_id=r trace_id=t"


@pytest.mark.parametrize("path", ["/v1/purge\n2026-01-01 00:00:00,000 edgecache.access INFO POST /v1/purge 200",
                                  "/a\rb", "/a\x1b[2Jb", "/a\u2028b", "/a\x85b", "/a\u202eb", "/a\x00b"])
def test_an_access_line_is_one_line_whatever_the_path_holds(path: str) -> None:
    fields = {"method": "POST", "path": path, "status": 401, "duration_ms": 1.0, "request_id": "r", "trace_id": "t"}
    rec = record("%s", access_message(fields), name=ACCESS_LOGGER, level=logging.INFO, fields=fields)
    text, as_json = TextFormatter().format(rec), JsonFormatter("origin").format(rec)
    assert text.isprintable() and ascii(path)[1:-1] in text, text
    assert "\n" not in as_json and "\r" not in as_json and orjson.loads(as_json)["path"] == path


def test_an_escaped_path_cannot_pass_for_another() -> None:
    assert access_message({"path": "/a\\nb"}) != access_message({"path": "/a\nb"})


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_configure_logging_installs_one_json_handler_at_the_level(root_logging: logging.Logger) -> None:
    env = {"EDGECACHE_LOG_FORMAT": "json", "EDGECACHE_LOG_LEVEL": "info"}
    configure_logging("edge", "eu-west", env)
    configure_logging("edge", "eu-west", env)   # again: replaced, not doubled
    ours = [h for h in root_logging.handlers if h.get_name() == "edgecache"]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, JsonFormatter) and ours[0].formatter.region == "eu-west"
    assert root_logging.level == logging.INFO
    assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)


def test_configure_logging_defaults_to_text_at_warning(root_logging: logging.Logger) -> None:
    configure_logging("origin", None, {})
    ours = [h for h in root_logging.handlers if h.get_name() == "edgecache"]
    assert isinstance(ours[0].formatter, TextFormatter)
    assert root_logging.level == logging.WARNING
    assert not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)   # access lines skipped


@pytest.mark.parametrize("env", [{"EDGECACHE_LOG_FORMAT": "xml"}, {"EDGECACHE_LOG_LEVEL": "LOUD"}])
def test_configure_logging_rejects_unknown_values(env: dict[str, str], root_logging: logging.Logger) -> None:
    with pytest.raises(ConfigError, match="EDGECACHE_LOG"):
        configure_logging("edge", None, env)
