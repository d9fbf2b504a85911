"""The aiohttp floor: a server that answers the benchmark's POST with fixed bytes and does
nothing else, run the way ``edgecache node`` runs (uvloop, no access log, SO_REUSEPORT
processes). Its figures bound what any aiohttp edge node can reach on this machine, so the
gap between it and the edge row is the cost of the edge's own work on a hit.

    python -m bench.floor --port PORT [--body-bytes N]     one process (the harness starts N)
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from bench.stack import StackError, free_port, listening_sockets
from edgecache.cli import run_app

__all__ = ["FloorServer", "create_floor_app", "main"]


def create_floor_app(body: bytes) -> web.Application:
    """POST anywhere: read the body, answer ``body`` as JSON with a hit ``Cache-Status``."""
    headers = {"Cache-Status": "floor; hit; detail=memory"}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", answer)
    return app


def _serve(port: int, body: bytes) -> None:
    """Serve the floor exactly as ``edgecache node`` serves an edge (same loop, runner, socket)."""
    run_app(lambda: create_floor_app(body), "127.0.0.1", port, reuse_port=True)


@dataclass
class FloorServer:
    """``workers`` floor processes sharing one port, started by ``__enter__``."""

    workers: int = 1
    body_bytes: int = 480
    url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> FloorServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "bench.floor", "--port", str(port), "--body-bytes", str(self.body_bytes)]
        try:
            self.procs = [subprocess.Popen(argv) for _ in range(self.workers)]
            deadline = time.monotonic() + 30
            while listening_sockets(port) not in (-1, self.workers) or not self._healthy():
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise StackError(f"the floor server on port {port} did not start")
                time.sleep(0.05)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
            return resp.status == 200
        return False

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, default=480, help="size of the JSON answer (480)")
    args = parser.parse_args(argv)
    filler = max(0, args.body_bytes - len(b'{"content":""}'))
    _serve(args.port, b'{"content":"' + b"x" * filler + b'"}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
