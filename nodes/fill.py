"""Filling a miss from the origin: one origin request per key, shared by every waiter.

A ``Fill`` runs as its own task, independent of the request that started it, so that a
leader's disconnect does not fail its followers. Streaming waiters read the chunks live as
they arrive; the others wait for the whole answer. The fill is cancelled when its last
waiter leaves, and only a complete, successful answer becomes an ``Entry``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson

from edgecache.entry import Entry, Usage
from edgecache.errors import EdgeCacheError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from edgecache.stream import SSEParser, assemble, is_usage_chunk

log = logging.getLogger("edgecache.node.fill")

__all__ = ["Fill", "FillRequest", "UpstreamReply", "check_not_refused"]


def check_not_refused(status: int) -> None:
    """A 401 or 403 from the origin refuses this edge (its node token), not the client: log the
    cause and raise ``UpstreamUnavailable`` (a 502) instead of passing the origin's answer on."""
    if status in (401, 403):
        log.error("the origin refused this edge's node token (%d): check EDGECACHE_NODE_TOKEN", status)
        raise UpstreamUnavailable("the origin refused this edge")


@dataclass(frozen=True, slots=True)
class FillRequest:
    """What the origin is asked, and how the answer is stored."""

    key: bytes
    endpoint: str          # "chat" | "completions"
    path: str              # "/v1/chat/completions" | "/v1/completions"
    body: dict[str, Any]   # the client's request; ``stream`` is set per the fill's mode
    stream: bool
    headers: dict[str, str]
    store: bool
    ttl: float
    tenant: str
    tags: frozenset[str]
    max_entry_bytes: int
    prefix_id: str | None = None
    prefix_version: str | None = None
    semantic_scope: bytes | None = None   # set when the answer may serve paraphrases
    query: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A non-200 answer from the origin, passed through to every waiter and never stored."""

    status: int
    body: bytes
    content_type: str
    retry_after: str | None = None    # the origin's Retry-After (on a 429 or 503), passed on


class Fill:
    """One in-flight origin request and the waiters sharing it."""

    def __init__(self, req: FillRequest, session: aiohttp.ClientSession, timeout: float,
                 on_entry: Callable[[Entry], None], clock: Callable[[], float] = time.time,
                 prepare: Callable[[], Awaitable[None]] | None = None,
                 on_done: Callable[[Fill], None] | None = None) -> None:
        self.req = req
        # (payload as sent, payload without the "usage" key, is the usage-only chunk)
        self.chunks: list[tuple[bytes, bytes, bool]] = []
        self.started: asyncio.Future[UpstreamReply | None] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()
        self.entry: Entry | None = None
        self.body: bytes | None = None
        self.failure: EdgeCacheError | None = None
        self.waiters = 0
        self.origin_age = 0      # the origin's ``Age``: seconds its shield had held the answer
        self.shield_hit = False  # the origin answered from its shield (``X-EdgeCache-Shield: hit``)
        self._session = session
        self._timeout = timeout   # for the first byte, then between stream chunks
        self._deadline: asyncio.Timeout | None = None
        self._on_entry = on_entry
        self._clock = clock
        self._prepare = prepare
        self._on_done = on_done
        self._progress: asyncio.Future[None] = self.started.get_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    # -- waiters ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"fill-{self.req.key.hex()}")

    def join(self, tags: frozenset[str] = frozenset(), ttl: float | None = None) -> None:
        """One more waiter. Its ``tags`` go onto the stored answer too (a purge of any of them
        must reach the answer it was served), and a shorter ``ttl`` wins."""
        self.waiters += 1
        if not tags <= self.req.tags:
            self.req = replace(self.req, tags=self.req.tags | tags)
        if ttl is not None and ttl < self.req.ttl:
            self.req = replace(self.req, ttl=ttl)

    def leave(self) -> None:
        """A waiter is gone; the last one to leave cancels an unfinished fill."""
        self.waiters -= 1
        if self.waiters <= 0 and not self.done.is_set() and self._task is not None:
            self._task.cancel()

    async def wait_started(self) -> UpstreamReply | None:
        """None once the origin answered 200; the reply to pass through otherwise."""
        return await asyncio.shield(self.started)

    async def live_chunks(self) -> AsyncIterator[tuple[bytes, bytes, bool]]:
        """Every chunk so far, then each new one as it arrives, until the fill ends."""
        i = 0
        while True:
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
            if self.done.is_set():
                return
            await asyncio.shield(self._progress)

    async def wait(self) -> None:
        await self.done.wait()

    # -- the origin request ----------------------------------------------------------

    def _wake(self) -> None:
        progress, self._progress = self._progress, self.started.get_loop().create_future()
        progress.set_result(None)

    def _begin(self, reply: UpstreamReply | None) -> None:
        if not self.started.done():
            self.started.set_result(reply)

    def _heard(self) -> None:
        """The origin sent something: it has ``timeout`` seconds again (first byte, then each chunk)."""
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._timeout)

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(self._timeout) as self._deadline:
                if self._prepare is not None:
                    await self._prepare()
                await self._request()
        except asyncio.CancelledError:
            self.failure = UpstreamError("the request was cancelled", code="cancelled")
            raise
        except TimeoutError:
            self.failure = UpstreamTimeout("the origin did not answer in time")
        except aiohttp.ClientError as exc:
            self.failure = UpstreamUnavailable(f"the origin is unreachable: {exc.__class__.__name__}")
        except EdgeCacheError as exc:
            self.failure = exc
        except (ValueError, KeyError, TypeError) as exc:
            self.failure = UpstreamError(f"the origin sent a malformed answer: {exc}")
        finally:
            if self.failure is not None and not self.started.done():
                self.started.set_exception(self.failure)
                self.started.exception()   # retrieved: waiters re-raise it themselves
            self.done.set()
            self._wake()
            if self._on_done is not None:
                self._on_done(self)

    async def _request(self) -> None:
        req = self.req
        body = dict(req.body)
        body["stream"] = req.stream
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        async with self._session.post(req.path, data=orjson.dumps(body), headers=req.headers) as resp:
            self._heard()
            check_not_refused(resp.status)
            if resp.status != 200:
                self._begin(UpstreamReply(resp.status, await resp.read(),
                                          resp.headers.get("Content-Type", "application/json"),
                                          resp.headers.get("Retry-After")))
                return
            self.shield_hit = resp.headers.get("X-EdgeCache-Shield") == "hit"
            age = resp.headers.get("Age", "").strip()
            self.origin_age = int(age) if age.isdigit() else 0
            if req.stream:
                self._begin(None)
                await self._read_stream(resp)
            else:
                raw = await resp.read()
                parsed = orjson.loads(raw)
                if not isinstance(parsed, dict) or "choices" not in parsed:
                    raise UpstreamError("the origin sent an answer without choices")
                self.body = raw
                self._begin(None)
                self._finish(raw, None, parsed.get("usage"))

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> None:
        parser = SSEParser()
        parsed: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        finished = False
        async for data in resp.content.iter_any():
            self._heard()
            for payload in parser.feed(data):
                if payload == b"[DONE]":
                    finished = True
                    continue
                chunk = orjson.loads(payload)
                if not isinstance(chunk, dict):
                    raise UpstreamError("the origin sent a malformed stream chunk")
                if "error" in chunk:
                    self.chunks.append((payload, payload, False))
                    self._wake()
                    raise UpstreamError("the origin reported an error inside the stream")
                if is_usage_chunk(chunk):
                    usage = chunk["usage"]
                    self.chunks.append((payload, payload, True))
                    continue
                parsed.append(chunk)
                # We asked the origin for usage; a client that did not sees chunks without the key.
                plain = orjson.dumps({k: v for k, v in chunk.items() if k != "usage"}) if "usage" in chunk else payload
                self.chunks.append((payload, plain, False))
            self._wake()
        if not finished:
            raise UpstreamUnavailable("the origin's stream ended before [DONE]")
        body = orjson.dumps(assemble(self.req.endpoint, parsed, usage))
        self.body = body
        self._finish(body, tuple(plain for _, plain, usage_only in self.chunks if not usage_only), usage)

    def _finish(self, body: bytes, chunks: tuple[bytes, ...] | None, usage: dict[str, Any] | None) -> None:
        req = self.req
        if not req.store:
            return
        u = usage or {}
        details = u.get("prompt_tokens_details") or {}
        # made when the origin's shield stored it: its age does not restart here (nor its TTL)
        entry = Entry(key=req.key, endpoint=req.endpoint, body=body, chunks=chunks,
                      created=self._clock() - self.origin_age,
                      ttl=req.ttl, tenant=req.tenant, tags=req.tags,
                      semantic_scope=req.semantic_scope, query=req.query,
                      prefix_id=req.prefix_id, prefix_version=req.prefix_version,
                      usage=Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                                  completion_tokens=int(u.get("completion_tokens") or 0),
                                  cached_tokens=int(details.get("cached_tokens") or 0)))
        if entry.size <= req.max_entry_bytes:
            self.entry = entry
            self._on_entry(entry)
