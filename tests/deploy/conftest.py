"""Fixtures of the deploy checks: the checker's modules, and a copy of the repository to break."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "deploy" / "check"
if str(CHECK) not in sys.path:
    sys.path.insert(0, str(CHECK))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """What deploy/check reads, copied (deploy/, pyproject, .dockerignore) or linked (the sources)."""
    for name in ("deploy", "pyproject.toml", "README.md", ".dockerignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    shutil.rmtree(tmp_path / "deploy" / "check" / "__pycache__", ignore_errors=True)
    for name in ("edgecache", "nodes", "origin"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


@pytest.fixture
def edit() -> Callable[[Path, str, str], None]:
    """Replace ``old`` (which must occur) by ``new`` in a file."""

    def _edit(path: Path, old: str, new: str) -> None:
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return _edit
