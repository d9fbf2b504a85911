"""Services of a throw-away topology as real processes: ``python -m edgecache.cli <service>``.

    with Services(root) as services:
        services.start("origin", ["origin", "--topology", str(topology)], health=origin_url + "/healthz")

Every process logs to ``<root>/<name>.log``; ``start`` waits until its health URL answers 200
(and fails with the log's tail if the process exits first); leaving the block stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["Services", "StackError", "stop_all", "wait_healthy"]


class StackError(RuntimeError):
    """A service did not start, or the cache could not be warmed."""


def wait_healthy(proc: subprocess.Popen[bytes], name: str, url: str, log: Callable[[], str],
                 timeout: float = 90) -> None:
    """Until ``url`` answers 200; ``StackError`` with the service's log when ``proc`` exits first
    or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with status {proc.returncode}:\n{log()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise StackError(f"{name}: {url} not healthy within {timeout:.0f} s:\n{log()}")


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process (last started first), wait up to 15 s each, then kill."""
    for proc in reversed(procs.values()):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    procs.clear()


class Services:
    def __init__(self, root: Path, *, log_level: str = "WARNING") -> None:
        self.root = root
        self.env = {**os.environ, "EDGECACHE_LOG_LEVEL": log_level}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Services:
        return self

    def spawn(self, name: str, args: list[str]) -> None:
        """Start ``edgecache <args>`` without waiting for it."""
        with open(self.root / f"{name}.log", "wb") as log:     # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "edgecache.cli", *args], stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env)

    def start(self, name: str, args: list[str], health: str, timeout: float = 90) -> None:
        self.spawn(name, args)
        self.wait_healthy(name, health, timeout)

    def wait_healthy(self, name: str, url: str, timeout: float = 90) -> None:
        wait_healthy(self.procs[name], name, url, lambda: self.log(name), timeout)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def stop(self) -> None:
        stop_all(self.procs)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
