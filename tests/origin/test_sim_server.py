"""Simulated servers run on real ports, one or many per process."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
from aiohttp.test_utils import unused_port

from edgecache.config import SimConfig
from origin.sim import serve_sim, serve_sims


async def wait_healthy(url: str) -> None:
    """Poll ``/health`` until the server answers (bounded by the caller's deadline)."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)


async def test_serve_sim_answers_on_its_port_until_cancelled():
    port = unused_port()
    task = asyncio.create_task(serve_sim(SimConfig(time_scale=0.0), "127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"
    await asyncio.wait_for(wait_healthy(url), 5)
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions",
                                json={"model": "sim-llm", "prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url + "/health"):
                raise AssertionError("still serving after cancel")
        except aiohttp.ClientConnectionError:
            pass


async def test_serve_sims_runs_count_servers_on_consecutive_ports():
    base = unused_port()
    config = SimConfig(count=2, base_port=base, time_scale=0.0)
    task = asyncio.create_task(serve_sims(config))
    for port in (base, base + 1):
        await asyncio.wait_for(wait_healthy(f"http://127.0.0.1:{port}"), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_module_entry_point_serves_one_sim():
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "origin.sim", "--port", str(port), "--time-scale", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(wait_healthy(f"http://127.0.0.1:{port}"), 20)
    finally:
        proc.terminate()
        await proc.wait()
