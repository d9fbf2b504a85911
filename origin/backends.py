"""The inference servers behind the origin, and how a request reaches one of them.

``BackendPool.open`` sends a request to the next backend in turn and returns the response
as soon as its headers arrive; before that first byte, a connection failure or a 502/503/504
moves on to the next backend (up to ``retries`` more). After it, nothing is retried: the
answer is already flowing to the client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from edgecache.config import BackendConfig, OriginConfig
from edgecache.errors import UpstreamTimeout, UpstreamUnavailable

__all__ = ["Backend", "BackendPool"]

log = logging.getLogger("edgecache.origin")

_RETRYABLE = frozenset({502, 503, 504})


@dataclass(slots=True)
class Backend:
    config: BackendConfig
    in_flight: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return self.config.name or self.config.url


class BackendPool:
    """Round-robin over the configured backends with retries before the first byte."""

    def __init__(self, backends: tuple[BackendConfig, ...], config: OriginConfig,
                 session: aiohttp.ClientSession) -> None:
        if not backends:
            raise ValueError("the origin needs at least one backend")
        self.backends = [Backend(b) for b in backends]
        self._config = config
        self._session = session
        self._turn = itertools.cycle(range(len(self.backends)))

    def _headers(self, backend: Backend, extra: Mapping[str, str]) -> dict[str, str]:
        headers = dict(extra)
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        return headers

    async def open(self, method: str, path: str, body: bytes | None,
                   headers: Mapping[str, str]) -> tuple[Backend, aiohttp.ClientResponse]:
        """The first backend response (headers received) that is not a retryable failure."""
        attempts = min(len(self.backends), self._config.retries + 1)
        last: Exception | None = None
        for _ in range(attempts):
            backend = self.backends[next(self._turn)]
            url = backend.config.url.rstrip("/") + path
            try:
                async with asyncio.timeout(self._config.first_byte_timeout_s):
                    resp = await self._session.request(method, url, data=body,
                                                       headers=self._headers(backend, headers))
            except TimeoutError:
                backend.failures += 1
                last = UpstreamTimeout(f"backend {backend.name} sent no response headers in time")
                continue
            except aiohttp.ClientError as exc:
                backend.failures += 1
                log.warning("backend %s failed before the first byte: %r", backend.name, exc)
                last = UpstreamUnavailable(f"backend {backend.name} is unreachable")
                continue
            if resp.status in _RETRYABLE and attempts > 1:
                backend.failures += 1
                last = UpstreamUnavailable(f"backend {backend.name} answered {resp.status}")
                resp.release()
                continue
            backend.failures = 0
            return backend, resp
        raise UpstreamUnavailable(f"every backend failed ({attempts} tried); last: {last}")
