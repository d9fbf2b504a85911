"""Deterministic answers: the same prompt and sampling parameters always give the same text.

An answer opens with a marker naming the prompt, ``sim-answer <8 hex>`` (the hex is
``answer_marker(model, prompt_tokens)``), then words picked by hashing the prompt, the
seed, the temperature and the choice index. Greedy decoding (temperature 0) ignores the
seed and gives every choice the same text, as a real server does.

Every piece of the answer is exactly one token of ``origin.sim.tokenizer``, so the answer
re-tokenises to the ids the engine generated, and a later turn that quotes it extends the
cached prefix, as with a real model. An answer has exactly ``max_tokens`` tokens unless a
``stop`` string appears: then the text ends before it and ``finish_reason`` is "stop".
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from origin.sim.tokenizer import token_id

__all__ = ["Answer", "answer_marker", "make_answer"]

_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "which but they all can more one were their there when has been would will its what if "
    "about so into than some other time only could new these two may first then do any like "
    "cache edge prefix token model answer region origin block stream latency request"
).split()


def answer_marker(model: str, prompt_tokens: Sequence[int]) -> str:
    """8 hex digits naming (model, prompt): the second word of every answer to that prompt."""
    return f"{_prompt_hash(model, prompt_tokens) & 0xFFFFFFFF:08x}"


def _prompt_hash(model: str, prompt_tokens: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(array("Q", prompt_tokens).tobytes(), seed=_model_seed(model))


def _model_seed(model: str) -> int:
    return xxhash.xxh3_64_intdigest(model.encode())


@dataclass(frozen=True, slots=True)
class Answer:
    """One choice: the text of each generated token (trimmed at a stop string), their ids,
    and why generation ended ("length" or "stop")."""

    pieces: tuple[str, ...]
    token_ids: tuple[int, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _pieces(model: str, prompt_tokens: Sequence[int], n: int, seed: int | None,
            temperature: float, index: int) -> list[str]:
    marker = answer_marker(model, prompt_tokens)
    out = ["sim", "-", "answer", f" {marker}"][:n]
    if temperature == 0:
        key = f"greedy|{marker}"
    else:
        key = f"{marker}|{seed}|{temperature!r}|{index}"
    k = xxhash.xxh3_64_intdigest(key.encode(), seed=_prompt_hash(model, prompt_tokens))
    for i in range(len(out), n):
        h = xxhash.xxh3_64_intdigest(i.to_bytes(4, "little"), seed=k)
        if i > 5 and h % 9 == 0 and out[-1] not in (".", ","):
            out.append("." if h % 2 else ",")
        else:
            out.append(" " + _WORDS[(h >> 8) % len(_WORDS)])
    return out


def make_answer(model: str, prompt_tokens: Sequence[int], *, max_tokens: int,
                seed: int | None = None, temperature: float = 1.0, index: int = 0,
                stop: Sequence[str] = ()) -> Answer:
    """The answer to one prompt for one choice ``index``."""
    pieces = _pieces(model, prompt_tokens, max_tokens, seed, temperature, index)
    full = "".join(pieces)
    # Generation stops at the first stop string to complete; the text ends where it starts.
    found = [(i + len(s), i) for s in stop if s and (i := full.find(s)) >= 0]
    if not found:
        return Answer(tuple(pieces), tuple(token_id(p.strip()) for p in pieces), "length")
    stop_end, cut = min(found)
    kept: list[str] = []
    pos = 0
    for piece in pieces:
        kept.append(piece[:max(cut - pos, 0)])
        pos += len(piece)
        if pos >= stop_end:
            break
    ids = tuple(token_id(p.strip()) for p in pieces[:len(kept)])
    return Answer(tuple(kept), ids, "stop")
