"""The package layering of ARCHITECTURE.md, checked on the source: imports go one way."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgecache", "nodes", "origin")
CORE_FORBIDDEN = {"aiohttp", "diskcache", "faiss", "asyncio", "socket", "nats", "sentence_transformers",
                  "nodes", "origin", "prometheus_client"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sorted((ROOT / "edgecache").glob("*.py")), ids=lambda p: p.name)
def test_core_modules_do_no_io_and_import_no_service(path: Path) -> None:
    if path.name == "cli.py":   # the composition root that starts the services
        return
    assert not imports_of(path) & CORE_FORBIDDEN


@pytest.mark.parametrize(("package", "other"), [("nodes", "origin"), ("origin", "nodes")])
def test_services_never_import_each_other(package: str, other: str) -> None:
    offenders = [p.relative_to(ROOT) for p in modules(package) if other in imports_of(p)]
    assert offenders == []


def _all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".") if not m.name.endswith("__main__")]
    return names


def _isort_key(name: str) -> tuple[int, str]:
    kind = 0 if re.fullmatch(r"[A-Z0-9_]+", name) else 1 if name[:1].isupper() else 2
    return kind, name


@pytest.mark.parametrize("name", _all_modules())
def test_public_names_leave_through_a_sorted_complete_all(name: str) -> None:
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
               and not n.name.startswith("_")}
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not defined, f"{name} defines public names but has no __all__"
        return
    assert defined <= set(exported), f"{name}: missing from __all__: {sorted(defined - set(exported))}"
    assert all(hasattr(module, n) for n in exported)
    assert list(exported) == sorted(exported, key=_isort_key)
