"""The end of a benchmark run: the command that produced the figures, the load after the run,
the table on stdout and the JSON report in a file."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["finish"]


def finish(report: dict[str, Any], table: str, json_path: Path | None, *, module: str,
           argv: Sequence[str] | None) -> int:
    """Record ``python -m module ARGS`` and the load average in ``report``, print ``table``,
    write ``report`` to ``json_path`` (when given); returns the exit status, 0."""
    report["command"] = f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])
    report.setdefault("machine", {})["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
