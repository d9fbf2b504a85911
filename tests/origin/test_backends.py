"""Backend failure modes before the first byte (aioresponses), and what is never retried."""

from __future__ import annotations

import aiohttp
import pytest
from aioresponses import aioresponses

from edgecache.config import BackendConfig, OriginConfig
from edgecache.errors import UpstreamUnavailable
from origin.backends import BackendPool

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
