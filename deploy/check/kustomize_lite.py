"""A small, offline renderer for the subset of kustomize that deploy/k8s uses.

kustomize is not installed here, so `make deploy-check` renders the overlays itself. The
subset: ``resources`` (files and other kustomization folders), ``configMapGenerator`` and
``secretGenerator`` (``files``, ``envs``, ``literals``, ``behavior``), ``patches`` (strategic
merge patches and JSON 6902 operations, by ``path`` or inline ``patch``, with or without a
``target``), ``namespace``, ``commonLabels``, ``replicas`` and ``images``. Generated names get a
content hash suffix and every reference to them is renamed, as kustomize does (the suffixes
differ from kustomize's). Anything else in a kustomization is an error rather than silently
ignored, and files are loaded from inside their kustomization's folder only (kustomize's
default load restrictor), so what renders here renders with ``kubectl apply -k`` too.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "build"]

Resource = dict[str, Any]
KNOWN_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "secretGenerator", "patches",
              "namespace", "commonLabels", "replicas", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
GENERATED = "internal.edgecache.io/generated"


class KustomizeError(Exception):
    """A kustomization that this renderer (and so, most likely, kustomize) rejects."""


def build(folder: str | Path) -> list[Resource]:
    """Render the kustomization in ``folder``: the resources ``kubectl apply -k`` would apply."""
    resources = _build(Path(folder).resolve())
    _hash_generated(resources)
    for res in resources:
        annotations = res["metadata"].get("annotations", {})
        annotations.pop(GENERATED, None)
        if not annotations:
            res["metadata"].pop("annotations", None)
    return resources


def _build(folder: Path) -> list[Resource]:
    kfile = next((folder / n for n in ("kustomization.yaml", "kustomization.yml") if (folder / n).is_file()), None)
    if kfile is None:
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources += _build(path)
        else:
            resources += [r for r in yaml.safe_load_all(_read(folder, entry, kfile)) if r]
    for gen in k.get("configMapGenerator", []):
        _generate(resources, gen, "ConfigMap", folder, kfile)
    for gen in k.get("secretGenerator", []):
        _generate(resources, gen, "Secret", folder, kfile)
    for res in resources:
        if not isinstance(res, dict) or not {"apiVersion", "kind", "metadata"} <= set(res):
            raise KustomizeError(f"{kfile}: a resource without apiVersion, kind and metadata: {res!r:.120}")
    if k.get("commonLabels"):
        for res in resources:
            _label(res, k["commonLabels"])
    for patch in k.get("patches", []):
        _patch(resources, patch, folder, kfile)
    if k.get("namespace"):
        for res in resources:
            if res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = k["namespace"]
    for rep in k.get("replicas", []):
        hits = [r for r in resources if r["kind"] in WORKLOADS and r["metadata"]["name"] == rep["name"]]
        if not hits:
            raise KustomizeError(f"{kfile}: replicas: no workload named {rep['name']!r}")
        for res in hits:
            res["spec"]["replicas"] = int(rep["count"])
    for image in k.get("images", []):
        _set_image(resources, image)
    return resources


def _read(folder: Path, name: str, kfile: Path) -> str:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise KustomizeError(f"{kfile}: {name}: files must lie inside the kustomization's folder "
                             f"(kustomize's default load restrictor)")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KustomizeError(f"{kfile}: {name}: no such file") from None


def _generate(resources: list[Resource], gen: dict[str, Any], kind: str, folder: Path, kfile: Path) -> None:
    data: dict[str, str] = {}
    for item in gen.get("files", []):
        key, _, name = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = _read(folder, name, kfile)
    for env in gen.get("envs", []):
        for line in _read(folder, env, kfile).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition("=")
                if not sep:
                    raise KustomizeError(f"{kfile}: {env}: expected KEY=VALUE, got {line!r}")
                data[key.strip()] = value
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    name, behavior = gen["name"], gen.get("behavior", "create")
    existing = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{kfile}: {kind} {name} already exists (behavior: merge or replace)")
        res: Resource = {"apiVersion": "v1", "kind": kind,
                         "metadata": {"name": name, "annotations": {GENERATED: "true"}}}
        if kind == "Secret":
            res["type"] = gen.get("type", "Opaque")
        resources.append(res)
    elif behavior in ("merge", "replace") and existing:
        res = existing[0]
        if behavior == "replace":
            res.pop("data", None)
    else:
        raise KustomizeError(f"{kfile}: {kind} {name}: behavior {behavior!r} needs an existing {kind}")
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    res.setdefault("data", {}).update(data)


def _label(res: Resource, labels: dict[str, str]) -> None:
    """commonLabels: metadata, selectors and pod templates, as kustomize's label transformer."""
    res["metadata"].setdefault("labels", {}).update(labels)
    spec = res.get("spec") or {}
    kind = res["kind"]
    if kind in WORKLOADS:
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
        spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        for claim in spec.get("volumeClaimTemplates", []):
            claim.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    elif kind == "Service" and spec.get("selector") is not None:
        spec["selector"].update(labels)
    elif kind == "PodDisruptionBudget":
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
    elif kind == "NetworkPolicy":
        spec.setdefault("podSelector", {}).setdefault("matchLabels", {}).update(labels)
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer:
                    peer["podSelector"].setdefault("matchLabels", {}).update(labels)


