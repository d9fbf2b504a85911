"""deploy/compose.yaml: the compose specification's JSON schema, then what the schema cannot see.

Compose interpolates ``${VAR:-default}`` before it validates; so does this check, once per
variant (the default stack, and the ``vllm`` profile with its topology). Then, for every
edgecache service of the variant: its command parses as the image's ``edgecache`` would, its
topology (a compose config) passes ``edgecache config check`` with the service's environment,
an edge's region is in it, its disk tier lies on a volume, the ports and health URL match the
topology, and every host it talks to (origin, backends, NATS) is a service of the variant.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from checks_common import Report, hosts, load_topology, parse_edgecache_args

from edgecache.errors import ConfigError

__all__ = ["SCHEMA_SHA256", "VARIANTS", "check_compose", "interpolate"]

SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
# name, environment, active profiles
VARIANTS = [("default", {}, set()), ("vllm", {"EDGECACHE_TOPOLOGY": "topology-vllm.toml"}, {"vllm"})]
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation over every string of a document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), interpolate(m.group(4) or "", env)
        val = env.get(name)
        empty = val is None or (op and op.startswith(":") and val == "")
        if op in ("-", ":-"):
            return arg if empty else val
        if op in ("?", ":?"):
            if empty:
                raise ValueError(f"${{{name}}} is required: {arg}")
            return val
        if op in ("+", ":+"):
            return "" if empty else arg
        return val or ""

    return _VAR.sub(sub, value)


def check_compose(root: Path, report: Report) -> None:
    path = root / "deploy" / "compose.yaml"
    schema_path = root / "deploy" / "schemas" / "compose-spec.json"
    raw_schema = schema_path.read_bytes()
    report.check(hashlib.sha256(raw_schema).hexdigest() == SCHEMA_SHA256, f"{schema_path.name}: the vendored schema",
                 "its sha256 differs from deploy/schemas/README.md")
    schema = yaml.safe_load(raw_schema)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        report.check(False, "compose.yaml parses", str(exc))
        return
    for variant, env, profiles in VARIANTS:
        where = f"compose.yaml [{variant}]"
        try:
            data = interpolate(doc, env)
        except ValueError as exc:
            report.check(False, f"{where}: interpolation", str(exc))
            continue
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(data), key=lambda e: list(e.path))
        report.check(not errors, f"{where}: valid against the compose specification",
                     "; ".join(f"{'.'.join(map(str, e.path)) or '<top>'}: {e.message[:200]}" for e in errors[:5]))
        if not errors:
            _semantics(root, data, where, profiles, report)


def _semantics(root: Path, data: dict[str, Any], where: str, profiles: set[str], report: Report) -> None:
    services = {n: s for n, s in data.get("services", {}).items() if not s.get("profiles") or set(s["profiles"]) & profiles}
    volumes, configs = data.get("volumes") or {}, data.get("configs") or {}
    for name, svc in services.items():
        w = f"{where}: services.{name}"
        for dep in svc.get("depends_on") or {}:
            report.check(dep in services, f"{w}.depends_on {dep}", "not a service of this variant")
        mounts = {}
        for vol in svc.get("volumes", []):
            source, _, target = (vol.partition(":") if isinstance(vol, str) else (vol.get("source", ""), "", vol["target"]))
            target = target.split(":")[0]
            mounts[target] = source
            if source and not source.startswith((".", "/", "~")):
                report.check(source in volumes, f"{w}: volume {source}", "not declared under volumes:")
        files = {}
        for cfg in svc.get("configs", []):
            src = cfg if isinstance(cfg, str) else cfg["source"]
            target = f"/{src}" if isinstance(cfg, str) else cfg.get("target", f"/{src}")
            decl = configs.get(src) or {}
            file = (root / "deploy" / decl.get("file", "")).resolve() if decl.get("file") else None
            if report.check(file is not None and file.is_file(), f"{w}: config {src}", f"no file {decl.get('file')!r}"):
                files[target] = file
        if str(svc.get("image", "")).startswith("edgecache") or (svc.get("build") or {}).get("dockerfile") == "deploy/Dockerfile":
            _edgecache_service(svc, w, services, mounts, files, report)


def _edgecache_service(svc: dict[str, Any], w: str, services: dict[str, Any], mounts: dict[str, str],
                       files: dict[str, Path], report: Report) -> None:
    command = svc.get("command") or []
    args, why = parse_edgecache_args(list(command))
    if not report.check(args is not None, f"{w}: `edgecache {' '.join(command)}` parses", why):
        return
    if args.command not in ("origin", "node", "sim"):
        return
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if v not in (None, "")}
    topo = files.get(args.topology)
    if not report.check(topo is not None, f"{w}: --topology {args.topology}", "not a config mounted in the service"):
        return
    try:
        config = load_topology(topo.read_text(encoding="utf-8"), env, topo.name)
    except ConfigError as exc:
        report.check(False, f"{w}: edgecache config check {topo.name}", str(exc))
        return
    ports = [str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])]
    if args.command == "node":
        try:
            node = config.edge(args.region)
        except ConfigError as exc:
            report.check(False, f"{w}: --region {args.region}", str(exc))
            return
        listen, data_dirs = node.port, [node.data_dir]
        report.check(node.host == "0.0.0.0", f"{w}: edge binds 0.0.0.0", f"host is {node.host}")
        talks = [config.origin.base_url, *config.bus.nats_url.split(",")] if config.bus.kind == "nats" else [config.origin.base_url]
    elif args.command == "origin":
        listen, data_dirs = config.origin.port, [config.origin.data_dir]
        talks = [b.url for b in config.all_backends()] + ([config.bus.nats_url] if config.bus.kind == "nats" else [])
        report.check(config.origin.host == "0.0.0.0", f"{w}: origin binds 0.0.0.0", f"host is {config.origin.host}")
    else:
        listen, data_dirs, talks = args.port or config.sim.base_port + args.index, [], []
    for d in data_dirs:
        report.check(any(d == t or d.startswith(t.rstrip("/") + "/") for t in mounts), f"{w}: data_dir {d} on a volume",
                     f"no volume mounted above it (mounts: {sorted(mounts)})")
    for port in ports:
        report.check(port == str(listen), f"{w}: published port {port}", f"the service listens on {listen}")
    health = env.get("EDGECACHE_HEALTH_URL")
    if health:
        report.check(urlsplit(health).port == listen, f"{w}: EDGECACHE_HEALTH_URL {health}", f"the service listens on {listen}")
    for url in talks:
        for host in hosts(url):
            report.check(host in services, f"{w}: reaches {host}", "not a service of this variant")
