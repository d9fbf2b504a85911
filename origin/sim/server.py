"""Run simulated servers on TCP ports until cancelled.

``serve_sim(config, host, port)`` runs one; ``serve_sims(config)`` runs ``config.count`` of
them in this process on ``base_port``, ``base_port + 1``, … (they share one event loop,
which suits a simulator that mostly sleeps). ``python -m origin.sim`` runs one from the
command line, for a subprocess per server.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from edgecache.config import SimConfig
from origin.sim.app import create_sim_app

__all__ = ["serve_sim", "serve_sims"]

log = logging.getLogger(__name__)


async def serve_sim(config: SimConfig, host: str, port: int) -> None:
    """Serve one simulated server on ``host:port`` until the task is cancelled."""
    runner = web.AppRunner(create_sim_app(config), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("sim %s serving %s on http://%s:%d", config.model, config.model, host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_sims(config: SimConfig) -> None:
    """Serve ``config.count`` simulated servers from ``config.base_port`` until cancelled."""
    async with asyncio.TaskGroup() as tg:
        for i in range(config.count):
            tg.create_task(serve_sim(config, config.host, config.base_port + i))
