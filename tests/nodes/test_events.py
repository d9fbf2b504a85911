"""The edge's follower: order, idempotence, resets and the staleness fence, over a scripted bus."""

from __future__ import annotations

from edgecache.bus.base import Batch
from nodes.events import EventFollower


class ScriptedBus:
    def __init__(self, *batches: Batch) -> None:
        self.batches = list(batches)
        self.asked: list[int] = []
        self.acked: list[int] = []

    async def start(self) -> None:
        pass

    async def fetch(self, after: int, wait_s: float) -> Batch:
        self.asked.append(after)
        return self.batches.pop(0)

    async def acknowledge(self, applied: int) -> None:
        self.acked.append(applied)

    async def close(self) -> None:
        pass


def ev(seq: int) -> dict:
    return {"seq": seq, "tags": [f"doc:{seq}"], "keys": [], "prefixes": [], "all": False, "soft": False}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def follower(tmp_path, bus: ScriptedBus, clock: Clock | None = None) -> tuple[EventFollower, list]:
    applied: list = []

    async def apply(event: dict) -> None:
        applied.append(event["seq"])

    async def purge_all() -> None:
        applied.append("all")

    f = EventFollower(bus, str(tmp_path), apply, purge_all, max_staleness_s=10.0, clock=clock or Clock())
    await f.start()
    return f, applied


async def test_events_apply_once_in_order_and_the_position_survives_a_restart(tmp_path) -> None:
    bus = ScriptedBus(Batch([ev(1), ev(2)], 1, 2), Batch([ev(2), ev(3)], 1, 3))
    f, applied = await follower(tmp_path, bus)
    await f.poll_once(0)
    await f.poll_once(0)
    assert applied == [1, 2, 3] and bus.acked == [2, 3]
    again, _ = await follower(tmp_path, ScriptedBus())
    assert again.applied == 3


async def test_a_heartbeat_counts_only_once_the_edge_has_caught_up(tmp_path) -> None:
    clock = Clock()
    bus = ScriptedBus(Batch([ev(1)], 1, 5), Batch([ev(2), ev(3), ev(4), ev(5)], 1, 5))
    f, _ = await follower(tmp_path, bus, clock)
    assert f.fenced()                      # never heard: fenced from the start
    clock.now = 1.0
    await f.poll_once(0)                   # the origin holds up to 5, the edge only got 1
    assert f.fenced() and f.last_contact is None
    clock.now = 2.0
    await f.poll_once(0)
    assert not f.fenced() and f.last_contact == 2.0   # current as of when the fetch began
    clock.now = 12.5
    assert f.fenced()


async def test_a_log_that_no_longer_reaches_back_purges_everything(tmp_path) -> None:
    bus = ScriptedBus(Batch([ev(50)], 50, 50))
    f, applied = await follower(tmp_path, bus)
    await f.poll_once(0)
    assert applied == ["all", 50] and f.applied == 50


async def test_a_log_behind_the_edge_means_the_origin_lost_it_purge_and_start_over(tmp_path) -> None:
    bus = ScriptedBus(Batch([ev(1), ev(2)], 1, 2), Batch([ev(1)], 1, 1))
    f, applied = await follower(tmp_path, bus)
    await f.poll_once(0)
    await f.poll_once(0)
    assert applied == [1, 2, "all", 1] and f.applied == 1
