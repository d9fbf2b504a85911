"""The exact-tier cache key: canonical request → msgpack bytes → XXH3-128.

This module is the reference implementation of the spec in ``docs/cache-key.md``; the
test vectors in ``docs/cache-key-vectors.json`` pin it. In short::

    canonical = {"endpoint": "chat" | "completions",
                 "request":  <body minus TRANSPORT_FIELDS, numbers normalised, keys sorted>,
                 "scope":    {"prefix": None | {"id": ..., "version": ...}, "tenant": ...},
                 "v":        SPEC_VERSION}
    key = xxh3_128(msgpack(canonical))          # 16 bytes, big-endian; text: 32 lowercase hex

Every request field is part of the key except the transport-only ones (a denylist, so an
unknown sampling parameter such as vLLM's ``top_k`` can never be silently ignored). No
defaults are filled in and no strings are Unicode-normalised: both would make two requests
that a server may answer differently share a key.

``canonical_request`` also validates the request shape, so the edge calls it once per request
and turns a :class:`~edgecache.errors.BadRequest` into a 400 before anything else happens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import xxhash

from edgecache.errors import BadRequest

__all__ = [
    "ENDPOINTS",
    "MAX_DEPTH",
    "SPEC_VERSION",
    "TRANSPORT_FIELDS",
    "CacheKey",
    "Scope",
    "cache_key",
    "canonical_bytes",
    "canonical_request",
    "tenant_id",
]

SPEC_VERSION: int = 1
"""Bumped whenever the canonical form changes; part of every key, so old entries just miss."""

ENDPOINTS = ("chat", "completions")
"""``chat`` is ``POST /v1/chat/completions``; ``completions`` is ``POST /v1/completions``."""

TRANSPORT_FIELDS: frozenset[str] = frozenset(
    {
        "stream",  # delivery only: a hit is replayed as JSON or SSE, as the client asks
        "stream_options",  # include_usage: the usage chunk is replayed from the stored answer
        "timeout",
        "request_timeout",
        "user",  # end-user id for abuse monitoring; does not change the output
        "metadata",  # stored-completion metadata (OpenAI); does not change the output
        "store",  # whether OpenAI stores the completion; does not change the output
        "service_tier",  # scheduling class; does not change the output
        "prefix",  # edgecache's prefix reference: enters the key as scope (id + version)
    }
)
"""Top-level request fields left out of the key. Every other field, known or not, is in it."""

MAX_DEPTH: int = 64
"""How deep arrays and objects may nest in a request, the body itself being depth 1; a deeper
body is a 400 (JSON parsers accept far deeper ones, which would exhaust the stack here)."""

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_EXACT = 2**53  # every integer in [-2**53, 2**53] is exactly representable as a float64


@dataclass(frozen=True, slots=True)
class Scope:
    """What, besides the request, an answer belongs to; nothing is served across scopes.

    ``tenant`` is the configured tenant name in topologies that list tenants, otherwise
    :func:`tenant_id` of the API key. ``prefix_id`` and ``prefix_version`` name the registered
    static prefix the request referenced (both or neither); the version is its content hash,
    so a prefix update changes every key that used it.
    """

    tenant: str
    prefix_id: str | None = None
    prefix_version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError(f"Scope.tenant must be a non-empty string, not {self.tenant!r}")
        for part in (self.tenant, self.prefix_id, self.prefix_version):
            if isinstance(part, str) and not part.isascii():
                part.encode("utf-8")  # a lone surrogate cannot be hashed: fail here, not later
        if (self.prefix_id is None) != (self.prefix_version is None):
            raise ValueError("Scope.prefix_id and Scope.prefix_version go together: give both or neither")
        if self.prefix_id is not None and not (
            isinstance(self.prefix_id, str) and isinstance(self.prefix_version, str)
        ):
            raise ValueError("Scope.prefix_id and Scope.prefix_version must be strings")


@dataclass(frozen=True, slots=True)
class CacheKey:
    """A 16-byte XXH3-128 digest (big-endian); ``hex`` is its 32-character text form."""

    digest: bytes

    def __post_init__(self) -> None:
        if type(self.digest) is not bytes or len(self.digest) != 16:
            raise ValueError(f"CacheKey.digest must be 16 bytes, not {self.digest!r}")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> CacheKey:
        """Parse the 32-hex-digit text form (either case); ``ValueError`` on anything else."""
        if not isinstance(text, str) or len(text) != 32 or not text.isascii() or not text.isalnum():
            raise ValueError(f"a cache key is 32 hex digits, not {text!r}")
        return cls(bytes.fromhex(text))  # raises ValueError on a non-hex letter

    def __str__(self) -> str:
        return self.digest.hex()


def tenant_id(api_key: str | None) -> str:
    """The tenant scope of an API key that no configured tenant lists.

    ``"key:"`` + the first 32 hex digits of SHA-256 of the key's UTF-8 bytes, so the key itself
    never appears in a cache scope, a log line or a metric label; no key at all (``None`` or
    ``""``) is ``"anonymous"``.
    """
    if not api_key:
        return "anonymous"
    return "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def canonical_request(endpoint: str, body: object) -> dict:
    """Validate ``body`` and return its canonical form: transport fields dropped, keys sorted
    (recursively), integral floats turned into ints.

    Raises :class:`BadRequest` (``param`` names the field) when the body is not the shape the
    endpoint takes, holds a value JSON cannot carry (NaN, infinity, a non-string object key,
    a lone surrogate) or nests arrays and objects deeper than :data:`MAX_DEPTH`. Raises ``ValueError`` for an unknown ``endpoint`` (a caller's bug).
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
    if type(body) is not dict:
        if not isinstance(body, Mapping):
            raise BadRequest("The request body must be a JSON object.")
        body = dict(body)
    request: dict = {}
    try:
        keys = sorted(body)
    except TypeError:
        raise BadRequest("The request body's keys must be strings.") from None
    for name in keys:
        if type(name) is not str:
            raise BadRequest(f"The request body's keys must be strings, not {name!r}.")
        if name in TRANSPORT_FIELDS:
            continue
        try:
            if not name.isascii():
                _check_unicode(name)
            request[name] = _normalise(body[name], 2)
        except _Invalid as exc:
            exc.path.append(name)
            raise BadRequest(exc.message, param=_param(exc.path)) from None
    _check_shape(endpoint, body, request)
    return request


def canonical_bytes(endpoint: str, body: object, scope: Scope) -> bytes:
    """The msgpack encoding of ``{"endpoint", "request", "scope", "v"}``: the bytes that get hashed."""
    prefix = None
    if scope.prefix_id is not None:
        prefix = {"id": scope.prefix_id, "version": scope.prefix_version}
    document = {
        "endpoint": endpoint,
        "request": canonical_request(endpoint, body),
        "scope": {"prefix": prefix, "tenant": scope.tenant},
        "v": SPEC_VERSION,
    }
    return msgpack.packb(document, use_bin_type=True)


def cache_key(endpoint: str, body: object, scope: Scope) -> CacheKey:
    """The exact-tier key of a request within a scope (see ``docs/cache-key.md``)."""
    return CacheKey(xxhash.xxh3_128_digest(canonical_bytes(endpoint, body, scope)))


class _Invalid(Exception):
    """A value the canonical form cannot hold; ``path`` is filled in innermost-first on unwind."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str | int] = []


def _param(path: list[str | int]) -> str:
    text = ""
    for part in reversed(path):
        if type(part) is int:
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _normalise(value: object, depth: int) -> object:
    # ``depth`` is the nesting depth ``value`` has if it is an array or an object.
    # Exact-type checks first: JSON parsers only ever produce these six types.
    kind = type(value)
    if kind is str:
        if not value.isascii():  # type: ignore[attr-defined]
            _check_unicode(value)  # type: ignore[arg-type]
        return value
    if kind is dict:
        return _normalise_object(value, depth)  # type: ignore[arg-type]
    if kind is list:
        return _normalise_array(value, depth)  # type: ignore[arg-type]
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            return value
        raise _Invalid(f"The integer {value} is outside the range a request may carry [-2**63, 2**64-1].")
    if kind is float:
        return _normalise_float(value)  # type: ignore[arg-type]
    if value is None or kind is bool:
        return value
    return _normalise_other(value, depth)


def _normalise_float(value: float) -> int | float:
    if value.is_integer():
        if -_EXACT <= value <= _EXACT:
            return int(value)  # 1.0 -> 1, -0.0 -> 0
        return value
    if math.isfinite(value):
        return value
    raise _Invalid(f"{value} is not a JSON number; NaN and infinities are not allowed.")


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Invalid(f"Arrays and objects may nest at most {MAX_DEPTH} deep in a request.")


def _normalise_object(value: dict, depth: int) -> dict:
    _check_depth(depth)
    try:
        keys = sorted(value)
    except TypeError:
        raise _Invalid("Object keys must be strings.") from None
    out = {}
    for key in keys:
        if type(key) is not str:
            if not isinstance(key, str):
                raise _Invalid(f"Object keys must be strings, not {key!r}.")
            key = str(key)
        if not key.isascii():
            _check_unicode(key)
        try:
            out[key] = _normalise(value[key], depth + 1)
        except _Invalid as exc:
            exc.path.append(key)
            raise
    return out


def _normalise_array(value: list, depth: int) -> list:
    _check_depth(depth)
    out = []
    for index, item in enumerate(value):
        try:
            out.append(_normalise(item, depth + 1))
        except _Invalid as exc:
            exc.path.append(index)
            raise
    return out


def _normalise_other(value: object, depth: int) -> object:
    # Python callers (the SDK) may hand in subclasses, other mappings or tuples.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return _normalise(str(value), depth)
    if isinstance(value, int):
        return _normalise(int(value), depth)
    if isinstance(value, float):
        return _normalise(float(value), depth)
    if isinstance(value, Mapping):
        return _normalise_object(dict(value), depth)
    if isinstance(value, list | tuple):
        return _normalise_array(list(value), depth)
    raise _Invalid(f"A value of type {type(value).__name__} cannot appear in a JSON request.")


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("Strings must be valid Unicode (a lone surrogate was found).") from None


def _check_shape(endpoint: str, body: dict, request: dict) -> None:
    model = request.get("model")
    if type(model) is not str or not model:
        problem = "is missing" if "model" not in request else "must be a non-empty string"
        raise BadRequest(f"'model' {problem}.", param="model")
    if endpoint == "chat":
        _check_messages(request.get("messages"), "messages" in request)
    else:
        _check_prompt(request.get("prompt"), "prompt" in request)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise BadRequest(f"'stream' must be a boolean, not {stream!r}.", param="stream")
    if "n" in request:
        n = request["n"]
        if n is not None and (type(n) is not int or n < 1):
            raise BadRequest(f"'n' must be a positive integer, not {n!r}.", param="n")


def _check_messages(messages: object, present: bool) -> None:
    if not present:
        raise BadRequest("'messages' is missing.", param="messages")
    if type(messages) is not list or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects.", param="messages")
    for index, message in enumerate(messages):
        if type(message) is not dict:
            raise BadRequest(
                f"'messages[{index}]' must be an object with a 'role'.", param=f"messages[{index}]"
            )
        if type(message.get("role")) is not str:
            problem = "is missing" if "role" not in message else "must be a string"
            raise BadRequest(f"'messages[{index}].role' {problem}.", param=f"messages[{index}].role")


def _check_prompt(prompt: object, present: bool) -> None:
    if not present:
        raise BadRequest("'prompt' is missing.", param="prompt")
    if type(prompt) is str:
        return
    if type(prompt) is list and prompt:
        first = type(prompt[0])
        if first is str and all(type(p) is str for p in prompt):
            return
        if first is int and all(type(p) is int for p in prompt):
            return
        if first is list and all(
            type(p) is list and p and all(type(t) is int for t in p) for p in prompt
        ):
            return
    raise BadRequest(
        "'prompt' must be a string, a non-empty array of strings, an array of token ids "
        "or an array of arrays of token ids.",
        param="prompt",
    )
