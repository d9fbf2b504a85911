"""The backend pool: failure modes before the first byte (aioresponses), circuit breakers,
health checks, failover and metrics against real simulated servers on loopback."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from edgecache.config import BackendConfig, OriginConfig, SimConfig
from edgecache.errors import UpstreamUnavailable
from origin.backends import Backend, BackendPool, CircuitBreaker
from origin.sim.app import create_sim_app

A, B, C = "http://a.test", "http://b.test", "http://c.test"
PATH = "/v1/chat/completions"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def pool(session: aiohttp.ClientSession, retries: int = 2, keys: dict[str, str] | None = None) -> BackendPool:
    backends = tuple(BackendConfig(url=u, api_key=(keys or {}).get(u)) for u in (A, B, C))
    return BackendPool(backends, OriginConfig(retries=retries), session)


async def test_connection_reset_moves_on_to_the_next_backend(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, exception=aiohttp.ServerDisconnectedError())
        mock.post(B + PATH, payload={"ok": True})
        backend, resp = await pool(session).open("POST", PATH, b"{}", {})
        assert backend.config.url == B and resp.status == 200
        assert await resp.json() == {"ok": True}


async def test_503_before_the_first_byte_is_retried_elsewhere(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, status=503)
        mock.post(B + PATH, status=502)
        mock.post(C + PATH, payload={"ok": True})
        backend, resp = await pool(session).open("POST", PATH, b"{}", {})
        assert backend.config.url == C and resp.status == 200


async def test_client_errors_are_returned_not_retried(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, status=400, payload={"error": {"message": "bad"}})
        backend, resp = await pool(session).open("POST", PATH, b"{}", {})
        assert backend.config.url == A and resp.status == 400


async def test_every_backend_failing_is_upstream_unavailable(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, exception=aiohttp.ClientConnectionError())
        mock.post(B + PATH, exception=TimeoutError())
        mock.post(C + PATH, status=503)
        p = pool(session)
        with pytest.raises(UpstreamUnavailable, match="every backend failed"):
            await p.open("POST", PATH, b"{}", {})
        assert [b.failures for b in p.backends] == [1, 1, 1]


async def test_retries_are_bounded(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, exception=aiohttp.ClientConnectionError())
        mock.post(B + PATH, payload={"ok": True})
        with pytest.raises(UpstreamUnavailable, match="1 tried"):
            await pool(session, retries=0).open("POST", PATH, b"{}", {})


async def test_backend_api_key_is_sent_as_bearer(session) -> None:
    seen = {}

    def capture(url, **kwargs):
        seen.update(kwargs["headers"])

    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": True}, callback=capture)
        await pool(session, keys={A: "sk-backend"}).open("POST", PATH, b"{}", {"Content-Type": "application/json"})
    assert seen["Authorization"] == "Bearer sk-backend"


def test_a_backend_is_named_by_scheme_host_and_port_never_its_credentials() -> None:
    assert Backend(BackendConfig(url="http://svc:hunter2@10.0.0.7:8000/llm")).name == "http://10.0.0.7:8000"
    assert Backend(BackendConfig(url="http://svc:hunter2@10.0.0.7", name="gpu-1")).name == "gpu-1"


async def test_client_facing_errors_health_and_logs_hold_no_backend_url_or_key(session, caplog) -> None:
    key, url = "sk-backend-secret", "http://svc:hunter2@10.0.0.7:8000"
    p = BackendPool((BackendConfig(url=url, api_key=key), BackendConfig(url=B)), OriginConfig(), session)
    info = aiohttp.RequestInfo(URL(url + PATH), "POST", CIMultiDictProxy(CIMultiDict(
        Authorization=f"Bearer {key}")))
    with aioresponses() as mock:
        mock.post(url + PATH, exception=aiohttp.TooManyRedirects(info, ()))
        mock.post(B + PATH, exception=TimeoutError())
        with pytest.raises(UpstreamUnavailable) as caught:
            await p.open("POST", PATH, b"{}", {})
    public = [caught.value.message, orjson.dumps(p.snapshot()).decode(), caplog.text]
    assert not [text for text in public if "hunter2" in text or key in text]
    assert "10.0.0.7" not in caught.value.message and B not in caught.value.message
    assert [b["url"] for b in p.snapshot()] == ["http://10.0.0.7:8000", B]


# -- circuit breaker (pure, injected clock) --------------------------------------------------


def test_circuit_opens_after_consecutive_failures_and_lets_one_probe_through_after_the_cooldown() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0)
    breaker.failure(0.0)
    breaker.failure(1.0)
    assert breaker.state == "closed" and breaker.available(1.0)
    breaker.failure(2.0)
    assert breaker.state == "open" and not breaker.available(11.9)
    assert breaker.available(12.0)
    breaker.acquire(12.0)
    assert breaker.state == "half_open"
    assert not breaker.available(12.0)          # one probe at a time
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.available(12.0)


def test_a_failed_probe_opens_the_circuit_for_another_cooldown() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=5.0)
    breaker.failure(0.0)
    breaker.acquire(5.0)
    breaker.failure(5.5)
    assert breaker.state == "open" and not breaker.available(10.0) and breaker.available(10.5)


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown_s=5.0)
    breaker.failure(0.0)
    breaker.success()
    breaker.failure(1.0)
    assert breaker.state == "closed"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_open_circuit_is_skipped_until_its_cooldown_then_probed_and_closed(session) -> None:
    clock = FakeClock()
    config = OriginConfig(retries=2, breaker_failures=2, breaker_cooldown_s=30.0)
    p = BackendPool(tuple(BackendConfig(url=u) for u in (A, B)), config, session, clock=clock)
    with aioresponses() as mock:
        mock.post(A + PATH, exception=aiohttp.ClientConnectionError(), repeat=True)
        mock.post(B + PATH, payload={"ok": True}, repeat=True)
        for _ in range(6):
            backend, resp = await p.open("POST", PATH, b"{}", {})
            assert backend.config.url == B
            resp.release()
            p.release(backend)
    a = p.backends[0]
    assert a.breaker.state == "open" and a.failures == 2     # tried twice, then skipped
    clock.now += 30.0
    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": True}, repeat=True)
        mock.post(B + PATH, payload={"ok": True}, repeat=True)
        served = set()
        for _ in range(2):
            backend, resp = await p.open("POST", PATH, b"{}", {})
            served.add(backend.config.url)
            resp.release()
            p.release(backend)
    assert A in served and a.breaker.state == "closed"


async def test_429_moves_on_without_counting_against_the_backend(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, status=429, headers={"Retry-After": "1"})
        mock.post(B + PATH, payload={"ok": True})
        p = pool(session)
        backend, _ = await p.open("POST", PATH, b"{}", {})
        assert backend.config.url == B and p.backends[0].failures == 0


async def test_in_flight_counts_from_open_until_release(session) -> None:
    with aioresponses() as mock:
        mock.post(A + PATH, payload={"ok": True})
        mock.post(B + PATH, payload={"ok": True})
        p = pool(session)
        backend, resp = await p.open("POST", PATH, b"{}", {})
        assert backend.in_flight == 1
        resp.release()
        p.release(backend)
        assert backend.in_flight == 0
        async with p.request("POST", PATH, b"{}", {}) as (other, _):
            assert other.in_flight == 1 and other is not backend
        assert other.in_flight == 0


# -- real simulated servers on loopback ------------------------------------------------------

FAST = SimConfig(count=0, time_scale=0.0, default_max_tokens=4)
SYSTEM = "You are the support assistant of Acme Cloud. " * 40


def chat(system: str, question: str, max_tokens: int = 4) -> bytes:
    return orjson.dumps({"model": "sim-llm", "max_tokens": max_tokens, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]})


@pytest.fixture
async def sims():
    """Start ``n`` simulated servers; returns their TestServers (closed at the end)."""
    started: list[TestServer] = []

    async def start(n: int) -> list[TestServer]:
        for _ in range(n):
            server = TestServer(create_sim_app(FAST), host="127.0.0.1")
            await server.start_server()
            started.append(server)
        return started[-n:]

    yield start
    for server in started:
        await server.close()


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def send(p: BackendPool, body: bytes, route: str | None = None) -> Backend:
    async with p.request("POST", PATH, body, {"Content-Type": "application/json"}, route=route) as (backend, resp):
        assert resp.status == 200, await resp.text()
        await resp.read()
    return backend


async def test_failover_when_a_backend_dies(session, sims) -> None:
    a, b = await sims(2)
    config = OriginConfig(retries=1, breaker_failures=2)
    p = BackendPool((BackendConfig(url=url_of(a)), BackendConfig(url=url_of(b))), config, session)
    assert {(await send(p, chat(SYSTEM, "hi"))).index for _ in range(2)} == {0, 1}
    await a.close()
    served = [(await send(p, chat(SYSTEM, f"q{i}"))).index for i in range(6)]
    assert served == [1] * 6                                  # no request was lost
    assert p.backends[0].breaker.state == "open" and p.backends[0].failures == 2


async def test_health_check_marks_a_dead_backend_down_and_routing_skips_it(session, sims) -> None:
    a, b = await sims(2)
    p = BackendPool((BackendConfig(url=url_of(a)), BackendConfig(url=url_of(b))), OriginConfig(), session)
    await p.check_health()
    assert [x.healthy for x in p.backends] == [True, True]
    port = a.port
    await a.close()
    await p.check_health()
    assert [x.healthy for x in p.backends] == [False, True]
    assert p.snapshot()[0]["available"] is False and "/health" in p.snapshot()[0]["last_error"]
    served = [(await send(p, chat(SYSTEM, f"q{i}"))).index for i in range(4)]
    assert served == [1] * 4 and p.backends[0].failures == 0   # never even tried
    again = TestServer(create_sim_app(FAST), host="127.0.0.1", port=port)
    await again.start_server()
    try:
        await p.check_health()
        assert p.backends[0].healthy
        assert {(await send(p, chat(SYSTEM, f"r{i}"))).index for i in range(2)} == {0, 1}
    finally:
        await again.close()


async def test_background_polling_finds_a_dead_backend_and_stops_on_close(session, sims) -> None:
    a, b = await sims(2)
    config = OriginConfig(health_interval_s=0.01, metrics_interval_s=0.01)
    p = BackendPool((BackendConfig(url=url_of(a)), BackendConfig(url=url_of(b))), config, session)
    await p.start()
    try:
        while not all(x.metrics is not None for x in p.backends):
            await asyncio.wait_for(p.next_round(), 5)
        await a.close()
        while p.backends[0].healthy:
            await asyncio.wait_for(p.next_round(), 5)
    finally:
        await p.close()
    assert p.backends[1].healthy


async def test_prefix_aware_keeps_a_prefix_on_one_backend_and_its_metrics_show_the_hits(session, sims) -> None:
    servers = await sims(3)
    config = OriginConfig(routing="prefix_aware", metrics_interval_s=0)
    p = BackendPool(tuple(BackendConfig(url=url_of(s), name=f"sim-{i}") for i, s in enumerate(servers)),
                    config, session)
    homes = {(await send(p, chat(SYSTEM, f"question {i}?"), route=SYSTEM + f"\nquestion {i}?")).index
             for i in range(5)}
    assert len(homes) == 1
    (home,) = homes
    await p.scrape_metrics()
    snap = {s["name"]: s for s in p.snapshot()}
    m = snap[f"sim-{home}"]["metrics"]
    assert m["prefix_cache_queries"] > 0 and m["prefix_cache_hits"] > 0
    assert m["prefix_hit_rate"] > 0.6                 # 4 of 5 requests reused the long prefix
    assert snap[f"sim-{home}"]["routed"] == {"short_match": 1, "affinity": 4}
    assert all(s["metrics"]["prefix_cache_queries"] == 0 for n, s in snap.items() if n != f"sim-{home}")
    orjson.dumps(p.snapshot())                        # plain data


async def test_warm_up_on_the_target_backend_draws_the_prefix_traffic_there(session, sims) -> None:
    servers = await sims(3)
    p = BackendPool(tuple(BackendConfig(url=url_of(s)) for s in servers),
                    OriginConfig(routing="prefix_aware"), session)
    (target,) = p.targets(SYSTEM, 1)
    resp = await p.open_on(target, "POST", PATH, chat(SYSTEM, "", max_tokens=1),
                           {"Content-Type": "application/json"}, route=SYSTEM)
    assert resp.status == 200
    resp.release()
    backend = await send(p, chat(SYSTEM, "What is new?"), route=SYSTEM + "\nWhat is new?")
    assert backend is target and backend.routed == {"affinity": 1}
