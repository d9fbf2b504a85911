"""Trace context, request ids and access logs through a real client → edge → origin → backend stack."""

from __future__ import annotations

import logging
import re

import aiohttp
import orjson
import pytest

from edgecache.logs import ACCESS_LOGGER, JsonFormatter
from edgecache.trace import parse_traceparent
from origin.sim.app import TRACES
from tests.conftest import Stack, StackFactory, async_openai

pytestmark = pytest.mark.integration

API_KEY = "sk-observability-secret"
PROMPT = "Where is my parcel number 4411?"
MESSAGES = [{"role": "user", "content": PROMPT}]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


def backend_traces(stack: Stack) -> list[tuple[str | None, str | None]]:
    return [t for name, server in stack.servers.items() if name.startswith("sim") for t in server.app[TRACES]]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    """The access-log records as the JSON formatter writes them."""
    formatter = JsonFormatter("test")
    return [orjson.loads(formatter.format(r)) for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_traceparent_reaches_the_backend_with_the_clients_trace_id_and_a_new_parent(
        make_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    stack = await make_stack()
    headers = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=abc", "X-Request-Id": "client-req-1"}
    async with await async_openai(stack.edges["us-east"] + "/v1", API_KEY) as c:
        raw = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES,
                                                                extra_headers=headers)
    assert raw.parse().choices[0].message.content

    # The backend saw the client's trace, with a parent that is neither the client's nor the edge's.
    [(backend_traceparent, backend_rid)] = backend_traces(stack)
    trace_id, parent_id, flags = parse_traceparent(backend_traceparent)
    assert trace_id == CLIENT_TRACE and flags == 1
    assert parent_id != CLIENT_PARENT
    assert backend_rid == "client-req-1"

    # The edge answers with its own span in the same trace, and the request id.
    edge_trace, edge_span, _ = parse_traceparent(raw.headers["traceparent"])
    assert edge_trace == CLIENT_TRACE and edge_span not in (CLIENT_PARENT, parent_id)
    assert raw.headers["X-Request-Id"] == "client-req-1"

    # One JSON access line per hop, chained: client → edge → origin → backend.
    lines = access_lines(caplog)
    edge = [line for line in lines if line.get("region") == "us-east"]
    origin = [line for line in lines if "backend" in line]
    assert len(edge) == 1 and len(origin) == 1
    assert edge[0]["request_id"] == origin[0]["request_id"] == "client-req-1"
    assert edge[0]["trace_id"] == origin[0]["trace_id"] == CLIENT_TRACE
    assert edge[0]["parent_id"] == CLIENT_PARENT and edge[0]["span_id"] == edge_span
    assert origin[0]["parent_id"] == edge_span and origin[0]["span_id"] == parent_id
    assert edge[0]["status"] == 200 and edge[0]["cache"] == "miss" and edge[0]["method"] == "POST"
    assert edge[0]["path"] == "/v1/chat/completions"
    assert edge[0]["tenant"].startswith("key:") and origin[0]["tenant"] == edge[0]["tenant"]
    assert edge[0]["bytes_in"] > 0 and edge[0]["bytes_out"] > 0 and edge[0]["duration_ms"] > 0
    assert origin[0]["backend"] in stack.sim_urls

    # Neither the API key nor the prompt is ever logged.
    text = caplog.text + "".join(orjson.dumps(line).decode() for line in lines)
    assert API_KEY not in text and PROMPT not in text and "parcel" not in text


async def test_a_hit_answers_in_the_callers_trace_without_reaching_the_backend(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with await async_openai(stack.edges["us-east"] + "/v1", API_KEY) as c:
        await c.chat.completions.create(model="sim-llm", messages=MESSAGES)
        raw = await c.chat.completions.with_raw_response.create(
            model="sim-llm", messages=MESSAGES, extra_headers={"traceparent": CLIENT_TRACEPARENT})
    assert raw.headers["Cache-Status"].startswith("edgecache-us-east; hit")
    assert parse_traceparent(raw.headers["traceparent"])[0] == CLIENT_TRACE
    assert len(backend_traces(stack)) == 1
    rid = raw.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)   # none given: the edge made one
    [hit] = [line for line in access_lines(caplog) if line.get("request_id") == rid]
    assert hit["cache"] == "hit" and hit["trace_id"] == CLIENT_TRACE


async def test_without_a_valid_traceparent_the_edge_starts_the_trace_the_backend_sees(stack: Stack) -> None:
    async with await async_openai(stack.edges["us-east"] + "/v1", API_KEY) as c:
        plain = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=MESSAGES)
        bad = await c.chat.completions.with_raw_response.create(
            model="sim-llm", messages=[{"role": "user", "content": "another question"}],
            extra_headers={"traceparent": f"00-{'0' * 32}-{CLIENT_PARENT}-01"})
    sent = [parse_traceparent(tp) for tp, _ in backend_traces(stack)]
    for raw, (trace_id, _, _) in zip((plain, bad), sent, strict=True):
        edge_trace, _, _ = parse_traceparent(raw.headers["traceparent"])
        assert edge_trace == trace_id != "0" * 32
    assert sent[0][0] != sent[1][0]


