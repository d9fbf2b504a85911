"""deploy/k8s/overlays/*: render each overlay, validate every manifest, then cross-check them.

Every rendered object is validated (strict: unknown fields are errors) with kubernetes-validate
against ``K8S_VERSION``. Then, inside each overlay: every ConfigMap, Secret and claim a pod
uses exists with the keys it reads; Services and disruption budgets select pods; each
edgecache container's arguments parse as the image's ``edgecache`` would, its topology (the
mounted ConfigMap) passes ``edgecache config check`` with the container's environment (Secret
values included), an edge's region is in it, its port and disk tier match, and the hosts it
reaches (origin, backends, NATS) are Services of the overlay or outside addresses; each NATS
container's config file is in its ConfigMap and passes ``nats-server -t`` with its environment.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kubernetes_validate
from checks_common import Report, hosts, load_topology, nats_test, parse_edgecache_args
from kustomize_lite import KustomizeError, build

from edgecache.errors import ConfigError

__all__ = ["K8S_VERSION", "check_k8s"]

K8S_VERSION = "1.31.0"
Resource = dict[str, Any]


def check_k8s(root: Path, report: Report) -> list[Path]:
    """Check every overlay; returns the folders rendered."""
    overlays = sorted(p for p in (root / "deploy" / "k8s" / "overlays").iterdir() if p.is_dir())
    report.check(bool(overlays), "deploy/k8s/overlays: at least one overlay")
    for overlay in overlays:
        where = f"k8s/{overlay.name}"
        try:
            resources = build(overlay)
        except (KustomizeError, OSError, ValueError, KeyError) as exc:
            report.check(False, f"{where}: renders", str(exc))
            continue
        report.ok.append(f"{where}: renders ({len(resources)} objects)")
        for res in resources:
            name = f"{where}: {res['kind']}/{res['metadata'].get('name')}"
            try:
                kubernetes_validate.validate(res, K8S_VERSION, strict=True)
                report.ok.append(f"{name}: valid (Kubernetes {K8S_VERSION})")
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                report.check(False, f"{name}: valid (Kubernetes {K8S_VERSION})", f"{path}: {exc.message[:200]}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
                report.check(False, f"{name}: has a schema", exc.message)
        _cross_check(resources, where, overlay.name, report)
    return overlays


def _find(resources: list[Resource], kind: str, name: str) -> Resource | None:
    return next((r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name), None)


def _cross_check(resources: list[Resource], where: str, region: str, report: Report) -> None:
    pods = [(r, r["spec"]["template"]) for r in resources if r["kind"] in ("Deployment", "StatefulSet")]
    for res in resources:
        kind, name, spec = res["kind"], res["metadata"]["name"], res.get("spec") or {}
        selector = spec.get("selector") if kind == "Service" else (spec.get("selector") or {}).get("matchLabels")
        if kind in ("Service", "PodDisruptionBudget", "Deployment", "StatefulSet") and selector:
            hits = [w for w, t in pods if selector.items() <= t["metadata"].get("labels", {}).items()]
            report.check(bool(hits), f"{where}: {kind}/{name} selects pods", f"no pod template has labels {selector}")
            if kind == "Service":
                names = {p.get("name") for _, t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])
                         if selector.items() <= t["metadata"].get("labels", {}).items()}
                for port in spec.get("ports", []):
                    target = port.get("targetPort", port["port"])
                    report.check(not isinstance(target, str) or target in names,
                                 f"{where}: Service/{name} targetPort {target}", "no container port of that name")
    for workload, template in pods:
        _pod(resources, workload, template["spec"], f"{where}: {workload['kind']}/{workload['metadata']['name']}",
             region, report)


def _pod(resources: list[Resource], workload: Resource, spec: dict[str, Any], w: str, region: str, report: Report) -> None:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    for vol in volumes.values():
        if "configMap" in vol:
            report.check(_find(resources, "ConfigMap", vol["configMap"]["name"]) is not None,
                         f"{w}: volume {vol['name']} ConfigMap {vol['configMap']['name']}", "not in the overlay")
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            report.check(_find(resources, "PersistentVolumeClaim", claim) is not None,
                         f"{w}: volume {vol['name']} claim {claim}", "not in the overlay")
    for c in spec["containers"]:
        env: dict[str, str] = {}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = _find(resources, "Secret", ref["name"]) or {}
                ok = report.check(ref["key"] in secret.get("data", {}), f"{w}: env {e['name']} from Secret "
                                  f"{ref['name']} key {ref['key']}", "no such Secret or key in the overlay")
                if ok:
                    env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "value" in e:
                env[e["name"]] = str(e["value"])
        files = {}
        for m in c.get("volumeMounts", []):
            vol = volumes.get(m["name"])
            if not report.check(vol is not None or m["name"] in claims, f"{w}: mount {m['name']}", "no such volume"):
                continue
            cm = _find(resources, "ConfigMap", (vol or {}).get("configMap", {}).get("name", ""))
            for key, text in (cm or {}).get("data", {}).items():
                files[f"{m['mountPath'].rstrip('/')}/{key}"] = (text, cm["data"])
        image = c["image"].rsplit("/", 1)[-1]
        if image.startswith("edgecache"):
            _edgecache(resources, c, env, files, spec, volumes, w, region, report)
        elif image.startswith("nats"):
            conf = c.get("args", [])[c.get("args", []).index("-c") + 1] if "-c" in c.get("args", []) else ""
            if report.check(conf in files, f"{w}: nats config {conf}", "not a key of a mounted ConfigMap"):
                ok, why = nats_test(files[conf][1], Path(conf).name, env)
                if ok is None:
                    report.notes.append(f"{w}: nats-server -t {conf} skipped ({why})")
                else:
                    report.check(ok, f"{w}: nats-server -t {conf}", why)


def _edgecache(resources: list[Resource], c: dict[str, Any], env: dict[str, str], files: dict[str, Any],
               spec: dict[str, Any], volumes: dict[str, Any], w: str, region: str, report: Report) -> None:
    argv = [*c.get("command", [])[1:], *c.get("args", [])]
    args, why = parse_edgecache_args(argv)
    if not report.check(args is not None, f"{w}: `edgecache {' '.join(argv)}` parses", why):
        return
    if not report.check(args.topology in files, f"{w}: --topology {args.topology}", "not a key of a mounted ConfigMap"):
        return
    try:
        config = load_topology(files[args.topology][0], env, Path(args.topology).name)
    except ConfigError as exc:
        report.check(False, f"{w}: edgecache config check (mounted topology)", str(exc))
        return
    report.ok.append(f"{w}: edgecache config check (mounted topology)")
    nats = config.bus.nats_url.split(",") if config.bus.kind == "nats" else []
    if args.command == "node":
        try:
            node = config.edge(args.region)
        except ConfigError as exc:
            report.check(False, f"{w}: --region {args.region}", str(exc))
            return
        report.check(args.region == region, f"{w}: --region {args.region} is the overlay's", f"overlay is {region}")
        listen, data_dir, talks = node.port, node.data_dir, [config.origin.base_url, *nats]
    elif args.command == "origin":
        listen, data_dir = config.origin.port, config.origin.data_dir
        talks = [b.url for b in config.all_backends()] + nats
    else:
        listen, data_dir, talks = config.sim.base_port + args.index, "", []
    ports = [p["containerPort"] for p in c.get("ports", [])]
    report.check(listen in ports, f"{w}: listens on a container port", f"topology says {listen}, ports {ports}")
    if data_dir:
        mounts = [m for m in c.get("volumeMounts", []) if data_dir.startswith(m["mountPath"].rstrip("/") + "/")]
        report.check(bool(mounts) and "configMap" not in volumes.get(mounts[0]["name"], {}),
                     f"{w}: data_dir {data_dir} on a writable volume", "no volume mounted above it")
    for url in talks:
        for host in hosts(url):
            report.check(_resolves(resources, host), f"{w}: reaches {host}",
                         "neither a Service of the overlay nor an outside (dotted) name")


def _resolves(resources: list[Resource], host: str) -> bool:
    """A Service name, a StatefulSet pod of a headless Service, or an outside address."""
    labels = host.split(".")
    if len(labels) == 1:
        return _find(resources, "Service", host) is not None
    if len(labels) == 2:
        svc = _find(resources, "Service", labels[1])
        sets = [r for r in resources if r["kind"] == "StatefulSet" and r["spec"].get("serviceName") == labels[1]]
        return svc is not None and svc["spec"].get("clusterIP") == "None" and any(
            labels[0] == f"{s['metadata']['name']}-{i}" for s in sets for i in range(s["spec"].get("replicas", 1)))
    return True
