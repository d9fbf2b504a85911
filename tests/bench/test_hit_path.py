"""The hit-path benchmark's plumbing against a real stack (subprocesses on loopback).

These check what the benchmark counts and reports, never how fast anything is.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bench import hit_path
from bench.hit_path import AUTHORIZATION, PATH, REQUEST
from bench.loadgen import Target, percentile, run_aiohttp_sync
from bench.stack import BenchStack
from bench.wrk import parse_wrk_output, run_wrk, wrk_path

pytestmark = pytest.mark.integration

BODY = orjson.dumps(REQUEST)


def origin_requests(stack: BenchStack) -> float:
    with urllib.request.urlopen(stack.origin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^edgecache_origin_requests_total\{[^}]*\} (\S+)$",
                                                        text, re.MULTILINE))


@pytest.fixture(scope="module")
def stack() -> Iterator[BenchStack]:
    with BenchStack(workers=1) as running:
        status = running.warm(PATH, BODY, AUTHORIZATION)
        assert "; hit;" in status
        yield running


def test_aiohttp_generator_counts_only_real_hits_that_never_reach_the_origin(stack: BenchStack) -> None:
    before = origin_requests(stack)
    result = run_aiohttp_sync(Target("edge", stack.edge_url + PATH, BODY, AUTHORIZATION, expect_hit=True),
                              connections=4, duration_s=0.3)
    assert result.requests > 0
    assert result.good == result.requests
    assert result.errors == 0
    assert origin_requests(stack) == before == 1      # only the warm-up fill went upstream
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.rps == pytest.approx(result.good / result.duration_s)


def test_answers_without_a_hit_cache_status_are_counted_as_non_hits(stack: BenchStack) -> None:
    result = run_aiohttp_sync(Target("sim", stack.sim_url + PATH, BODY, AUTHORIZATION, expect_hit=True),
                              connections=2, duration_s=0.2)
    assert result.requests > 0
    assert result.non_hits == result.requests and result.good == 0 and result.rps == 0


def test_error_statuses_are_counted_apart_from_hits(stack: BenchStack) -> None:
    bad = orjson.dumps({"model": "sim-llm", "messages": "not a list"})
    result = run_aiohttp_sync(Target("edge", stack.edge_url + PATH, bad, AUTHORIZATION, expect_hit=True),
                              connections=2, duration_s=0.2)
    assert result.requests > 0
    assert result.non_200 == result.requests == result.errors and result.non_hits == 0


@pytest.mark.skipif(wrk_path() is None, reason="wrk is not installed (apt-get install wrk)")
def test_wrk_counts_hits_through_its_lua_script(stack: BenchStack) -> None:
    result = run_wrk(Target("edge", stack.edge_url + PATH, BODY, AUTHORIZATION, expect_hit=True),
                     connections=2, duration_s=1, threads=1)
    assert result.generator == "wrk"
    assert result.requests > 0 and result.good == result.requests and result.errors == 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


def test_wrk_result_line_is_read_in_milliseconds() -> None:
    out = ("Running 1s test @ http://x\nEDGECACHE-BENCH requests=1000 duration_us=2000000 good=990 "
           "bad_status=4 not_hit=6 connect_errors=0 read_errors=1 write_errors=0 timeouts=2 p50_us=1500 "
           "p75_us=1800 p90_us=2100 p99_us=4999 max_us=12000 mean_us=1600.5\n")
    result = parse_wrk_output(out, connections=32)
    assert (result.requests, result.good, result.non_200, result.non_hits, result.socket_errors) == (1000, 990, 4, 6, 3)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.5, 4.999, 12.0)
    assert result.rps == 495.0 and result.errors == 13


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([], 50) == 0.0


def test_quick_run_writes_the_report_and_says_which_generator_ran(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hit.json"
    code = hit_path.main(["--generator", "aiohttp", "--duration", "0.3", "--workers", "1",
                          "--connections", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0
    assert "aiohttp" in capsys.readouterr().out
    assert report["load_generator"] == "aiohttp"
    assert (report["workers"], report["connections"], report["duration_s"]) == (1, 4, 0.3)
    assert report["machine"]["cpu_count"] >= 1
    assert report["command"].startswith("python -m bench.hit_path")
    edge, backend, floor = report["edge"], report["backend"], report["floor"]
    for row in (edge, backend, floor):
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "c1_p50_ms", "c1_p99_ms", "requests", "errors"):
            assert isinstance(row[key], int | float), key
        assert row["rps"] > 0 and row["c1_rps"] > 0 and row["errors"] == 0
    assert edge["good"] == edge["requests"] > 0 and edge["non_hits"] == 0
    assert report["edge_by_workers"]["1"] == edge
    assert isinstance(report["goal"]["met"], bool)
