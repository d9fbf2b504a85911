"""The simulated GPU inference server's HTTP API: an OpenAI-compatible, vLLM-like aiohttp app.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE stream),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, vLLM names),
``POST /reset_prefix_cache`` (vLLM's admin route, used by benchmarks between runs).

The ``traceparent`` and ``X-Request-Id`` of the last 64 completion requests are kept in
``app[TRACES]`` (newest last), so tests can follow a trace to the backend.

Errors are OpenAI-style bodies (``edgecache.errors``): 400 for bad JSON, a bad field, a
prompt too long for ``max_model_len`` or for the whole KV cache; 404 for an unknown model
(as vLLM); 429 with ``Retry-After`` when the waiting queue is full.

A client that disconnects, even while queued, cancels its handler (``handler_cancellation``
is set on the app), which closes its tickets: slots and KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

from aiohttp import web

from edgecache.config import SimConfig
from edgecache.errors import BadRequest, EdgeCacheError, NotFound
from origin.sim import responses
from origin.sim.answer import Answer, make_answer
from origin.sim.engine import Engine, Ticket
from origin.sim.metrics import CONTENT_TYPE, SimMetrics
from origin.sim.protocol import GenerationRequest, parse_body, parse_chat, parse_completion
from origin.sim.responses import Choice, Reply

__all__ = ["CONFIG", "ENGINE", "METRICS", "TRACES", "create_sim_app"]

CONFIG = web.AppKey("sim_config", SimConfig)
ENGINE = web.AppKey("sim_engine", Engine)
METRICS = web.AppKey("sim_metrics", SimMetrics)
# (traceparent, X-Request-Id) of recent completion requests, bounded.
TRACES = web.AppKey("sim_traces", deque[tuple[str | None, str | None]])

MAX_BODY_BYTES = 32 * 1024 * 1024


def create_sim_app(
    config: SimConfig,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """One simulated server. ``sleep`` and ``clock`` are for tests that hold or step time."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES,
                          handler_args={"handler_cancellation": True})
    metrics = SimMetrics(config.model)
    engine = Engine(config, observer=metrics, sleep=sleep, clock=clock)
    metrics.watch(engine)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[TRACES] = deque(maxlen=64)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
    return app


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgeCacheError as exc:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return web.Response(status=exc.status, body=exc.body(), headers=headers,
                            content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    card = {"id": config.model, "object": "model", "created": int(time.time()),
            "owned_by": "vllm", "root": config.model, "parent": None,
            "max_model_len": config.max_model_len, "permission": []}
    return web.json_response({"object": "list", "data": [card]})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _reset_prefix_cache(request: web.Request) -> web.Response:
    if not request.app[ENGINE].reset_prefix_cache():
        raise BadRequest("The prefix cache cannot be reset while requests are running.")
    return web.Response()


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat(parse_body(await request.read())))


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(parse_body(await request.read())))


def _budget(config: SimConfig, req: GenerationRequest, prompt_len: int) -> int:
    """Completion tokens a prompt may produce, or BadRequest when it cannot fit the model."""
    limit = config.max_model_len
    if prompt_len >= limit:
        raise BadRequest(f"This model's maximum context length is {limit} tokens. However, "
                         f"your request has {prompt_len} input tokens. Please reduce the "
                         f"length of the input.", param="messages" if req.kind == "chat" else
                         "prompt")
    if req.max_tokens is None:
        return max(1, min(config.default_max_tokens, limit - prompt_len))
    if prompt_len + req.max_tokens > limit:
        raise BadRequest(f"This model's maximum context length is {limit} tokens. However, "
                         f"you requested {prompt_len + req.max_tokens} tokens ({prompt_len} in "
                         f"the input, {req.max_tokens} in the completion). Please reduce the "
                         f"length of the input or completion.", param="max_tokens")
    return req.max_tokens


