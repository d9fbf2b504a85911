"""``python -m origin.sim``: run simulated vLLM-like servers.

    python -m origin.sim --port 8201                      # one server, default SimConfig
    python -m origin.sim --topology deploy/local.toml --index 2   # the third [sim] server
    python -m origin.sim --topology deploy/local.toml --all       # all [sim] servers, one process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys

from edgecache.config import SimConfig, load_config
from edgecache.errors import ConfigError
from origin.sim.server import serve_sim, serve_sims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m origin.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", help="topology TOML file; its [sim] section is used")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, help="serve the N-th sim (port base_port + N)")
    which.add_argument("--all", action="store_true", help="serve all [sim] servers")
    parser.add_argument("--host", help="bind address (default from the topology)")
    parser.add_argument("--port", type=int, help="port (default base_port + index)")
    parser.add_argument("--time-scale", type=float, help="override sim.time_scale")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.topology, os.environ).sim if args.topology else SimConfig()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.time_scale is not None:
        config = dataclasses.replace(config, time_scale=args.time_scale)
    if args.host:
        config = dataclasses.replace(config, host=args.host)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.all:
        coro = serve_sims(config)
    else:
        port = args.port if args.port is not None else config.base_port + (args.index or 0)
        coro = serve_sim(config, config.host, port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
