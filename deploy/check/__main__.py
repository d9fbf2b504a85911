"""`make deploy-check`: everything in deploy/ checked offline (Docker cannot run here).

    python deploy/check [--root DIR] [--only compose,k8s,config,docker,nats] [-v]

- compose: deploy/compose.yaml against the compose specification's JSON schema, then its
  services against their topologies (compose_check.py);
- k8s: every overlay of deploy/k8s rendered (kustomize_lite.py), each object validated with
  kubernetes-validate, then cross-checked (k8s_check.py);
- config: `edgecache config check` on every TOML file under deploy/;
- docker: deploy/Dockerfile's entry point is the `edgecache` console script, its COPY sources
  exist and pass .dockerignore, it runs as a non-root user and has a health check;
- nats: `nats-server -t` on every deploy/nats/*.conf (skipped, and said so, without nats-server).

Exit status 1 when anything fails; each failure names the file and the key or field at fault.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from checks_common import Report, nats_test
from compose_check import check_compose
from k8s_check import check_k8s

CHECKS = ("compose", "k8s", "config", "docker", "nats")
NATS_ENV = {"NATS_LEAF_PASSWORD": "check", "NATS_HUB_LEAF_URL": "nats-leaf://leaf:check@127.0.0.1:7422"}


def check_configs(root: Path, report: Report) -> None:
    files = sorted((root / "deploy").rglob("*.toml"))
    report.check(bool(files), "deploy/: topology files found")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECACHE_")}
    for f in files:
        proc = subprocess.run([sys.executable, "-m", "edgecache.cli", "config", "check", str(f)],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        report.check(proc.returncode == 0, f"edgecache config check {f.relative_to(root)}",
                     proc.stderr.strip() or proc.stdout.strip())


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (x.strip() for x in joined.splitlines()) if ln]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) or fnmatch.fnmatch("/".join(parts[:i]), pat.replace("**/", ""))
                  or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])) for i in range(1, len(parts) + 1))
        if hit:
            ignored = not neg
    return ignored


def check_docker(root: Path, report: Report) -> None:
    import json

    dockerfile = root / "deploy" / "Dockerfile"
    steps = _instructions(dockerfile.read_text(encoding="utf-8"))
    w = "Dockerfile"
    froms = [a for i, a in steps if i == "FROM"]
    report.check(len(froms) >= 2, f"{w}: multi-stage", f"{len(froms)} FROM")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for i, a in steps if i == "ARG"}
    report.check(args.get("PYTHON_IMAGE", "").startswith("python:3.11-slim"), f"{w}: slim Python 3.11 base",
                 f"PYTHON_IMAGE={args.get('PYTHON_IMAGE')}")
    report.check(args.get("EDGECACHE_SEMANTIC") == "false", f"{w}: semantic extra off by default",
                 f"EDGECACHE_SEMANTIC={args.get('EDGECACHE_SEMANTIC')}")
    users = [a for i, a in steps if i == "USER"]
    report.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"), f"{w}: runs as a non-root user",
                 f"USER {users[-1] if users else '(none)'}")
    report.check(any(i == "HEALTHCHECK" and "python" in a for i, a in steps), f"{w}: HEALTHCHECK with python")
    entry = [a for i, a in steps if i == "ENTRYPOINT"]
    try:
        entrypoint = json.loads(entry[-1]) if entry else None
    except ValueError:
        entrypoint = None
    report.check(entrypoint == ["edgecache"], f"{w}: ENTRYPOINT [\"edgecache\"]", f"got {entry[-1:] or 'none'}")
    scripts = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("scripts", {})
    target = scripts.get("edgecache", "")
    module, _, func = target.partition(":")
    if report.check(bool(func), f"{w}: pyproject declares the edgecache console script", f"scripts: {scripts}"):
        import importlib

        try:
            ok = callable(getattr(importlib.import_module(module), func))
        except (ImportError, AttributeError):
            ok = False
        report.check(ok, f"{w}: console script {target} exists")
    ignore = root / ".dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.startswith("#")] if ignore.exists() else []
    for i, a in steps:
        if i != "COPY" or "--from=" in a:
            continue
        for src in [s for s in a.split() if not s.startswith("--")][:-1]:
            exists = (root / src).exists()
            report.check(exists and not _ignored(src.rstrip("/"), patterns), f"{w}: COPY {src}",
                         "does not exist" if not exists else "excluded by .dockerignore")


def check_nats(root: Path, report: Report) -> None:
    folder = root / "deploy" / "nats"
    confs = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.conf"))}
    report.check({"hub.conf", "leaf.conf"} <= set(confs), "deploy/nats: hub.conf and leaf.conf")
    for name in confs:
        ok, why = nats_test(confs, name, NATS_ENV)
        if ok is None:
            report.notes.append(f"nats-server -t deploy/nats/{name} skipped ({why})")
        else:
            report.check(ok, f"nats-server -t deploy/nats/{name}", why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/check", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="repository root")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every passed check too")
    args = parser.parse_args(argv)
    root, only = Path(args.root).resolve(), set(args.only.split(","))
    report = Report()
    steps = {"compose": check_compose, "k8s": check_k8s, "config": check_configs, "docker": check_docker,
             "nats": check_nats}
    for name in CHECKS:
        if name in only:
            steps[name](root, report)
    for line in report.ok if args.verbose else []:
        print(f"ok    {line}")
    for line in report.notes:
        print(f"note  {line}")
    for line in report.errors:
        print(f"FAIL  {line}")
    print(f"deploy-check: {len(report.ok)} passed, {len(report.errors)} failed ({', '.join(sorted(only))})")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
