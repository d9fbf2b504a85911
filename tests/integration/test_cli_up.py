"""`edgecache up` starts a whole topology as processes, reports it, and stops it on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import async_openai

pytestmark = pytest.mark.integration


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening_sockets(port: int) -> int:
    """Sockets in LISTEN state on ``port`` (Linux /proc/net/tcp)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A")


def worker_requests(folder: Path, workers: int) -> list[int]:
    """Requests each worker counted, from the files it publishes for /metrics."""
    out = []
    for i in range(workers):
        try:
            doc = json.loads((folder / f"worker-{i}.json").read_text())
        except (OSError, ValueError):
            out.append(0)
            continue
        out.append(sum(doc["requests"].values()))
    return out


def scraped_requests(text: str) -> dict[str, float]:
    """edgecache_requests_total summed by cache_result."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgecache_requests_total":
                result = sample.labels["cache_result"]
                totals[result] = totals.get(result, 0) + sample.value
    return totals


def test_config_check_names_the_key_at_fault(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[edges]]\nregion = "x"\nport = "eighty"\n')
    run = subprocess.run([sys.executable, "-m", "edgecache.cli", "config", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "edges[0].port" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "edgecache.cli", "config", "check", "deploy/local.toml"],
                        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert ok.returncode == 0 and "3 edges, 4 backends" in ok.stdout


async def test_up_serves_the_topology_and_stops_cleanly(tmp_path: Path) -> None:
    origin, sim, east, west = free_ports(4)
    topology = tmp_path / "topology.toml"
    text = f"""
[origin]
port = {origin}
[sim]
count = 1
base_port = {sim}
time_scale = 0.0
[[edges]]
region = "us-east"
port = {east}
data_dir = "{tmp_path / 'us-east'}"
[[edges]]
region = "eu-west"
port = {west}
workers = 2
data_dir = "{tmp_path / 'eu-west'}"
"""
    await asyncio.to_thread(topology.write_text, text)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edgecache.cli", "up", "--topology",
                                                str(topology), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not (lines and "ready" in lines[-1]):
                line = (await proc.stdout.readline()).decode()
                assert line, f"edgecache up exited early: {lines}"
                lines.append(line.strip())
        text = "\n".join(lines)
        for port in (origin, sim, east, west):
            assert f"http://127.0.0.1:{port}" in text
        async with await async_openai(f"http://127.0.0.1:{east}/v1") as c:
            messages = [{"role": "user", "content": "ping"}]
            first = await c.chat.completions.create(model="sim-llm", messages=messages)
            again = await c.chat.completions.with_raw_response.create(model="sim-llm", messages=messages)
        assert "; hit;" in again.headers["Cache-Status"]
        assert again.parse().choices[0].message.content == first.choices[0].message.content
        # eu-west runs two worker processes: both listen once the stack says it is ready.
        assert await asyncio.to_thread(listening_sockets, west) == 2
        async with await async_openai(f"http://127.0.0.1:{west}/v1") as c:
            west_answer = await c.chat.completions.create(model="sim-llm", messages=messages)
        assert west_answer.choices[0].message.content == first.choices[0].message.content
        # /metrics answers for the node, whichever worker the scrape reaches.
        url = f"http://127.0.0.1:{west}"
        for i in range(40):   # a new connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.post(f"{url}/v1/chat/completions", json={
                        "model": "sim-llm", "messages": [{"role": "user", "content": f"q{i % 10}"}]}) as r:
                    assert r.status == 200
        served = await asyncio.to_thread(worker_requests, tmp_path / "eu-west" / "metrics", 2)
        async with asyncio.timeout(30):   # the other worker publishes within a second
            while sum(served) != 41:
                served = await asyncio.to_thread(worker_requests, tmp_path / "eu-west" / "metrics", 2)
        assert all(served), served   # both workers answered some
        for _ in range(10):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(f"{url}/metrics") as r:
                    text = await r.text()
            totals = scraped_requests(text)
            assert sum(totals.values()) == 41, totals
            assert (totals["hit"], totals["miss"]) == (30, 11)   # "ping" and q0…q9 were misses here
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 30)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
    assert b"stopped" in rest


def test_an_origin_without_inference_servers_is_a_configuration_error(tmp_path: Path) -> None:
    topology = tmp_path / "no-backends.toml"
    topology.write_text('[sim]\ncount = 0\n[[edges]]\nregion = "x"\n')
    run = subprocess.run([sys.executable, "-m", "edgecache.cli", "origin", "--topology", str(topology)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "needs an inference server" in run.stderr
    assert "Traceback" not in run.stderr


def test_calibrate_checks_a_policy_on_labeled_pairs(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"a": f"How do I reset my password {i}?", "b": f"How can I reset my password {i}?", "label": 1,
             "cosine": 0.97} for i in range(20)]
    rows += [{"a": f"What is the balance of account {i}?", "b": f"Close account {i + 1}", "label": 0,
              "cosine": 0.5} for i in range(20)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    run = subprocess.run([sys.executable, "-m", "edgecache.cli", "calibrate", str(pairs), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr   # no false hit above any target on these pairs
    assert "1.000%" in run.stdout and "threshold" in run.stdout


def test_a_service_beyond_loopback_on_development_secrets_says_so(tmp_path: Path) -> None:
    origin, sim = free_ports(2)
    topology = tmp_path / "open.toml"
    topology.write_text(f'[origin]\nhost = "0.0.0.0"\nport = {origin}\n[sim]\ncount = 1\nbase_port = {sim}\n'
                        '[[edges]]\nregion = "x"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgecache.cli", "origin", "--topology", str(topology)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()   # the first thing it says
        assert "development default of admin_token, node_token, webhook_secret" in line
        assert "EDGECACHE_ADMIN_TOKEN" in line
    finally:
        proc.terminate()
        proc.communicate(timeout=30)   # and closes the pipe
