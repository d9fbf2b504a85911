"""The bus contract, shared by the embedded (HTTP) and NATS JetStream buses.

The origin's SQLite log is the truth: every event has a monotonic ``seq``. An edge worker holds a
``Subscription`` and asks it, again and again, for what follows the last sequence it applied::

    batch = await subscription.fetch(after=applied, wait_s=...)

A ``Batch`` carries the events after ``after`` (in order, possibly not all of them) and what the
origin's log held when it answered: ``first_seq`` (0 when unknown) and ``last_seq``. The origin
looks at its log after the fetch began: once the edge has applied everything up to ``last_seq``,
it is known to be current as of the moment it called ``fetch`` — that is the heartbeat its
staleness fence counts from (a heartbeat that arrives without the events before it counts for
nothing). Every fetch also tells the origin what the edge
has applied (``Report``), which is how ``?wait=true`` learns that every edge has caught up.

An edge is one worker process of one node of a region; ``edge_id`` is
``<region>/<instance>/<worker>`` (instance: the pod or host).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Batch", "BusError", "Report", "Subscription", "edge_id", "sign", "signed_by"]


def sign(secret: str, payload: bytes) -> str:
    """HMAC-SHA256 of ``payload`` keyed with the node token: what bus messages carry, so that a
    publisher on the broker without the token can neither forge events nor heartbeats."""
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def signed_by(secret: str, payload: bytes, signature: str | None) -> bool:
    """Whether ``signature`` is ``sign(secret, payload)``. Anything else is False, never an error:
    a signature that is not ASCII (``hmac.compare_digest`` raises TypeError on one) is wrong too."""
    return (isinstance(signature, str) and signature.isascii()
            and hmac.compare_digest(sign(secret, payload), signature))


class BusError(Exception):
    """The bus could not be reached or answered nonsense; the edge retries and stays unfenced
    only as long as its staleness bound allows."""


def edge_id(region: str, instance: str, worker: int) -> str:
    return f"{region}/{instance}/{worker}"


@dataclass(frozen=True, slots=True)
class Report:
    """What an edge tells the origin with every fetch: ``applied`` sequence and its staleness
    bound (the origin takes an edge that has not been answered for that long as fenced).
    ``incarnation``: random per process start, so a report still in flight when the process
    left cannot bring it back, while the same edge restarted is welcome at once."""

    edge: str
    applied: int
    max_staleness_s: float
    incarnation: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"edge": self.edge, "applied": self.applied, "max_staleness_s": self.max_staleness_s,
                "incarnation": self.incarnation}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        """``ValueError`` for anything that is not a report."""
        try:
            edge, applied, bound = data["edge"], data["applied"], data["max_staleness_s"]
        except (KeyError, TypeError):
            raise ValueError("a report needs edge, applied and max_staleness_s") from None
        if (not isinstance(edge, str) or not 0 < len(edge) <= 200 or not isinstance(applied, int)
                or isinstance(applied, bool) or applied < 0 or not isinstance(bound, int | float)
                or isinstance(bound, bool) or not 0 < bound <= 86400):
            raise ValueError("a report's edge is 1-200 characters, applied a sequence, max_staleness_s seconds")
        incarnation = data.get("incarnation", "")
        if not isinstance(incarnation, str) or len(incarnation) > 64:
            raise ValueError("a report's incarnation is at most 64 characters")
        return cls(edge, applied, float(bound), incarnation)


@dataclass(frozen=True, slots=True)
class Batch:
    events: list[dict[str, Any]] = field(default_factory=list)   # ``Event.to_json()`` each, seq ascending
    first_seq: int = 0     # oldest event the origin's log still holds (0: unknown or empty)
    last_seq: int = 0      # newest event the origin's log held when it answered


class Subscription(Protocol):
    """One edge worker's end of the bus."""

    async def start(self) -> None: ...

    async def fetch(self, after: int, wait_s: float) -> Batch:
        """Events after ``after``, waiting up to ``wait_s`` for one; raises ``BusError``."""
        ...

    async def acknowledge(self, applied: int) -> None:
        """``applied`` is durable at the edge: the bus may forget what came before it."""
        ...

    async def leave(self) -> None:
        """The edge has stopped serving for good (a clean shutdown): the origin need not wait for it."""
        ...

    async def close(self) -> None: ...