async def _generate(request: web.Request, req: GenerationRequest) -> web.StreamResponse:
    config, engine = request.app[CONFIG], request.app[ENGINE]
    request.app[TRACES].append((request.headers.get("traceparent"), request.headers.get("X-Request-Id")))
    if req.model != config.model:
        raise NotFound(f"The model `{req.model}` does not exist.", param="model",
                       code="model_not_found")
    answers: list[Answer] = []
    specs: list[tuple[Sequence[int], int]] = []
    for prompt in req.prompts:
        budget = _budget(config, req, len(prompt.tokens))
        for i in range(req.n):
            answers.append(make_answer(config.model, prompt.tokens, max_tokens=budget,
                                       seed=req.seed, temperature=req.temperature, index=i,
                                       stop=req.stop))
            specs.append((prompt.tokens, budget))
    echoes = [(p.text or "") if req.echo else "" for p in req.prompts for _ in range(req.n)]
    tickets = engine.submit(specs)
    reply = Reply.new(req.kind, config.model)
    try:
        if req.stream:
            return await _stream(request, req, reply, tickets, answers, echoes)
        async with aclosing(_progress(tickets, answers)) as events:
            async for _ in events:
                pass
        choices = [Choice(k, echoes[k] + a.text, a.finish_reason) for k, a in enumerate(answers)]
        body = responses.body(reply, choices, _usage(req, tickets, answers))
        return web.Response(body=body, content_type="application/json")
    finally:
        for ticket in tickets:
            ticket.close()


async def _stream(request: web.Request, req: GenerationRequest, reply: Reply,
                  tickets: list[Ticket], answers: list[Answer],
                  echoes: list[str]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    with_usage = req.include_usage
    try:
        if req.kind == "chat":
            for k in range(len(answers)):
                await resp.write(responses.sse(responses.chunk(reply, k, role=True,
                                                               with_usage=with_usage)))
        async with aclosing(_progress(tickets, answers)) as events:
            async for k, i in events:
                if i < 0:
                    event = responses.chunk(reply, k, finish_reason=answers[k].finish_reason,
                                            with_usage=with_usage)
                else:
                    text = (echoes[k] if i == 0 else "") + answers[k].pieces[i]
                    if not text:
                        continue
                    event = responses.chunk(reply, k, text=text, with_usage=with_usage)
                await resp.write(responses.sse(event))
        if with_usage:
            usage = _usage(req, tickets, answers)
            await resp.write(responses.sse(responses.usage_chunk(reply, usage)))
        await resp.write(responses.sse_done())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left; the caller's finally frees its tickets
    return resp


def _usage(req: GenerationRequest, tickets: list[Ticket], answers: list[Answer]) -> dict[str, Any]:
    prompt_tokens = sum(len(p.tokens) for p in req.prompts)
    completion_tokens = sum(len(a.token_ids) for a in answers)
    cached = sum(tickets[j * req.n].cached_tokens for j in range(len(req.prompts)))
    return responses.usage(prompt_tokens, completion_tokens, cached)


async def _progress(tickets: list[Ticket], answers: list[Answer]
                    ) -> AsyncIterator[tuple[int, int]]:
    """Run every ticket; yield ``(choice, token index)`` as tokens come, then ``(choice, -1)``
    once a choice is done (its ticket is closed with the answer's finish reason)."""
    if len(tickets) == 1:
        async for i in tickets[0].run(answers[0].token_ids):
            yield 0, i
        tickets[0].close(answers[0].finish_reason)
        yield 0, -1
        return
    queue: asyncio.Queue[tuple[int, int, Exception | None]] = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            async for i in tickets[k].run(answers[k].token_ids):
                queue.put_nowait((k, i, None))
        except Exception as exc:
            queue.put_nowait((k, -1, exc))
        else:
            tickets[k].close(answers[k].finish_reason)
            queue.put_nowait((k, -1, None))

    tasks = [asyncio.create_task(pump(k)) for k in range(len(tickets))]
    try:
        remaining = len(tasks)
        while remaining:
            k, i, exc = await queue.get()
            if exc is not None:
                raise exc
            remaining -= i < 0
            yield k, i
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
