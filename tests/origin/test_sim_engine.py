"""The simulated engine's scheduler and cost model, driven by injected time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from edgecache.config import SimConfig
from edgecache.errors import BadRequest, Overloaded
from origin.sim.engine import Engine, Ticket

BS = 16


@dataclass
class Recorder:
    """An observer that keeps what the engine reports."""

    admits: list[tuple[int, int]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    finishes: list[tuple[int, str]] = field(default_factory=list)

    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.admits.append((prompt_tokens, cached_tokens))

    def on_first_token(self, ttft_s: float) -> None:
        self.ttfts.append(ttft_s)

    def on_finish(self, generated_tokens: int, finish_reason: str) -> None:
        self.finishes.append((generated_tokens, finish_reason))


class SteppedTime:
    """A fake clock that each simulated sleep advances instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Gate:
    """A sleep that holds every simulated delay until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = asyncio.Event()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.entered.set()
        await self.open.wait()


def config(**kw) -> SimConfig:
    base = dict(block_size=BS, kv_capacity_blocks=64, prefill_tokens_per_s=1000.0,
                decode_step_s=0.01, decode_step_per_seq_s=0.001, max_running=4, max_waiting=8,
                time_scale=1.0)
    return SimConfig(**(base | kw))


def prompt(stem: int, n: int) -> list[int]:
    return [stem] * n


async def run_to_end(ticket: Ticket, n: int, reason: str = "length") -> list[int]:
    try:
        out = [i async for i in ticket.run(list(range(n)))]
        ticket.close(reason)
        return out
    finally:
        ticket.close()


async def test_ttft_is_uncached_prompt_tokens_over_prefill_rate():
    t, rec = SteppedTime(), Recorder()
    engine = Engine(config(), observer=rec, sleep=t.sleep, clock=t.clock)
    [a] = engine.submit([(prompt(1, 500), 4)])
    await run_to_end(a, 4)
    [b] = engine.submit([(prompt(1, 500), 4)])
    await run_to_end(b, 4)
    assert rec.admits == [(500, 0), (500, 496)]
    assert rec.ttfts[0] == pytest.approx(0.5)
    assert rec.ttfts[1] == pytest.approx(0.004)


async def test_each_further_token_costs_one_decode_step():
    t = SteppedTime()
    engine = Engine(config(), sleep=t.sleep, clock=t.clock)
    [a] = engine.submit([(prompt(1, 100), 5)])
    assert await run_to_end(a, 5) == [0, 1, 2, 3, 4]
    assert t.sleeps == pytest.approx([0.1, 0.01, 0.01, 0.01, 0.01])


async def test_decode_step_grows_with_running_sequences():
    gate = Gate()
    engine = Engine(config(), sleep=gate.sleep)
    tickets = engine.submit([(prompt(i, 10), 3) for i in range(3)])
    runs = [asyncio.create_task(run_to_end(tk, 3)) for tk in tickets]
    gate.open.set()
    await asyncio.gather(*runs)
    # the first decode steps happen while all three run
    assert max(gate.sleeps) == pytest.approx(0.01 + 2 * 0.001)
    assert engine.num_running == 0


async def test_time_scale_multiplies_every_delay():
    t = SteppedTime()
    engine = Engine(config(time_scale=0.5), sleep=t.sleep, clock=t.clock)
    [a] = engine.submit([(prompt(1, 100), 2)])
    await run_to_end(a, 2)
    assert t.sleeps == pytest.approx([0.05, 0.005])


async def test_time_scale_zero_never_sleeps():
    t = SteppedTime()
    engine = Engine(config(time_scale=0.0), sleep=t.sleep, clock=t.clock)
    [a] = engine.submit([(prompt(1, 100), 8)])
    await run_to_end(a, 8)
    assert t.sleeps == []


async def test_sequences_beyond_max_running_wait_in_fifo_order():
    gate = Gate()
    engine = Engine(config(max_running=1), sleep=gate.sleep)
    tickets = [engine.submit([(prompt(i, 10), 2)])[0] for i in range(3)]
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    order: list[int] = []

    async def run(k: int) -> None:
        await tickets[k].admitted()
        order.append(k)
        await run_to_end(tickets[k], 2)

    runs = [asyncio.create_task(run(k)) for k in (2, 1, 0)]
    gate.open.set()
    await asyncio.gather(*runs)
    assert order == [0, 1, 2]


async def test_queueing_time_counts_in_ttft():
    t, rec = SteppedTime(), Recorder()
    engine = Engine(config(max_running=1), observer=rec, sleep=t.sleep, clock=t.clock)
    a, b = engine.submit([(prompt(1, 100), 3), (prompt(2, 100), 3)])
    await run_to_end(a, 3)  # 0.1 prefill + 2 decode steps
    await run_to_end(b, 3)
    assert rec.ttfts == pytest.approx([0.1, 0.12 + 0.1])


async def test_full_queue_refuses_with_overloaded():
    engine = Engine(config(max_running=1, max_waiting=2))
    engine.submit([(prompt(1, 10), 1)])
    engine.submit([(prompt(2, 10), 1), (prompt(3, 10), 1)])
    with pytest.raises(Overloaded):
        engine.submit([(prompt(4, 10), 1)])
    assert engine.num_waiting == 2


async def test_a_request_is_refused_whole_when_its_choices_overflow_the_queue():
    engine = Engine(config(max_running=2, max_waiting=1))
    with pytest.raises(Overloaded):
        engine.submit([(prompt(1, 10), 1)] * 4)
    assert (engine.num_running, engine.num_waiting) == (0, 0)
    engine.submit([(prompt(1, 10), 1)] * 3)
    assert (engine.num_running, engine.num_waiting) == (2, 1)


async def test_a_budget_larger_than_the_kv_cache_is_a_bad_request():
    engine = Engine(config(kv_capacity_blocks=4))
    with pytest.raises(BadRequest, match="KV cache"):
        engine.submit([(prompt(1, 60), 5)])
    engine.submit([(prompt(1, 60), 4)])


async def test_head_of_queue_waits_for_kv_blocks_even_with_a_free_slot():
    engine = Engine(config(kv_capacity_blocks=4, time_scale=0.0))
    [a] = engine.submit([(prompt(1, 40), 8)])  # 3 blocks
    [b] = engine.submit([(prompt(2, 30), 2)])  # 2 blocks: must wait for a's
    [c] = engine.submit([(prompt(3, 4), 1)])  # would fit, but first come, first served
    assert (engine.num_running, engine.num_waiting) == (1, 2)
    await run_to_end(a, 8)
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    assert await b.admitted() == 0 and await c.admitted() == 0


async def test_closing_a_waiting_ticket_leaves_the_queue():
    engine = Engine(config(max_running=1, time_scale=0.0))
    [a] = engine.submit([(prompt(1, 10), 1)])
    [b] = engine.submit([(prompt(2, 10), 1)])
    [c] = engine.submit([(prompt(3, 10), 1)])
    b.close()
    assert engine.num_waiting == 1
    a.close()
    assert await c.admitted() == 0
    with pytest.raises(RuntimeError):
        await b.admitted()


async def test_closing_a_running_ticket_frees_slot_and_blocks_and_counts_an_abort():
    gate, rec = Gate(), Recorder()
    engine = Engine(config(max_running=1), observer=rec, sleep=gate.sleep)
    [a] = engine.submit([(prompt(1, 100), 10)])
    [b] = engine.submit([(prompt(2, 10), 1)])
    run = asyncio.create_task(run_to_end(a, 10, "length"))
    await asyncio.wait_for(gate.entered.wait(), 5)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert rec.finishes == [(0, "abort")]
    assert engine.num_running == 1  # b took the slot
    assert await b.admitted() == 0
    b.close()
    assert engine.kv_usage == 0.0


async def test_wait_until_wakes_on_state_changes():
    engine = Engine(config(max_running=1, time_scale=0.0))
    waiter = asyncio.create_task(engine.wait_until(lambda: engine.num_waiting == 1))
    await asyncio.sleep(0)
    assert not waiter.done()
    engine.submit([(prompt(1, 10), 1)])
    engine.submit([(prompt(2, 10), 1)])
    await asyncio.wait_for(waiter, 5)
