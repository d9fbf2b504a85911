"""The origin shield without servers: its key and scope, what it stores, how it replays, its purges."""

from __future__ import annotations

import orjson
import pytest

from edgecache.events import Event, PrefixChange
from edgecache.keys import Scope, cache_key
from edgecache.stream import DONE, SSEParser, frame
from nodes.replay import frames
from origin.shield import (
    Pending,
    Shield,
    ShieldCollector,
    ShieldRequest,
    answer_entry,
    replay,
    shield_request,
)

CHAT = {"model": "sim-llm", "max_tokens": 8, "messages": [{"role": "user", "content": "Refunds?"}]}
EDGE = {"X-EdgeCache-Tenant": "acme", "X-EdgeCache-TTL": "3600", "Cache-Tag": "doc:1, doc:2"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
         "prompt_tokens_details": {"cached_tokens": 3}}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "sim-llm",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Within 30 days."},
                       "logprobs": None, "finish_reason": "stop"}], "usage": USAGE}


def chunk(delta: dict, finish: str | None = None, **extra: object) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "sim-llm",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                         **extra})


CHUNKS = [chunk({"role": "assistant", "content": ""}, usage=None), chunk({"content": "Within "}, usage=None),
          chunk({"content": "30 days."}, usage=None), chunk({}, "stop", usage=None)]
USAGE_CHUNK = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                            "model": "sim-llm", "choices": [], "usage": USAGE})
STREAM = b"".join(frame(c) for c in [*CHUNKS, USAGE_CHUNK]) + DONE


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request(body: dict = CHAT, **headers: str) -> ShieldRequest:
    req = shield_request("chat", body, {**EDGE, **headers})
    assert req is not None
    return req


def stored(shield: Shield, req: ShieldRequest, raw: bytes = orjson.dumps(ANSWER),
           content_type: str = "application/json") -> bool:
    return shield.store(req, content_type, raw, since=shield.generation())


# -- the request ----------------------------------------------------------------------------


