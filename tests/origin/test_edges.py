"""The origin's view of the edges: when an edge is safe for an event, with a stepped clock."""

from __future__ import annotations

import asyncio

import pytest

from edgecache.bus.base import Report
from origin.edges import EdgeRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def states(registry: EdgeRegistry, seq: int) -> dict[str, str]:
    return {e["edge"]: e["state"] for e in registry.snapshot(seq)}


def test_an_edge_is_safe_once_it_applied_or_its_bound_passed_since_last_heard() -> None:
    clock = Clock()
    registry = EdgeRegistry(clock=clock)
    registry.report(Report("a/0", 4, 10.0))
    registry.report(Report("b/0", 5, 10.0))
    assert states(registry, 5) == {"a/0": "pending", "b/0": "applied"}
    clock.now += 10.0
    assert states(registry, 5)["a/0"] == "pending"     # exactly at the bound: it may still serve
    clock.now += 0.01
    assert states(registry, 5)["a/0"] == "fenced"
    registry.report(Report("a/0", 4, 10.0))            # heard again, still behind: pending again
    assert states(registry, 5)["a/0"] == "pending"


async def test_wait_returns_when_the_last_edge_reports() -> None:
    registry = EdgeRegistry()
    registry.report(Report("a/0", 0, 60.0))
    waiting = asyncio.create_task(registry.wait(1, 30.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    registry.report(Report("a/0", 1, 60.0))
    complete, edges = await waiting
    assert complete and edges == [{"edge": "a/0", "applied_seq": 1, "state": "applied"}]


async def test_wait_gives_up_at_its_timeout_and_says_who_is_pending() -> None:
    registry = EdgeRegistry()
    registry.report(Report("a/0", 0, 60.0))
    complete, edges = await registry.wait(1, 0.0)
    assert not complete and edges[0]["state"] == "pending"


def test_members_survive_a_restart_as_pending_until_they_report() -> None:
    registry = EdgeRegistry()
    assert registry.report(Report("a/0", 7, 30.0)) is True     # a new member
    assert registry.report(Report("a/0", 8, 30.0)) is False    # progress only
    restarted = EdgeRegistry()
    restarted.restore(registry.members())
    assert states(restarted, 1) == {"a/0": "pending"}


def test_a_node_that_leaves_is_no_longer_waited_for() -> None:
    registry = EdgeRegistry()
    registry.report(Report("a/h/0", 0, 60.0, "first"))
    assert registry.leave("a/h/0", "first") is True and registry.leave("a/h/0", "first") is False
    assert registry.snapshot(1) == []
    registry.report(Report("a/h/0", 0, 60.0, "first"))     # still in flight when it left: ignored
    assert registry.snapshot(1) == []
    registry.report(Report("a/h/0", 0, 60.0, "second"))    # the same node restarted: waited for again
    assert [e["state"] for e in registry.snapshot(1)] == ["pending"]


def test_the_registry_is_bounded_and_forgets_long_silent_edges() -> None:
    clock = Clock()
    registry = EdgeRegistry(clock=clock, max_edges=2, forget_after_s=100.0)
    for name in ("a/0", "b/0", "c/0"):
        registry.report(Report(name, 1, 10.0))
        clock.now += 1
    assert sorted(registry.members()) == ["b/0", "c/0"]
    clock.now += 200
    assert registry.snapshot(1) == []


@pytest.mark.parametrize("bad", [{}, {"edge": "", "applied": 1, "max_staleness_s": 1},
                                 {"edge": "a", "applied": -1, "max_staleness_s": 1},
                                 {"edge": "a", "applied": True, "max_staleness_s": 1},
                                 {"edge": "a", "applied": 1, "max_staleness_s": 0}])
def test_bad_reports_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        Report.from_json(bad)
