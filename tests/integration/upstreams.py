"""Misbehaving and controllable inference servers for integration tests (real aiohttp apps)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web


class Gate:
    """An OpenAI-compatible server that forwards to a real one, holding each request until opened."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.opened = asyncio.Event()
        self.arrived = 0
        self.arrival = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.arrived += 1
        self.arrival.set()
        await self.opened.wait()
        async with aiohttp.ClientSession() as s, s.post(self.target + request.path, data=body,
                                                        headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


def chunk(content: str, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 1, "model": "sim-llm",
        "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}],
    }) + b"\n\n"


class _ChatUpstream:
    """A fake chat server: counts requests (body read), then ``answer`` says what happens."""

    requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        return await self.answer(request)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class CutStream(_ChatUpstream):
    """Streams two chunks, then either drops the connection or waits for ``release``."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("partial "))
        await resp.write(chunk("answer"))
        if self.hold:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            await resp.write(chunk("", "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        assert request.transport is not None
        request.transport.close()   # the stream ends without [DONE]
        return resp


class Failing(_ChatUpstream):
    """Answers every completion with the given status and an OpenAI-style error."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def answer(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "model overloaded", "type": "server_error",
                                            "param": None, "code": None}}, status=self.status)


class Dropping(_ChatUpstream):
    """Holds every completion until ``release``, then drops the connection without an answer."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        await self.release.wait()
        assert request.transport is not None
        request.transport.close()
        return web.Response()


class Trickle(_ChatUpstream):
    """Streams ``count`` chunks ``gap_s`` apart, then finishes: a long answer that never pauses long."""

    def __init__(self, count: int, gap_s: float) -> None:
        self.count = count
        self.gap_s = gap_s

    async def answer(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.count):
            await resp.write(chunk(f"w{i} "))
            await asyncio.sleep(self.gap_s)
        await resp.write(chunk("", "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
