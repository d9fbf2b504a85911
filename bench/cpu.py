"""Where the machine's CPU went during a run (Linux ``/proc``): the server under test, the
load generator, and everything else. The machine may be shared, and a load generator on the
same cores takes its share too; these figures say how much, so a run can be judged.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "CpuUsage", "cpu_sample", "cpu_usage"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds so far: the whole machine busy, the given server processes, and this process
    with its waited-for children (the load generator)."""

    machine_busy_s: float
    machine_steal_s: float
    server_s: float
    loadgen_s: float


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """Shares of the machine's capacity (cpus x wall time) during a run, in percent; and the
    server's CPU time per good response, in microseconds. steal_pct: time the hypervisor gave
    this virtual machine's CPUs to someone else (counted in neither busy nor idle here)."""

    server_pct: float
    loadgen_pct: float
    other_pct: float
    idle_pct: float
    steal_pct: float
    server_us_per_request: float

    def as_dict(self) -> dict[str, float]:
        return {"server_pct": round(self.server_pct, 1), "loadgen_pct": round(self.loadgen_pct, 1),
                "other_pct": round(self.other_pct, 1), "idle_pct": round(self.idle_pct, 1),
                "steal_pct": round(self.steal_pct, 1),
                "server_us_per_request": round(self.server_us_per_request, 1)}


def _machine_s() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine since boot."""
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(x) for x in fields] + [0] * 8
        # user nice system idle iowait irq softirq steal; guest time is already in user
        busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
        return busy / _TICK, ticks[7] / _TICK
    return 0.0, 0.0


def _process_s(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        rest = stat[stat.rindex(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / _TICK          # utime + stime
    return 0.0


def cpu_sample(server_pids: Iterable[int]) -> CpuSample:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    loadgen = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    busy, steal = _machine_s()
    return CpuSample(machine_busy_s=busy, machine_steal_s=steal, server_s=sum(_process_s(p) for p in server_pids),
                     loadgen_s=loadgen)


def cpu_usage(before: CpuSample, after: CpuSample, wall_s: float, good: int) -> CpuUsage:
    """The run between two samples. RUSAGE_CHILDREN counts only children that were waited for,
    which is how the harness runs wrk; the stack's services are never waited for during a run."""
    capacity = max(wall_s * (os.cpu_count() or 1), 1e-9)
    busy = after.machine_busy_s - before.machine_busy_s
    server = after.server_s - before.server_s
    loadgen = after.loadgen_s - before.loadgen_s
    steal = after.machine_steal_s - before.machine_steal_s
    other = max(0.0, busy - server - loadgen)
    return CpuUsage(server_pct=100 * server / capacity, loadgen_pct=100 * loadgen / capacity,
                    other_pct=100 * other / capacity, steal_pct=100 * steal / capacity,
                    idle_pct=max(0.0, 100 * (1 - (busy + steal) / capacity)),
                    server_us_per_request=1e6 * server / good if good else 0.0)
