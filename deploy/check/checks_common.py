"""What every deploy check shares: the report, edgecache's own argument parser and config loader."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from edgecache.cli import build_parser
from edgecache.config import Config, load_config
from edgecache.errors import ConfigError

__all__ = ["Report", "hosts", "load_topology", "nats_test", "parse_edgecache_args"]


@dataclass
class Report:
    """Findings of one run: ``ok`` lines for what was checked, ``errors`` for what is wrong."""

    ok: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, condition: bool, what: str, why: str = "") -> bool:
        if condition:
            self.ok.append(what)
        else:
            self.errors.append(f"{what}: {why}" if why else what)
        return condition


def parse_edgecache_args(argv: list[str]):
    """``argv`` after the ``edgecache`` entry point, parsed as the image would; None when rejected."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "rejected"


def load_topology(text: str, environ: Mapping[str, str], name: str) -> Config:
    """``edgecache config check`` on a topology's text, with a container's environment."""
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp, "deploy")
        deploy.mkdir()
        path = deploy / name
        path.write_text(text, encoding="utf-8")
        try:
            return replace(load_config(path, environ), source=name)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), name)) from None


def hosts(urls: str) -> list[str]:
    """Host names of a URL or of comma-separated URLs."""
    return [urlsplit(u.strip()).hostname or "" for u in urls.split(",") if u.strip()]


def nats_test(files: Mapping[str, str], main: str, environ: Mapping[str, str]) -> tuple[bool | None, str]:
    """``nats-server -t`` on ``main`` among ``files`` (name -> text); None when not installed."""
    server = shutil.which("nats-server")
    if server is None:
        return None, "nats-server is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text, encoding="utf-8")
        proc = subprocess.run([server, "-t", "-c", str(Path(tmp, main))], capture_output=True, text=True,
                              env={"PATH": os.environ.get("PATH", ""), **environ}, timeout=30, check=False)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip().replace(tmp + "/", "")
