"""Cheap guards that veto a semantic hit: the two questions differ in something that matters.

Two questions can be close in embedding space and still want different answers: "balance of
account 1234" and "balance of account 5678", "why is X allowed" and "why is X not allowed".
The embedder is weak exactly there, so these checks run on the text before any score is
trusted. Each guard is a pure function of the two texts' ``Facts`` and names itself in the
refusal reason the edge reports:

- ``numbers``: the numbers written in digits differ ("1,000" = "1000", "2.50" = "2.5").
- ``quoted``: a quoted string of one question does not occur in the other.
- ``negation``: one question is negated and the other is not (not, no, never, n't, without,
  cannot, nothing, nobody, none, neither, nor: counted, compared by parity).
- ``identifier``: an email, URL, @handle, #tag, version string or letters-and-digits code
  (``ORD-1234``, ``v2.3.1``, ``x86_64``) of one question does not occur in the other.
- ``opposite``: a word of one question only and a word of the other only are opposites
  (positive/negative, best/worst, buy/sell, before/after, upload/download…).
- ``symbols``: the two questions' words in another script than Latin ("多少", "심하잖아"),
  symbols ("~", "✢", "ℝ²") or language names with a symbol ("C++", "C#") differ: the word
  checks below see only Latin letters and digits, so "What does 多少 mean?" and "What does
  几 mean?" would otherwise have the same words.
- ``entity``: a capitalised name not at the start of a sentence, or a fully capitalised
  acronym, of one question that does not occur (in any case) in the other (off by default: it costs more true hits than it
  saves false ones on the labeled pairs; see bench/README.md).

``Facts`` are computed once per text (``facts`` is memoised), so a stored candidate costs
nothing the second time. Stdlib only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "ALL_GUARDS",
    "DEFAULT_GUARDS",
    "OPPOSITES",
    "Facts",
    "entity_mismatches",
    "facts",
    "refusal",
]

_QUOTED = re.compile(r'"([^"]{1,200})"|\u201c([^\u201d]{1,200})\u201d|\u2018([^\u2019]{1,200})\u2019'
                     r"|(?<![\w'])'([^']{1,200})'(?!\w)")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_HANDLE = re.compile(r"(?<![\w@])[@#][A-Za-z_]\w{1,30}")
_VERSION = re.compile(r"\bv?\d+(?:\.\d+){2,}\b|\bv\d+(?:\.\d+)*\b", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*")
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\w)|\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9]+n't|[a-z0-9]+|'(?:s|re|ve|ll|d|m)\b")   # "what's" -> what, 's
_CAP_WORD = re.compile(r"\b[A-Z][A-Za-z]*[A-Z]?[a-z]*\b")
_OPENERS = frozenset('.!?:;("\u201c')
_DIGIT = re.compile(r"\d")
_CODE_NAME = re.compile(r"(?<![\w+#])[A-Za-z][+#]+(?![\w+#])")      # C++, C#, F#
_LATIN_END = 0x24F          # letters above Latin Extended-B count as another script

NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "nothing", "nobody", "none",
                       "neither", "nor", "nowhere"})
# Words capitalised only because questions start with them or because of style ("I", "What").
_NOT_ENTITIES = frozenset({
    "i", "i'm", "i've", "i'd", "i'll", "a", "an", "the", "what", "why", "how", "who", "whom", "whose",
    "when", "where", "which", "is", "are", "was", "were", "do", "does", "did", "can", "could",
    "should", "would", "will", "shall", "may", "might", "must", "has", "have", "had", "if", "in",
    "on", "at", "to", "for", "of", "and", "or", "but", "my", "me", "we", "you", "your", "it",
    "its", "this", "that", "there", "any", "some", "best", "good", "new", "vs", "am", "be", "quora",
})


@dataclass(frozen=True, slots=True)
class Facts:
    """What the guards and the verifier read from one question (computed once per text).

    words: lowercased word tokens in order. numbers: normalised numbers written in digits.
    quoted: casefolded quoted strings. negations: how many negation words. identifiers:
    casefolded emails, URLs, handles, versions and codes. entities: casefolded capitalised
    names and acronyms (not counting sentence-initial words). folded: the casefolded text
    with single spaces.
    """

    words: tuple[str, ...]
    numbers: frozenset[str]
    quoted: frozenset[str]
    negations: int
    identifiers: frozenset[str]
    entities: frozenset[str]
    folded: str
    symbols: frozenset[str] = frozenset()


def _is_code(token: str) -> bool:
    """Letters and digits in one token: ``ORD-1234``, ``x86_64``, ``mp3`` (not ``10am``, ``5``)."""
    if token.isalpha() or token.isdigit():
        return False
    if "-" in token or "_" in token:
        return any(c.isalpha() for c in token) and any(c.isdigit() for c in token)
    return token[0].isalpha() and any(c.isdigit() for c in token)


def _number(token: str) -> str:
    token = token.replace(",", "")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    return token.lstrip("0") or "0"


def _words(folded: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(folded.replace("\u2019", "'")))


def _negations(words: Iterable[str]) -> int:
    return sum(1 for w in words if w in NEGATIONS or (w[-1] == "t" and w.endswith("n't")))


def _char_kind(ch: str) -> str | None:
    if ch.isascii():
        return "s" if ch in "~^|" else None
    cat = unicodedata.category(ch)
    if cat[0] == "L" and ord(ch) > _LATIN_END:
        return "w"
    return "s" if cat in ("Sm", "So") else None


def _symbols(text: str) -> frozenset[str]:
    """Runs of non-Latin letters or of symbols, and code names (``c++``); empty for plain text."""
    found = {m.group().casefold() for m in _CODE_NAME.finditer(text)} if ("+" in text or "#" in text) else set()
    if text.isascii() and not any(c in text for c in "~^|"):
        return frozenset(found)
    run, kind = "", None
    for ch in text + " ":
        k = _char_kind(ch)
        if k is not None and (k == kind or not run):
            run, kind = run + ch, k
            continue
        if run:
            found.add(run)
        run, kind = (ch, k) if k is not None else ("", None)
    return frozenset(found)


def _sentence_start(text: str, pos: int) -> bool:
    """True when only spaces and an opening mark separate ``pos`` from a sentence start."""
    i = pos - 1
    while i >= 0 and text[i].isspace():
        i -= 1
    return i < 0 or text[i] in _OPENERS


def _entities(text: str) -> frozenset[str]:
    found = set()
    for m in _CAP_WORD.finditer(text):
        word = m.group()
        low = word.casefold()
        if low in _NOT_ENTITIES or len(word) < 2:
            continue
        if not word.isupper() and _sentence_start(text, m.start()):
            continue
        found.add(low)
    return frozenset(found)


@lru_cache(maxsize=65536)
def facts(text: str) -> Facts:
    """The ``Facts`` of one question; memoised, so a cached candidate is parsed once."""
    text = text.replace('""', '"')       # CSV-escaped quotes, common in exported question logs
    folded = " ".join(text.casefold().split())
    words = _words(folded)
    # Each pattern runs only when the character it needs is there: most questions have none.
    quoted: frozenset[str] = frozenset()
    if any(c in text for c in "\"'\u201c\u2018"):
        quoted = frozenset(q for q in (" ".join(next(g for g in m.groups() if g is not None).casefold().split())
                                       for m in _QUOTED.finditer(text)) if q)
    identifiers: set[str] = set()
    rest = text
    if "://" in text or "www." in folded:
        identifiers |= {m.group().casefold().rstrip(".,;:!?)") for m in _URL.finditer(text)}
        rest = _URL.sub(" ", rest)
    if "@" in text:
        identifiers |= {m.group().casefold() for m in _EMAIL.finditer(rest)}
        rest = _EMAIL.sub(" ", rest)
    if "@" in rest or "#" in rest:
        identifiers |= {m.group().casefold() for m in _HANDLE.finditer(rest)}
    numbers: frozenset[str] = frozenset()
    if _DIGIT.search(rest):
        identifiers |= {m.group().casefold() for m in _VERSION.finditer(rest)}
        identifiers |= {t.casefold() for t in _TOKEN.findall(rest) if _is_code(t)}
        numbers = frozenset(_number(m.group()) for m in _NUMBER.finditer(rest))
    return Facts(
        words=words,
        numbers=numbers,
        quoted=quoted,
        negations=_negations(words),
        identifiers=frozenset(identifiers),
        entities=_entities(text),
        folded=folded,
        symbols=_symbols(text),
    )


def _numbers(a: Facts, b: Facts) -> bool:
    return a.numbers != b.numbers


def _quoted(a: Facts, b: Facts) -> bool:
    return any(q not in b.folded for q in a.quoted) or any(q not in a.folded for q in b.quoted)


def _negation(a: Facts, b: Facts) -> bool:
    return (a.negations % 2) != (b.negations % 2)


def _identifier(a: Facts, b: Facts) -> bool:
    return any(i not in b.folded for i in a.identifiers) or any(i not in a.folded for i in b.identifiers)


def entity_mismatches(a: Facts, b: Facts) -> int:
    """How many capitalised names of either question do not occur (in any case) in the other."""
    if not a.entities and not b.entities:
        return 0
    wa, wb = set(a.words), set(b.words)
    return sum(1 for e in a.entities if e not in wb) + sum(1 for e in b.entities if e not in wa)


_OPPOSITES = (
    "positive negative", "advantage disadvantage", "advantages disadvantages", "pros cons", "best worst",
    "better worse", "good bad", "long short", "longer shorter", "high low", "higher lower", "increase decrease",
    "up down", "before after", "first last", "male female", "men women", "man woman", "boy girl",
    "boys girls", "buy sell", "buying selling", "import export", "win lose", "winning losing", "more less",
    "most least", "maximum minimum", "max min", "rich poor", "old new", "young old", "cheap expensive",
    "easy hard", "easiest hardest", "fast slow", "faster slower", "hot cold", "big small", "bigger smaller",
    "large small", "strong weak", "true false", "legal illegal", "possible impossible", "happy sad",
    "love hate", "start stop", "open close", "on off", "in out", "inside outside", "add remove",
    "enable disable", "allow block", "left right", "north south", "east west", "past future",
    "internal external", "online offline", "private public", "input output", "upload download",
    "send receive", "sender receiver", "client server", "encrypt decrypt", "debit credit", "dark light",
    "success failure", "pass fail", "accept reject", "agree disagree", "like dislike", "always never",
)
OPPOSITES = frozenset(frozenset(p.split()) for p in _OPPOSITES)


def _opposite(a: Facts, b: Facts) -> bool:
    only_a = set(a.words) - set(b.words)
    only_b = set(b.words) - set(a.words)
    return any(frozenset((x, y)) in OPPOSITES for x in only_a for y in only_b)


def _symbols_differ(a: Facts, b: Facts) -> bool:
    return a.symbols != b.symbols


def _entity(a: Facts, b: Facts) -> bool:
    return entity_mismatches(a, b) > 0


ALL_GUARDS: dict[str, Callable[[Facts, Facts], bool]] = {
    "numbers": _numbers,
    "quoted": _quoted,
    "negation": _negation,
    "identifier": _identifier,
    "opposite": _opposite,
    "symbols": _symbols_differ,
    "entity": _entity,
}
DEFAULT_GUARDS: tuple[str, ...] = ("numbers", "quoted", "negation", "identifier", "opposite", "symbols")


def refusal(a: str | Facts, b: str | Facts, guards: Iterable[str] = DEFAULT_GUARDS) -> str | None:
    """The name of the first guard that refuses a hit between two questions, or None.

    ``a`` and ``b`` are texts or their ``facts``; ``guards`` are names from ``ALL_GUARDS``,
    checked in order.
    """
    fa = a if isinstance(a, Facts) else facts(a)
    fb = b if isinstance(b, Facts) else facts(b)
    for name in guards:
        if ALL_GUARDS[name](fa, fb):
            return name
    return None
