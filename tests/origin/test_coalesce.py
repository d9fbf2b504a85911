"""The origin's coalescing key and flights (pure and in-process), and the pool's in-flight bound."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses
from hypothesis import given
from hypothesis import strategies as st

from edgecache.config import BackendConfig, OriginConfig
from edgecache.errors import UpstreamUnavailable
from origin.backends import BackendPool, OriginOverloaded
from origin.coalesce import Flight, Flights, Head, flight_key

CHAT = {"model": "sim-llm", "temperature": 0.0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "How do I reset my password?"}]}


def key(body: dict | bytes = CHAT, **kw: object) -> bytes | None:
    parsed = orjson.loads(body) if isinstance(body, bytes) else body
    kw.setdefault("tenant", "acme")
    return flight_key(str(kw.pop("endpoint", "chat")), parsed, **kw)  # type: ignore[arg-type]


# -- the key -------------------------------------------------------------------------------------


def test_field_order_whitespace_and_integral_floats_do_not_change_the_key() -> None:
    a = b'{"model":"sim-llm","temperature":0.0,"max_tokens":8,"messages":[{"role":"user","content":"How do I reset my password?"}]}'
    b = (b'{ "messages" : [ { "content": "How do I reset my password?", "role": "user" } ],\n'
         b'  "max_tokens": 8.0, "temperature": 0, "model": "sim-llm" }')
    assert key(a) == key(b) == key(CHAT) is not None


@given(st.permutations(list(CHAT)))
def test_any_field_order_gives_the_same_key(order: list[str]) -> None:
    assert key({k: CHAT[k] for k in order}) == key(CHAT)


def test_tenant_endpoint_prefix_version_and_parameters_separate_keys() -> None:
    keys = {
        key(CHAT),
        key(CHAT, tenant="globex"),
        key({**CHAT, "temperature": 0.7}),
        key({**CHAT, "prefix": "kb"}, prefix=("kb", "a" * 32)),
        key({**CHAT, "prefix": "kb"}, prefix=("kb", "b" * 32)),
        key({"model": "sim-llm", "prompt": "How do I reset my password?"}, endpoint="completions"),
    }
    assert None not in keys and len(keys) == 6


def test_wire_format_separates_streams_from_json_and_usage_options() -> None:
    plain = key(CHAT)
    stream = key({**CHAT, "stream": True})
    usage = key({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert len({plain, stream, usage}) == 3
    assert key({**CHAT, "stream": False}) == plain          # false and absent: the same JSON answer
    assert key({**CHAT, "stream": True, "stream_options": {"include_usage": True}}) == usage


def test_transport_fields_that_do_not_change_the_bytes_share_a_key() -> None:
    assert key({**CHAT, "user": "u-1"}) == key({**CHAT, "user": "u-2"}) == key(CHAT)


@pytest.mark.parametrize("cache_control", ["no-cache", "no-store", "max-age=0, No-Store"])
def test_requests_bypassing_the_cache_never_coalesce(cache_control: str) -> None:
    assert key(CHAT, cache_control=cache_control) is None


def test_max_age_alone_still_coalesces() -> None:
    assert key(CHAT, cache_control="max-age=60") == key(CHAT)


@pytest.mark.parametrize("tenant", [None, ""])
def test_a_request_without_tenant_never_coalesces(tenant: str | None) -> None:
    assert key(CHAT, tenant=tenant) is None


@pytest.mark.parametrize("body", [{"model": "sim-llm"}, {**CHAT, "stream": "yes"}, {**CHAT, "n": 0}])
def test_a_request_the_key_cannot_canonicalise_goes_alone(body: dict) -> None:
    assert key(body) is None


# -- flights -------------------------------------------------------------------------------------


class Upstream:
    """A controllable backend request: sends the head on ``go_head``, a chunk per ``send``."""

    def __init__(self, fail_before_head: Exception | None = None) -> None:
        self.calls = 0
        self.go_head = asyncio.Event()
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.fail = fail_before_head
        self.cancelled = asyncio.Event()

    async def __call__(self, flight: Flight) -> None:
        self.calls += 1
        try:
            await self.go_head.wait()
            if self.fail is not None:
                raise self.fail
            flight.begin(Head(200, "text/event-stream", "b1"))
            while (chunk := await self.chunks.get()) is not None:
                flight.feed(chunk)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def collect(flight: Flight) -> bytes:
    await flight.wait_head()
    return b"".join([c async for c in flight.live()])


async def test_identical_keys_share_one_upstream_and_fan_out_every_chunk() -> None:
    flights, up = Flights(max_waiters=8, max_flights=8), Upstream()
    first, joined0 = flights.join(b"k", up)
    second, joined1 = flights.join(b"k", up)
    assert first is second and (joined0, joined1) == (False, True) and flights.coalesced == 1
    readers = [asyncio.create_task(collect(first)) for _ in range(2)]
    up.go_head.set()
    await up.chunks.put(b"data: 1\n\n")
    late, joined2 = flights.join(b"k", up)        # joins after a chunk: replayed from the start
    readers.append(asyncio.create_task(collect(late)))
    await up.chunks.put(b"data: 2\n\n")
    await up.chunks.put(None)
    bodies = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert joined2 and up.calls == 1 and bodies == [b"data: 1\n\ndata: 2\n\n"] * 3
    assert len(flights) == 0                       # done: the next one starts afresh
    again, joined = flights.join(b"k", up)
    assert not joined and again is not first
    again.leave()


async def test_different_keys_and_no_key_never_share() -> None:
    flights, up = Flights(max_waiters=8, max_flights=8), Upstream()
    a, _ = flights.join(b"a", up)
    b, _ = flights.join(b"b", up)
    c, _ = flights.join(None, up)
    d, joined = flights.join(None, up)
    assert len({id(a), id(b), id(c), id(d)}) == 4 and not joined and flights.coalesced == 0
    await asyncio.sleep(0)   # let the flights start
    assert up.calls == 4
    for f in (a, b, c, d):
        f.leave()


async def test_waiters_and_flights_are_bounded() -> None:
    flights, up = Flights(max_waiters=2, max_flights=1), Upstream()
    a, _ = flights.join(b"k", up)
    b, joined_b = flights.join(b"k", up)
    c, joined_c = flights.join(b"k", up)          # a third waiter: its own flight
    d, joined_d = flights.join(b"other", up)      # a second flight: over max_flights, alone
    assert a is b and joined_b and not joined_c and c is not a and not joined_d
    assert len(flights) == 1 and flights.coalesced == 1
    for f in (a, b, c, d):
        f.leave()


async def test_a_failure_before_the_head_fails_every_waiter_alike() -> None:
    flights = Flights(max_waiters=8, max_flights=8)
    up = Upstream(fail_before_head=UpstreamUnavailable("backend b1 is unreachable"))
    waiters = [flights.join(b"k", up)[0] for _ in range(3)]
    results = asyncio.gather(*(f.wait_head() for f in waiters), return_exceptions=True)
    up.go_head.set()
    errors = await asyncio.wait_for(results, 5)
    assert all(isinstance(e, UpstreamUnavailable) and e.code == "upstream_unavailable" for e in errors)
    assert len({id(e) for e in errors}) == 3      # each waiter raises its own copy
    assert up.calls == 1


async def test_a_leaving_waiter_does_not_cancel_the_others_but_the_last_one_does() -> None:
    flights, up = Flights(max_waiters=8, max_flights=8), Upstream()
    a, _ = flights.join(b"k", up)
    b, _ = flights.join(b"k", up)
    await asyncio.sleep(0)
    a.leave()
    assert not up.cancelled.is_set() and len(flights) == 1
    b.leave()
    assert len(flights) == 0                       # nobody may join a cancelled flight
    await asyncio.wait_for(up.cancelled.wait(), 5)
    assert isinstance(b.failure, Exception) and b.failure.code == "cancelled"


async def test_overloaded_copies_keep_their_retry_after() -> None:
    flights = Flights(max_waiters=8, max_flights=8)
    up = Upstream(fail_before_head=OriginOverloaded("full", retry_after_s=7))
    waiters = [flights.join(b"k", up)[0] for _ in range(2)]
    up.go_head.set()
    errors = await asyncio.wait_for(asyncio.gather(*(f.wait_head() for f in waiters), return_exceptions=True), 5)
    assert [(type(e), e.retry_after_s, e.status, e.code) for e in errors] == \
        [(OriginOverloaded, 7, 429, "origin_overloaded")] * 2


# -- the backend pool's in-flight bound ------------------------------------------------------------

A, B = "http://a.test", "http://b.test"
PATH = "/v1/chat/completions"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def bounded(session: aiohttp.ClientSession, **kw: object) -> BackendPool:
    config = OriginConfig(max_in_flight_per_backend=1, **kw)  # type: ignore[arg-type]
    return BackendPool((BackendConfig(url=A), BackendConfig(url=B)), config, session)


async def test_full_backends_are_skipped_then_the_origin_answers_429(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": 1}, repeat=True)
        mock.post(B + PATH, payload={"ok": 1}, repeat=True)
        pool = bounded(session, queue_size=0, retry_after_s=3)
        first, _ = await pool.open("POST", PATH, b"{}", {})
        second, _ = await pool.open("POST", PATH, b"{}", {})
        assert {first.config.url, second.config.url} == {A, B}
        with pytest.raises(OriginOverloaded) as info:
            await pool.open("POST", PATH, b"{}", {})
        assert info.value.retry_after_s == 3 and pool.overloaded == 1
        assert [b.in_flight for b in pool.backends] == [1, 1]


async def test_a_queued_request_takes_the_first_slot_freed(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": 1}, repeat=True)
        mock.post(B + PATH, payload={"ok": 1}, repeat=True)
        pool = bounded(session, queue_size=1, queue_timeout_s=30)
        held = [await pool.open("POST", PATH, b"{}", {}) for _ in range(2)]
        queued = asyncio.create_task(pool.open("POST", PATH, b"{}", {}))
        await asyncio.sleep(0)
        assert pool.queued == 1
        with pytest.raises(OriginOverloaded):      # the queue is full
            await pool.open("POST", PATH, b"{}", {})
        backend, resp = held[1]
        resp.release()
        pool.release(backend)
        got, _ = await asyncio.wait_for(queued, 5)
        assert got is backend and pool.queued == 0 and backend.in_flight == 1


async def test_a_queued_request_gives_up_after_queue_timeout(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": 1}, repeat=True)
        mock.post(B + PATH, payload={"ok": 1}, repeat=True)
        pool = bounded(session, queue_size=4, queue_timeout_s=0.01)
        for _ in range(2):
            await pool.open("POST", PATH, b"{}", {})
        with pytest.raises(OriginOverloaded, match="stayed full"):
            await pool.open("POST", PATH, b"{}", {})
        assert pool.queued == 0


async def test_every_backend_answering_429_is_origin_overloaded_with_its_retry_after(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, status=429, headers={"Retry-After": "9"})
        mock.post(B + PATH, status=429, headers={"Retry-After": "9"})
        pool = BackendPool((BackendConfig(url=A), BackendConfig(url=B)), OriginConfig(), session)
        with pytest.raises(OriginOverloaded) as info:
            await pool.open("POST", PATH, b"{}", {})
        assert info.value.retry_after_s == 9 and [b.in_flight for b in pool.backends] == [0, 0]
        assert all(b.failures == 0 for b in pool.backends)


async def test_cancelling_a_request_before_its_answer_frees_its_slot(session) -> None:
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def slow(url: str, **kwargs: object) -> None:
        arrived.set()
        await gate.wait()

    with aioresponses() as mock:
        mock.post(A + PATH, callback=slow, payload={"ok": 1})
        pool = BackendPool((BackendConfig(url=A),), OriginConfig(max_in_flight_per_backend=1), session)
        task = asyncio.create_task(pool.open("POST", PATH, b"{}", {}))
        await asyncio.wait_for(arrived.wait(), 5)
        assert pool.backends[0].in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.backends[0].in_flight == 0
