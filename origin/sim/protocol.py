"""Parse OpenAI chat and completion request bodies into one ``GenerationRequest``.

Only what changes the simulated answer or its cost is kept (model, prompts, ``n``,
``max_tokens``, ``temperature``, ``seed``, ``stop``, streaming, ``echo``); every other
OpenAI or vLLM sampling field is accepted and ignored, as vLLM ignores unknown ones.
Malformed input raises ``BadRequest`` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from edgecache.errors import BadRequest
from origin.sim import tokenizer

__all__ = ["GenerationRequest", "Prompt", "parse_body", "parse_chat", "parse_completion"]

MAX_N = 128
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt as token ids, with its text when it was given as text."""

    tokens: tuple[int, ...]
    text: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: Literal["chat", "completion"]
    model: str
    prompts: tuple[Prompt, ...]
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    for i, m in enumerate(messages):
        _check_message(m, f"messages[{i}]")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    text = tokenizer.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    return GenerationRequest(kind="chat", model=_model(body),
                             prompts=(Prompt(tuple(tokenizer.encode(text)), text),),
                             max_tokens=max_tokens, **_sampling(body))


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    prompts = _prompts(body.get("prompt"))
    echo = _bool(body, "echo", False)
    if echo and any(p.text is None for p in prompts):
        raise BadRequest("'echo' needs text prompts on this server.", param="echo")
    return GenerationRequest(kind="completion", model=_model(body), prompts=prompts,
                             max_tokens=_opt_int(body, "max_tokens", 1), echo=echo,
                             **_sampling(body))


def _prompts(prompt: Any) -> tuple[Prompt, ...]:
    bad = BadRequest("'prompt' must be a string, an array of strings, an array of token ids "
                     "or an array of arrays of token ids, and not empty.", param="prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Prompt(tuple(tokenizer.encode(item)), item))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            out.append(Prompt(tuple(item)))
        else:
            raise bad
    return tuple(out)


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32


def _check_message(m: Any, where: str) -> None:
    if not isinstance(m, dict):
        raise BadRequest(f"'{where}' must be an object.", param=where)
    role = m.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise BadRequest(f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}.",
                         param=f"{where}.role")
    content = m.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of parts.",
                         param=f"{where}.content")
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str):
            raise BadRequest(f"'{where}.content' parts must be text parts on this server.",
                             param=f"{where}.content")


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required.", param="model")
    return model


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    n = _opt_int(body, "n", 1) or 1
    if n > MAX_N:
        raise BadRequest(f"'n' must be at most {MAX_N}.", param="n")
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    elif isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
            0 <= temperature <= 2):
        raise BadRequest("'temperature' must be a number between 0 and 2.", param="temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer.", param="seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or an array of strings.", param="stop")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest("Stream options can only be defined when `stream=True`.",
                             param="stream_options")
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return {"n": n, "temperature": float(temperature), "seed": seed, "stop": stops,
            "stream": stream, "include_usage": include_usage}


def _opt_int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"'{key}' must be an integer >= {minimum}.", param=key)
    return value


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be a boolean.", param=key)
    return value
