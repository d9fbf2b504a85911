"""The simulated engine: admission, a FIFO waiting queue, the KV cache and the cost model.

A request's sequences are submitted at once (``Engine.submit``, synchronous, all or
nothing): each becomes a ``Ticket``. A ticket runs when a running slot is free
(``max_running``) and the KV cache can hold it; until then it waits in FIFO order, and a
full queue (``max_waiting``) refuses the request with ``Overloaded`` (429). A ticket whose
budget can never fit the KV cache is refused with ``BadRequest`` (400).

Cost model, every delay multiplied by ``time_scale`` (0: no sleeping at all)::

    first token  = queueing + uncached prompt tokens / prefill_tokens_per_s
    each further = decode_step_s + decode_step_per_seq_s * (running sequences - 1)

``Ticket.close`` frees the slot and the blocks and lets the queue move; callers close in a
``finally`` so a client that disconnects frees everything. ``sleep`` and ``clock`` are
injected so tests can hold requests or step time without waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from edgecache.config import SimConfig
from edgecache.errors import BadRequest, Overloaded
from origin.sim.kvcache import PrefixCache

__all__ = ["Engine", "EngineObserver", "Ticket"]


class EngineObserver(Protocol):
    """What the engine reports, for metrics."""

    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None: ...

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_finish(self, generated_tokens: int, finish_reason: str) -> None: ...


class _NoObserver:
    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def on_first_token(self, ttft_s: float) -> None:
        pass

    def on_finish(self, generated_tokens: int, finish_reason: str) -> None:
        pass


_WAITING, _RUNNING, _CLOSED = "waiting", "running", "closed"


class Ticket:
    """One sequence in the engine: waiting, then running, then closed."""

    __slots__ = ("_admitted", "_engine", "arrival", "cached_tokens", "generated", "max_new_tokens",
                 "prompt", "seq_id", "state")

    def __init__(self, engine: Engine, seq_id: int, prompt: Sequence[int], max_new_tokens: int,
                 arrival: float) -> None:
        self._engine = engine
        self._admitted = asyncio.Event()
        self.seq_id = seq_id
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.arrival = arrival
        self.state = _WAITING
        self.cached_tokens = 0
        self.generated = 0

    async def admitted(self) -> int:
        """Wait for a running slot and KV blocks; returns the prompt's cached token count."""
        await self._admitted.wait()
        if self.state != _RUNNING:
            raise RuntimeError(f"sequence {self.seq_id} was closed before it ran")
        return self.cached_tokens

    async def run(self, output: Sequence[int]) -> AsyncIterator[int]:
        """Generate ``output`` (token ids): yields each token's index once it is produced."""
        await self.admitted()
        engine = self._engine
        if len(output) > self.max_new_tokens:
            raise ValueError("output is longer than the sequence's max_new_tokens")
        for i, token in enumerate(output):
            if i == 0:
                await engine._pause(engine.prefill_s(len(self.prompt) - self.cached_tokens))
            else:
                await engine._pause(engine.decode_step_s())
            if self.state != _RUNNING:
                raise RuntimeError(f"sequence {self.seq_id} was closed while running")
            engine.kv.append(self.seq_id, token)
            self.generated = i + 1
            if i == 0:
                engine.observer.on_first_token(engine.clock() - self.arrival)
            engine._notify()
            yield i

    def close(self, finish_reason: str = "abort") -> None:
        """Leave the engine (idempotent): free the slot, the blocks, or the queue place."""
        if self.state == _CLOSED:
            return
        self._engine._close(self, finish_reason)


class Engine:
    """Scheduler and KV cache of one simulated GPU server."""

    def __init__(
        self,
        config: SimConfig,
        *,
        observer: EngineObserver | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = PrefixCache(config.kv_capacity_blocks, config.block_size)
        self.observer: EngineObserver = observer or _NoObserver()
        self.clock = clock
        self._sleep = sleep
        self._ids = itertools.count(1)
        self._waiting: deque[Ticket] = deque()
        self._running = 0
        self._changed = asyncio.Event()

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    def prefill_s(self, uncached_tokens: int) -> float:
        rate = self.config.prefill_tokens_per_s
        return uncached_tokens / rate if rate > 0 else 0.0

    def decode_step_s(self) -> float:
        c = self.config
        return c.decode_step_s + c.decode_step_per_seq_s * max(self._running - 1, 0)

    def submit(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[Ticket]:
        """Queue ``(prompt tokens, max_new_tokens)`` sequences together, or refuse them all.

        Raises ``BadRequest`` when one can never fit the KV cache, ``Overloaded`` when the
        ones that cannot start at once would overflow the waiting queue.
        """
        c = self.config
        for prompt, max_new in sequences:
            need = self.kv.blocks_needed(len(prompt) + max_new)
            if need > self.kv.capacity:
                raise BadRequest(
                    f"The request needs {need} KV cache blocks ({len(prompt)} prompt tokens + "
                    f"{max_new} completion tokens) but the cache holds {self.kv.capacity} "
                    f"blocks of {c.block_size} tokens. Please reduce the length of the "
                    f"prompt or completion.")
        free_slots = 0 if self._waiting else max(c.max_running - self._running, 0)
        would_wait = max(len(sequences) - free_slots, 0)
        if would_wait and len(self._waiting) + would_wait > c.max_waiting:
            raise Overloaded(
                f"The server is busy: {self._running} requests running, "
                f"{len(self._waiting)} waiting (at most {c.max_waiting}). Please retry.")
        now = self.clock()
        tickets = [Ticket(self, next(self._ids), prompt, max_new, now)
                   for prompt, max_new in sequences]
        self._waiting.extend(tickets)
        self._admit_waiting()
        self._notify()
        return tickets

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked after every state change."""
        while not predicate():
            await self._changed.wait()

    def reset_prefix_cache(self) -> bool:
        return self.kv.pool.reset()

    async def _pause(self, seconds: float) -> None:
        seconds *= self.config.time_scale
        if seconds > 0:
            await self._sleep(seconds)

    def _admit_waiting(self) -> None:
        while self._waiting and self._running < self.config.max_running:
            ticket = self._waiting[0]
            cached = self.kv.allocate(ticket.seq_id, ticket.prompt, ticket.max_new_tokens)
            if cached is None:
                break  # first come, first served: the head waits for blocks
            self._waiting.popleft()
            self._running += 1
            ticket.state = _RUNNING
            ticket.cached_tokens = cached
            ticket._admitted.set()
            self.observer.on_admit(len(ticket.prompt), cached)

    def _close(self, ticket: Ticket, finish_reason: str) -> None:
        if ticket.state == _WAITING:
            self._waiting.remove(ticket)
        else:
            self.kv.free(ticket.seq_id)
            self._running -= 1
            self.observer.on_finish(ticket.generated, finish_reason)
        ticket.state = _CLOSED
        ticket._admitted.set()
        self._admit_waiting()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
