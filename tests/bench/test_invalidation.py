"""bench.invalidation runs a real topology and writes the JSON the issue asks for."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import invalidation
from tests.conftest import require_service


@pytest.mark.parametrize("bus", ["embedded", "nats"])
async def test_a_short_run_writes_percentiles_per_bus_and_edge_count(tmp_path, bus: str) -> None:
    if bus == "nats":
        await asyncio.to_thread(require_service, "NATS", "127.0.0.1", 4222)
    out = tmp_path / "inv.json"
    code = await asyncio.to_thread(invalidation.main, ["--edges", "2", "--events", "5", "--buses", bus,
                                                       "--json", str(out)])
    assert code == 0
    cell = (await asyncio.to_thread(lambda: json.loads(out.read_text())))[bus]["edges_2"]
    assert cell["events"] == 5 and 0 < cell["p50_ms"] <= cell["p99_ms"] <= cell["max_ms"]
