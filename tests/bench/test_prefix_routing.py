"""The prefix-routing benchmark's plumbing on tiny workloads: what it counts and writes, never how fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from bench import prefix_routing
from bench.prefix_routing import OracleRouter, build_prompts, run_policy, workloads
from origin.sim.app import create_sim_app

pytestmark = pytest.mark.integration


def test_prompts_share_their_group_prefix_and_come_shuffled() -> None:
    w = workloads("tiny")[0]
    prompts = build_prompts(w)
    assert len(prompts) == w.groups * w.prompts_per_group
    by_group: dict[int, set[str]] = {}
    for p in prompts:
        by_group.setdefault(p.group, set()).add(p.route.split("\n")[0])
    assert all(len(prefixes) == 1 for prefixes in by_group.values())       # one prefix per group
    assert len({next(iter(v)) for v in by_group.values()}) == w.groups       # distinct across groups
    assert [p.group for p in prompts] != sorted(p.group for p in prompts)
    assert build_prompts(w) == prompts                                       # seeded


def test_oracle_sends_each_group_home_and_spreads_groups_evenly() -> None:
    prompts = build_prompts(workloads("tiny")[0])
    oracle = OracleRouter(prompts, 4)
    homes = {p.group: oracle.decide(p.route, [0] * 4, range(4)).order[0] for p in prompts}
    assert all(homes[p.group] == p.group % 4 for p in prompts)
    assert sorted(list(homes.values()).count(i) for i in range(4)) == [2, 2, 2, 2]


async def test_prefix_aware_beats_round_robin_on_hit_rate_against_real_simulated_servers() -> None:
    w = workloads("tiny")[0]
    servers = [TestServer(create_sim_app(w.sim(time_scale=0.0, max_running=8)), host="127.0.0.1") for _ in range(4)]
    for s in servers:
        await s.start_server()
    try:
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        prompts = build_prompts(w)
        rr = await run_policy("round_robin", prompts, urls, concurrency=4)
        pa = await run_policy("prefix_aware", prompts, urls, concurrency=4)
    finally:
        for s in servers:
            await s.close()
    for r in (rr, pa):
        assert r["errors"] == 0 and r["requests"] == len(prompts)
        assert sum(r["requests_per_backend"]) == len(prompts)
        assert 0 <= r["prefix_hit_rate"] <= 1 and r["ttft_p50_s"] <= r["ttft_p99_s"]
        # the servers' counters and the clients' usage.cached_tokens tell the same story
        assert r["prefix_hit_rate"] == pytest.approx(r["cached_token_share"], abs=1e-3)
    assert pa["decisions"]["short_match"] == w.groups
    assert pa["prefix_hit_rate"] > rr["prefix_hit_rate"]


def test_the_command_line_writes_the_table_json_and_chart(tmp_path: Path, capsys) -> None:
    out, chart = tmp_path / "out.json", tmp_path / "chart.png"
    status = prefix_routing.main(["--tiny", "--time-scale", "0", "--concurrency", "4",
                                  "--json", str(out), "--chart", str(chart)])
    assert status == 0
    report = json.loads(out.read_text())
    assert set(report["policies"]) == {"round_robin", "least_loaded", "prefix_aware", "oracle"}
    for r in report["policies"].values():
        assert {"prefix_hit_rate", "ttft_p50_s", "ttft_p99_s", "throughput_rps", "max_load_ratio"} <= set(r)
    assert set(report["workloads"]) == {"generated_shared_prefix", "large_prefix_pool"}
    assert all("goal" in e for e in report["workloads"].values())
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "prefix_aware" in table and "goal:" in table