def test_key_is_the_edges_cache_key_over_the_request_it_sent() -> None:
    assert request().key == cache_key("chat", CHAT, Scope("acme")).digest
    # the wire format is not part of it: one entry answers JSON and streams alike
    assert request({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).key == request().key
    prefixed = shield_request("chat", {**CHAT, "prefix": "faq"}, EDGE, prefix=("faq", "v1"),
                              prefix_tags=frozenset({"doc:9"}))
    assert prefixed is not None and prefixed.key == cache_key("chat", {**CHAT, "prefix": "faq"},
                                                              Scope("acme", "faq", "v1")).digest
    assert prefixed.tags == {"doc:1", "doc:2", "doc:9", "prefix:faq"}
    assert prefixed.prefix_id == "faq" and prefixed.prefix_version == "v1"


def test_scopes_differ_by_tenant_prefix_version_and_parameter() -> None:
    keys = {request().key, request(**{"X-EdgeCache-Tenant": "globex"}).key, request({**CHAT, "max_tokens": 9}).key}
    for version in ("v1", "v2"):
        req = shield_request("chat", {**CHAT, "prefix": "faq"}, EDGE, prefix=("faq", version))
        assert req is not None
        keys.add(req.key)
    assert len(keys) == 5


@pytest.mark.parametrize(("headers", "lookup", "store"), [
    ({}, True, True),
    ({"Cache-Control": "no-cache"}, False, True),
    ({"Cache-Control": "no-store"}, False, False),
    ({"Cache-Control": "no-cache, no-store"}, False, False),
    ({"X-EdgeCache-TTL": "0"}, True, False),
    ({"X-EdgeCache-TTL": "soon"}, True, False),
])
def test_cache_control_and_ttl_decide_lookup_and_store(headers: dict, lookup: bool, store: bool) -> None:
    req = request(**headers)
    assert (req.lookup, req.store) == (lookup, store)


def test_no_ttl_is_never_stored_and_max_age_is_read() -> None:
    headers = {k: v for k, v in EDGE.items() if k != "X-EdgeCache-TTL"}
    req = shield_request("chat", CHAT, {**headers, "Cache-Control": "max-age=60"})
    assert req is not None and req.ttl is None and not req.store and req.max_age == 60


@pytest.mark.parametrize("headers", [{"X-EdgeCache-Tenant": ""}, {"Cache-Tag": "bad tag"},
                                     {"Cache-Tag": "a,,b"}, {"Cache-Control": "max-age=soon"}])
def test_unscoped_or_malformed_requests_bypass_the_shield(headers: dict) -> None:
    assert shield_request("chat", CHAT, {**EDGE, **headers}) is None


def test_a_body_the_key_cannot_canonicalise_bypasses_the_shield() -> None:
    assert shield_request("chat", {"model": "m"}, EDGE) is None
    assert shield_request("chat", {**CHAT, "temperature": float("nan")}, EDGE) is None


def test_wire_format() -> None:
    req = request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage
    assert not request({**CHAT, "stream_options": {"include_usage": True}}).include_usage


# -- what is stored -------------------------------------------------------------------------


def test_a_json_answer_is_stored_with_tags_ttl_and_usage() -> None:
    entry = answer_entry(request(), "application/json", orjson.dumps(ANSWER), 50.0)
    assert entry is not None and entry.chunks is None and orjson.loads(entry.body) == ANSWER
    assert entry.tags == {"doc:1", "doc:2"} and entry.ttl == 3600 and entry.created == 50.0
    assert entry.tenant == "acme" and (entry.usage.prompt_tokens, entry.usage.cached_tokens) == (5, 3)


def test_a_complete_stream_is_assembled_as_the_edge_does() -> None:
    entry = answer_entry(request(), "text/event-stream; charset=utf-8", STREAM, 50.0)
    assert entry is not None and entry.chunks is not None
    assert len(entry.chunks) == 4 and all(b'"usage"' not in c for c in entry.chunks)
    body = orjson.loads(entry.body)
    assert body["choices"][0]["message"]["content"] == "Within 30 days." and body["usage"] == USAGE
    assert entry.usage.completion_tokens == 2


@pytest.mark.parametrize("raw", [
    STREAM[:-len(DONE)],                                                     # cut before [DONE]
    STREAM[:-len(DONE)] + frame(b'{"error": {"message": "boom"}}') + DONE,    # an error event
    STREAM + frame(CHUNKS[1]),                                               # something after [DONE]
    STREAM + b"data: {",                                                     # an unfinished event
    STREAM.replace(b"data: " + CHUNKS[1], b"data: {not json"),               # a malformed chunk
])
def test_cut_or_broken_streams_are_not_stored(raw: bytes) -> None:
    assert answer_entry(request(), "text/event-stream", raw, 1.0) is None


@pytest.mark.parametrize("raw", [b"not json", b"[1]", orjson.dumps({"id": "x"}),
                                 orjson.dumps({"error": {"message": "overloaded"}, "choices": []})])
def test_json_answers_without_choices_or_with_an_error_are_not_stored(raw: bytes) -> None:
    assert answer_entry(request(), "application/json", raw, 1.0) is None


# -- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["json", "stream"])
@pytest.mark.parametrize(("stream", "include_usage"), [(False, False), (True, False), (True, True)])
def test_replay_is_byte_identical_to_the_edges_replay(source: str, stream: bool, include_usage: bool) -> None:
    raw, content_type = (orjson.dumps(ANSWER), "application/json") if source == "json" else (STREAM, "text/event-stream")
    entry = answer_entry(request(), content_type, raw, 1.0)
    assert entry is not None
    kind, body = replay(entry, stream, include_usage)
    if not stream:
        assert kind == "application/json" and body == entry.body
        return
    assert kind == "text/event-stream"
    assert body == frames(entry.endpoint, entry.body, entry.chunks, include_usage)
    payloads = list(SSEParser().feed(body))
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Within 30 days."
    assert (chunks[-1].get("usage") == USAGE) is include_usage


# -- the shield -----------------------------------------------------------------------------


def test_stored_answer_is_served_until_it_expires() -> None:
    clock = Clock()
    shield = Shield(1 << 20, 1 << 20, clock)
    req = request()
    assert shield.lookup(req, clock.now) is None
    assert stored(shield, req)
    clock.now += 3599
    entry = shield.lookup(req, clock.now)
    assert entry is not None and entry.age(clock.now) == 3599
    assert shield.lookup(req, clock.now + 1) is None
    assert shield.counts == {"hit": 1, "miss": 2, "stored": 1, "bypass": 0}
    assert len(shield) == 0   # the expired entry is gone


def test_never_served_to_another_tenant_even_under_the_same_key() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    req = request()
    assert stored(shield, req)
    other = ShieldRequest(key=req.key, endpoint="chat", tenant="globex", tags=frozenset(), ttl=60, lookup=True,
                          store=True)
    assert shield.lookup(other, 1000.0) is None and shield.lookup(req, 1000.0) is not None


def test_an_entry_older_than_the_requests_ttl_or_max_age_is_not_served() -> None:
    clock = Clock()
    shield = Shield(1 << 20, 1 << 20, clock)
    assert stored(shield, request())
    clock.now += 100
    assert shield.lookup(request(**{"X-EdgeCache-TTL": "100"}), clock.now) is None    # the edge would store it expired
    assert shield.lookup(request(**{"X-EdgeCache-TTL": "101"}), clock.now) is not None
    assert shield.lookup(request(**{"Cache-Control": "max-age=99"}), clock.now) is None
    assert shield.lookup(request(**{"Cache-Control": "max-age=100"}), clock.now) is not None


def test_served_only_when_the_entry_carries_every_tag_the_request_names() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    assert stored(shield, request(**{"Cache-Tag": "doc:1"}))
    assert shield.lookup(request(**{"Cache-Tag": "doc:1, doc:2"}), 1000.0) is None
    assert shield.lookup(request(**{"Cache-Tag": ""}), 1000.0) is not None
    assert shield.lookup(request(**{"Cache-Tag": "doc:1"}), 1000.0) is not None


def test_no_cache_and_no_store_bypass_the_lookup_and_no_store_is_not_stored() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    assert not stored(shield, request(**{"Cache-Control": "no-store"}))
    assert stored(shield, request(**{"Cache-Control": "no-cache"}))
    assert shield.lookup(request(**{"Cache-Control": "no-cache"}), 1000.0) is None
    assert shield.lookup(None, 1000.0) is None
    assert shield.lookup(request(), 1000.0) is not None
    assert shield.counts == {"hit": 1, "miss": 0, "stored": 1, "bypass": 2}


def test_bounded_in_bytes_and_per_entry() -> None:
    entry = answer_entry(request(), "application/json", orjson.dumps(ANSWER), 1.0)
    assert entry is not None
    assert not stored(Shield(1 << 20, entry.size - 1, Clock()), request())
    shield = Shield(entry.size * 2 + 10, 1 << 20, Clock())
    reqs = [request({**CHAT, "max_tokens": n}) for n in range(1, 5)]
    for req in reqs:
        assert stored(shield, req)
    assert len(shield) == 2 and shield.bytes <= entry.size * 2 + 10
    assert shield.lookup(reqs[0], 1000.0) is None and shield.lookup(reqs[-1], 1000.0) is not None


@pytest.mark.parametrize("event", [
    Event(seq=0, created=0, source_id="t", tags=frozenset({"doc:2"})),
    Event(seq=0, created=0, source_id="s", tags=frozenset({"doc:1"}), soft=True),
    Event(seq=0, created=0, source_id="a", purge_all=True),
    Event(seq=0, created=0, source_id="a", purge_all=True, soft=True),
], ids=["tag", "soft-tag", "all", "soft-all"])
def test_purge_events_remove_entries(event: Event) -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    assert stored(shield, request())
    untagged = request({**CHAT, "max_tokens": 3}, **{"Cache-Tag": ""})
    assert stored(shield, untagged)
    shield.apply(event)
    assert shield.lookup(request(), 1000.0) is None
    assert (shield.lookup(untagged, 1000.0) is None) is event.purge_all


def test_a_key_purge_removes_that_key_only() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    other = request({**CHAT, "max_tokens": 3})
    assert stored(shield, request()) and stored(shield, other)
    shield.apply(Event(seq=0, created=0, source_id="k", keys=frozenset({request().key})))
    assert shield.lookup(request(), 1000.0) is None and shield.lookup(other, 1000.0) is not None


@pytest.mark.parametrize("change", [PrefixChange("faq", None), PrefixChange("faq", "v2", frozenset(), 10)],
                         ids=["deleted", "new-version"])
def test_a_prefix_change_purges_its_answers(change: PrefixChange) -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    prefixed = shield_request("chat", {**CHAT, "prefix": "faq"}, {**EDGE, "Cache-Tag": ""}, prefix=("faq", "v1"))
    plain = request()
    assert prefixed is not None and stored(shield, prefixed) and stored(shield, plain)
    shield.apply(Event(seq=0, created=0, source_id="p", prefixes=(change,)))
    assert shield.lookup(prefixed, 1000.0) is None and shield.lookup(plain, 1000.0) is not None


@pytest.mark.parametrize("event", [
    Event(seq=0, created=0, source_id="t", tags=frozenset({"doc:1"})),
    Event(seq=0, created=0, source_id="k", keys=frozenset({request().key})),
    Event(seq=0, created=0, source_id="a", purge_all=True),
    Event(seq=0, created=0, source_id="p", prefixes=(PrefixChange("faq", None),)),
], ids=["tag", "key", "all", "prefix"])
def test_an_answer_begun_before_a_purge_is_not_stored_after_it(event: Event) -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    req = shield_request("chat", {**CHAT, "prefix": "faq"}, EDGE, prefix=("faq", "v1")) \
        if event.prefixes else request()
    assert req is not None
    since = shield.generation()          # the backend request begins
    shield.apply(event)                  # a purge lands while it runs
    assert not shield.store(req, "application/json", orjson.dumps(ANSWER), since=since)
    assert shield.lookup(req, 1000.0) is None
    assert shield.store(req, "application/json", orjson.dumps(ANSWER), since=shield.generation())


def test_an_unrelated_purge_does_not_stop_a_store() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    since = shield.generation()
    shield.apply(Event(seq=0, created=0, source_id="t", tags=frozenset({"doc:99"})))
    shield.apply(Event(seq=0, created=0, source_id="k", keys=frozenset({b"\x00" * 16})))
    assert shield.store(request(), "application/json", orjson.dumps(ANSWER), since=since)


def test_a_coalesced_request_stores_with_every_waiters_tags_and_the_shortest_ttl() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    pending = Pending(request(**{"Cache-Tag": "doc:1"}), shield.generation())
    pending.join(request(**{"Cache-Tag": "doc:7", "X-EdgeCache-TTL": "60"}))
    pending.join(request({**CHAT, "max_tokens": 2}, **{"Cache-Tag": "doc:8"}))   # another key: ignored
    pending.join(None)
    assert pending.req.tags == {"doc:1", "doc:7"} and pending.req.ttl == 60
    shield.apply(Event(seq=0, created=0, source_id="t", tags=frozenset({"doc:7"})))   # a joiner's tag, purged
    assert not shield.store(pending.req, "application/json", orjson.dumps(ANSWER), since=pending.since)


def test_collector_exposes_counts_entries_and_bytes() -> None:
    shield = Shield(1 << 20, 1 << 20, Clock())
    assert stored(shield, request())
    shield.lookup(request(), 1000.0)
    families = {f.name: f for f in ShieldCollector(shield).collect()}
    total = {s.labels["result"]: s.value for s in families["edgecache_origin_shield"].samples
             if s.name.endswith("_total")}
    assert total == {"hit": 1, "miss": 0, "stored": 1, "bypass": 0}
    assert families["edgecache_origin_shield_entries"].samples[0].value == 1
    assert families["edgecache_origin_shield_bytes"].samples[0].value == shield.bytes > 0
    assert shield.health()["entries"] == 1
