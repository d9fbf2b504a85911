"""The ``wrk`` load generator (Debian package ``wrk``), driven with ``bench/wrk_post.lua``.

wrk is written in C on epoll and measures a Python server rather than itself. Its Lua
script sends the fixed POST body, checks every response's status and ``Cache-Status``, and
prints one ``EDGECACHE-BENCH key=value …`` line with exact percentiles, which
``parse_wrk_output`` reads (wrk's own table rounds and shows only 50/75/90/99%).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.loadgen import LoadResult, Target

__all__ = ["SCRIPT", "WrkError", "parse_wrk_output", "run_wrk", "wrk_path", "wrk_version"]

SCRIPT = Path(__file__).with_name("wrk_post.lua")
_MARK = "EDGECACHE-BENCH "


class WrkError(RuntimeError):
    """wrk failed to run, or printed no result line."""


def wrk_path() -> str | None:
    """The ``wrk`` executable on PATH, or None."""
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    """wrk's first output line (``wrk 4.1.0 [epoll] …``); it prints it on ``-v`` and exits 1."""
    proc = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "wrk"


def parse_wrk_output(output: str, *, connections: int) -> LoadResult:
    """Read the script's result line from wrk's stdout."""
    for line in output.splitlines():
        if line.startswith(_MARK):
            fields = dict(item.split("=", 1) for item in line[len(_MARK):].split())
            break
    else:
        raise WrkError(f"wrk printed no {_MARK.strip()} line:\n{output}")
    n = {k: int(v) for k, v in fields.items() if k != "mean_us"}
    mean = float(fields["mean_us"])

    def ms(us: int | float) -> float:
        return 0.0 if math.isnan(us) else us / 1000

    return LoadResult(
        generator="wrk", connections=connections, duration_s=n["duration_us"] / 1e6, requests=n["requests"],
        good=n["good"], non_200=n["bad_status"], non_hits=n["not_hit"],
        socket_errors=n["connect_errors"] + n["read_errors"] + n["write_errors"] + n["timeouts"],
        p50_ms=ms(n["p50_us"]), p75_ms=ms(n["p75_us"]), p90_ms=ms(n["p90_us"]), p99_ms=ms(n["p99_us"]),
        max_ms=ms(n["max_us"]), mean_ms=ms(mean))


def run_wrk(target: Target, *, connections: int, duration_s: float, threads: int = 2,
            path: str | None = None) -> LoadResult:
    """Drive ``target`` with wrk: ``threads`` threads, ``connections`` connections (at least one each)."""
    exe = path or wrk_path()
    if exe is None:
        raise WrkError("wrk is not on PATH (Debian: apt-get install wrk)")
    threads = max(1, min(threads, connections))
    seconds = max(1, round(duration_s))          # wrk takes whole seconds
    with tempfile.NamedTemporaryFile(prefix="edgecache-bench-", suffix=".json") as body:
        body.write(target.body)
        body.flush()
        argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                "-s", str(SCRIPT), target.url, "--", body.name, target.authorization,
                "hit" if target.expect_hit else "any"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if proc.returncode != 0:
        raise WrkError(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return parse_wrk_output(proc.stdout, connections=connections)
