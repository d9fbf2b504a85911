"""A throw-away topology for a benchmark: one simulated GPU server, the origin and one edge
node, each its own ``python -m edgecache.cli`` process on a free loopback port, from a
temporary topology file. Used as a context manager; every process is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench.procs import StackError, stop_all, wait_healthy

__all__ = ["BenchStack", "StackError", "descendants", "free_port", "listening_sockets", "post"]

REGION = "bench"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc), e.g. an edge node's worker processes."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on ``port`` (one per SO_REUSEPORT worker); -1 when unknown."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return -1
    count = 0
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
            count += 1
    return count


def post(url: str, body: bytes, authorization: str, timeout: float = 10) -> tuple[int, str, bytes]:
    """One POST on a fresh connection: status, ``Cache-Status`` header, body."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": authorization})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Cache-Status", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Cache-Status", ""), exc.read()


@dataclass
class BenchStack:
    """sim → origin → edge, started by ``__enter__``. ``workers``: edge processes (SO_REUSEPORT);
    ``time_scale``: the sim's delay multiplier (0 answers at once)."""

    workers: int = 1
    time_scale: float = 0.0
    sim_url: str = ""
    origin_url: str = ""
    edge_url: str = ""
    answer: bytes = b""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> BenchStack:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgecache-bench-")
        root = Path(self._tmp.name)
        sim_port, origin_port, edge_port = free_port(), free_port(), free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.origin_url = f"http://127.0.0.1:{origin_port}"
        self.edge_url = f"http://127.0.0.1:{edge_port}"
        topology = root / "topology.toml"
        topology.write_text(
            f'[origin]\nport = {origin_port}\n\n'
            f'[sim]\ncount = 1\nbase_port = {sim_port}\nmodel = "sim-llm"\ntime_scale = {self.time_scale!r}\n\n'
            f'[[edges]]\nregion = "{REGION}"\nport = {edge_port}\nworkers = {self.workers}\n'
            f'data_dir = "{root / "edge"}"\n', encoding="utf-8")
        base = [sys.executable, "-m", "edgecache.cli"]
        plan = [("sim", [*base, "sim", "--topology", str(topology), "--index", "0"], self.sim_url + "/health"),
                ("origin", [*base, "origin", "--topology", str(topology)], self.origin_url + "/healthz"),
                ("edge", [*base, "node", "--topology", str(topology), "--region", REGION], self.edge_url + "/healthz")]
        env = {**os.environ, "EDGECACHE_LOG_LEVEL": os.environ.get("EDGECACHE_LOG_LEVEL", "WARNING")}
        try:
            for name, argv, health in plan:
                with open(root / f"{name}.log", "wb") as log:     # the child keeps its own descriptor
                    self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                wait_healthy(self.procs[name], name, health, lambda name=name: self.log(name), timeout=60)
            self._wait_listening(edge_port, self.workers)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_listening(self, port: int, sockets: int, timeout: float = 30) -> None:
        """Wait until every edge worker listens: /healthz answers as soon as the first one does,
        and connections opened before the others listen all stay on that one."""
        deadline = time.monotonic() + timeout
        while (found := listening_sockets(port)) < sockets:
            if found < 0:
                return          # no /proc/net/tcp: cannot tell
            if time.monotonic() > deadline:
                raise StackError(f"edge: {found} of {sockets} workers listening after {timeout:.0f} s:\n"
                                 f"{self.log('edge')}")
            time.sleep(0.02)

    def log(self, name: str) -> str:
        """The last lines a service printed."""
        assert self._tmp is not None
        path = Path(self._tmp.name) / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def edge_pids(self) -> list[int]:
        """The edge node's process and its worker processes."""
        return descendants(self.procs["edge"].pid)

    def warm(self, path: str, body: bytes, authorization: str, timeout: float = 20) -> str:
        """Fill the edge's cache with ``body``'s answer, then wait until requests on fresh
        connections (spread over every worker) are hits several times in a row.
        Returns the ``Cache-Status`` of the first request after the fill; ``answer`` keeps the body."""
        url = self.edge_url + path
        status, cache_status, text = post(url, body, authorization)
        if status != 200:
            raise StackError(f"warm-up request: status {status} ({cache_status}): {text[:500]!r}")
        first_after = ""
        needed, streak = max(4, 4 * self.workers), 0
        deadline = time.monotonic() + timeout
        while streak < needed:
            if time.monotonic() > deadline:
                raise StackError(f"no steady hits after warm-up; last Cache-Status: {cache_status!r}")
            status, cache_status, text = post(url, body, authorization)
            first_after = first_after or cache_status
            self.answer = text
            streak = streak + 1 if status == 200 and "; hit;" in cache_status else 0
        return first_after

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stop_all(self.procs)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