def _patch(resources: list[Resource], patch: dict[str, Any], folder: Path, kfile: Path) -> None:
    text = _read(folder, patch["path"], kfile) if "path" in patch else patch.get("patch", "")
    body = yaml.safe_load(text)
    target = patch.get("target")
    if target is None:
        if not isinstance(body, dict):
            raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a target")
        target = {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
    hits = [r for r in resources if _matches(r, target)]
    if not hits:
        raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
    for res in hits:
        if isinstance(body, list):
            for op in body:
                _json6902(res, op, kfile)
        else:
            _merge(res, {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}, kfile)


def _matches(res: Resource, target: dict[str, Any]) -> bool:
    for field, value in (("kind", res["kind"]), ("name", res["metadata"]["name"]),
                         ("namespace", res["metadata"].get("namespace", ""))):
        if target.get(field) is not None and not re.fullmatch(target[field], value):
            return False
    return True


def _merge(base: dict[str, Any], patch: dict[str, Any], kfile: Path) -> None:
    """A strategic merge patch: maps merge, lists of named things merge by their key."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"{kfile}: patch directive {key} is not supported here")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, kfile)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            mk = MERGE_KEYS[key]
            for item in value:
                same = [b for b in base[key] if isinstance(b, dict) and b.get(mk) == item.get(mk)]
                if same:
                    _merge(same[0], item, kfile)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _json6902(res: Resource, op: dict[str, Any], kfile: Path) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = res
    try:
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last: Any = parts[-1]
        if isinstance(parent, list):
            last = len(parent) if last == "-" else int(last)
            if op["op"] in ("replace", "remove", "test"):
                parent[last]  # an IndexError for a missing item
        elif op["op"] in ("replace", "remove", "test") and last not in parent:
            raise KeyError(last)
    except (KeyError, IndexError, ValueError, TypeError):
        raise KustomizeError(f"{kfile}: patch {op['op']} {op['path']}: no such path in "
                             f"{res['kind']}/{res['metadata']['name']}") from None
    if op["op"] == "add" and isinstance(parent, list):
        parent.insert(last, copy.deepcopy(op["value"]))
    elif op["op"] in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del parent[last]
    elif op["op"] == "test":
        if parent[last] != op["value"]:
            raise KustomizeError(f"{kfile}: patch test {op['path']} failed")
    else:
        raise KustomizeError(f"{kfile}: patch op {op['op']!r} is not supported here")


def _pod_specs(res: Resource) -> list[dict[str, Any]]:
    if res["kind"] in WORKLOADS:
        return [res.get("spec", {}).get("template", {}).get("spec", {})]
    if res["kind"] == "Pod":
        return [res.get("spec", {})]
    return []


def _image_name(ref: str) -> tuple[str, str]:
    """``registry/name:tag@digest`` -> (``registry/name``, ``tag``)."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last, _, tag = last.partition(":")
    return (f"{head}/{last}" if head else last), tag


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    for res in resources:
        for spec in _pod_specs(res):
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, tag = _image_name(c["image"])
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                tag = image.get("newTag", tag)
                c["image"] = f"{new}@{image['digest']}" if "digest" in image else f"{new}:{tag}" if tag else new


def _hash_generated(resources: list[Resource]) -> None:
    renamed: dict[tuple[str, str], str] = {}
    for res in resources:
        if res["metadata"].get("annotations", {}).get(GENERATED):
            body = json.dumps({"kind": res["kind"], "name": res["metadata"]["name"], "data": res.get("data", {})},
                              sort_keys=True)
            digest = hashlib.sha256(body.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))
            new = f"{res['metadata']['name']}-{digest}"
            renamed[(res["kind"], res["metadata"]["name"])] = new
            res["metadata"]["name"] = new
    for res in resources:
        for spec in _pod_specs(res):
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    vol["configMap"]["name"] = renamed.get(("ConfigMap", vol["configMap"]["name"]),
                                                           vol["configMap"]["name"])
                if "secret" in vol:
                    vol["secret"]["secretName"] = renamed.get(("Secret", vol["secret"]["secretName"]),
                                                              vol["secret"]["secretName"])
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for env in c.get("env", []):
                    for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                        if ref in env.get("valueFrom", {}):
                            r = env["valueFrom"][ref]
                            r["name"] = renamed.get((kind, r["name"]), r["name"])
                for src in c.get("envFrom", []):
                    for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                        if ref in src:
                            src[ref]["name"] = renamed.get((kind, src[ref]["name"]), src[ref]["name"])