async def test_a_streamed_answer_carries_the_trace_headers(stack: Stack) -> None:
    async with await async_openai(stack.edges["us-east"] + "/v1", API_KEY) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="sim-llm", messages=MESSAGES, stream=True,
            extra_headers={"traceparent": CLIENT_TRACEPARENT, "X-Request-Id": "stream-1"})
        chunks = [ch async for ch in raw.parse()]
    assert chunks
    assert parse_traceparent(raw.headers["traceparent"])[0] == CLIENT_TRACE
    assert raw.headers["X-Request-Id"] == "stream-1"
    assert backend_traces(stack)[0][1] == "stream-1"


async def test_a_rejected_request_is_logged_and_still_answers_with_ids(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    evil = "bad id with spaces"
    async with aiohttp.ClientSession() as s, s.post(stack.edges["us-east"] + "/v1/chat/completions",
                                                    data=b"{not json", headers={"X-Request-Id": evil}) as resp:
        assert resp.status == 400
        rid = resp.headers["X-Request-Id"]
        assert rid != evil and re.fullmatch(r"[0-9a-f]{32}", rid)
        assert parse_traceparent(resp.headers["traceparent"]) is not None
    [line] = [line for line in access_lines(caplog) if line.get("request_id") == rid]
    assert line["status"] == 400 and line["cache"] == "rejected"
    assert backend_traces(stack) == []


async def test_an_only_if_cached_miss_is_logged_as_the_metric_counts_it(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    body = {"model": "sim-llm", "messages": [{"role": "user", "content": "never asked before"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.edges["us-east"] + "/v1/chat/completions", json=body,
                          headers={"Cache-Control": "only-if-cached"}) as resp:
            assert resp.status == 504
            rid = resp.headers["X-Request-Id"]
        async with s.get(stack.edges["us-east"] + "/metrics") as resp:
            metrics = await resp.text()
    [line] = [line for line in access_lines(caplog) if line.get("request_id") == rid]
    assert line["status"] == 504 and line["cache"] == "error"
    assert 'edgecache_requests_total{cache_result="error",endpoint="chat",region="us-east"} 1.0' in metrics


async def test_changes_at_the_origin_leave_an_audit_line_at_info(stack: Stack,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with aiohttp.ClientSession() as s:
        for token in ("dev-admin-token", "not-the-token"):
            async with s.post(stack.origin_url + "/v1/purge", json={"tags": ["doc:9"]},
                              headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == (200 if token == "dev-admin-token" else 401)
        async with s.get(stack.origin_url + "/v1/prefixes", headers={"Authorization": "Bearer dev-admin-token"}):
            pass
    lines = access_lines(caplog)
    purges = [(line["status"], line["level"]) for line in lines if line["path"] == "/v1/purge"]
    assert purges == [(200, "INFO"), (401, "INFO")]   # a refused change is audited too
    assert not [line for line in lines if line["path"] == "/v1/prefixes"]   # reads stay at DEBUG
