"""The invalidation log: ordered, durable, idempotent by delivery id."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecache.events import Event, PrefixChange
from origin.eventlog import EventLog


def event(source_id: str, **fields) -> Event:
    return Event(seq=0, created=1000.0, source_id=source_id, **fields)


def test_events_get_increasing_sequence_numbers_and_come_back_in_order() -> None:
    log = EventLog(None)
    stored = [log.append(event(f"msg_{i}", tags=frozenset({f"doc:{i}"})))[0] for i in range(5)]
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]
    assert [e.tags for e in log.since(2)] == [frozenset({"doc:2"}), frozenset({"doc:3"}), frozenset({"doc:4"})]
    assert [e.seq for e in log.since(0, limit=2)] == [1, 2]
    assert log.last_seq == 5 and log.first_seq == 1


def test_a_redelivered_source_id_returns_the_original_event() -> None:
    log = EventLog(None)
    first, new = log.append(event("msg_1", tags=frozenset({"doc:1"})))
    again, new_again = log.append(event("msg_1", tags=frozenset({"doc:999"})))
    assert new and not new_again
    assert again == first and again.tags == frozenset({"doc:1"})
    assert log.last_seq == 1 and len(log.since(0)) == 1


def test_sequence_numbers_survive_a_restart(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(event("a"))
    log.append(event("b", keys=frozenset({b"k" * 16}), prefixes=(PrefixChange("kb", "v1", frozenset({"doc:1"}), 10),)))
    log.close()
    reopened = EventLog(tmp_path)
    assert reopened.last_seq == 2
    assert reopened.append(event("c"))[0].seq == 3
    assert reopened.since(1)[0].prefixes == (PrefixChange("kb", "v1", frozenset({"doc:1"}), 10),)
    assert reopened.append(event("a"))[1] is False


def test_trimming_keeps_the_numbering_and_says_how_far_back_the_log_reaches(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    for i in range(10):
        log.append(event(f"m{i}"))
    assert log.trim(keep=3) == 7
    assert log.first_seq == 8 and log.last_seq == 10
    assert [e.seq for e in log.since(0)] == [8, 9, 10]
    assert log.append(event("new"))[0].seq == 11


def test_events_round_trip_through_bytes() -> None:
    e = Event(seq=7, created=1.5, source_id="purge-1", tags=frozenset({"doc:1", "prefix:kb"}),
              keys=frozenset({bytes(16)}), prefixes=(PrefixChange("kb", None),), purge_all=False, soft=True,
              extra={"cms": "contentful"})
    assert Event.from_bytes(e.to_bytes()) == e
    with pytest.raises(ValueError):
        Event.from_bytes(b"\x00garbage")
