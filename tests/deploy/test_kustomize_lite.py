"""The kustomize subset that renders deploy/k8s, and compose's interpolation."""

from __future__ import annotations

from pathlib import Path

import pytest
from compose_check import interpolate
from kustomize_lite import KustomizeError, build

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: registry.example/web:1.0
          args: ["serve", "--region", "X"]
          env:
            - {name: A, value: "1"}
            - name: TOKEN
              valueFrom: {secretKeyRef: {name: creds, key: TOKEN}}
      volumes:
        - name: conf
          configMap: {name: conf}
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_overlay_patches_labels_and_renames_generated_references(tmp_path: Path) -> None:
    write(tmp_path, {
        "base/kustomization.yaml": "resources: [web.yaml]\nsecretGenerator:\n  - {name: creds, literals: [TOKEN=s3cret]}\n",
        "base/web.yaml": DEPLOYMENT,
        "prod/kustomization.yaml": """\
namespace: prod
commonLabels: {region: eu}
resources: [../base]
configMapGenerator:
  - {name: conf, files: [app.toml]}
replicas: [{name: web, count: 3}]
images: [{name: registry.example/web, newTag: "2.0"}]
patches:
  - target: {kind: Deployment, name: web}
    patch: |-
      - {op: replace, path: /spec/template/spec/containers/0/args/2, value: eu}
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {name: web}
      spec:
        template:
          spec:
            containers:
              - name: web
                env:
                  - {name: A, value: "2"}
                  - {name: B, value: "3"}
""",
        "prod/app.toml": "x = 1\n",
    })
    out = {r["kind"]: r for r in build(tmp_path / "prod")}
    dep, cm, secret = out["Deployment"], out["ConfigMap"], out["Secret"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["metadata"]["namespace"] == cm["metadata"]["namespace"] == "prod"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["selector"]["matchLabels"] == {"app": "web", "region": "eu"}
    assert dep["spec"]["template"]["metadata"]["labels"] == {"app": "web", "region": "eu"}
    assert c["image"] == "registry.example/web:2.0"
    assert c["args"] == ["serve", "--region", "eu"]
    assert c["env"][0] == {"name": "A", "value": "2"} and c["env"][2] == {"name": "B", "value": "3"}
    assert cm["metadata"]["name"].startswith("conf-") and cm["data"] == {"app.toml": "x = 1\n"}
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert c["env"][1]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"] != "creds"
    assert secret["data"] == {"TOKEN": "czNjcmV0"}
    assert "annotations" not in cm["metadata"]


def test_generated_name_changes_with_the_content(tmp_path: Path) -> None:
    write(tmp_path, {"kustomization.yaml": "configMapGenerator:\n  - {name: conf, files: [a.toml]}\n", "a.toml": "x = 1\n"})
    first = build(tmp_path)[0]["metadata"]["name"]
    write(tmp_path, {"a.toml": "x = 2\n"})
    assert build(tmp_path)[0]["metadata"]["name"] != first


@pytest.mark.parametrize(("kustomization", "message"), [
    ("resources: [web.yaml]\nnamePrefix: x-\n", "unsupported fields ['namePrefix']"),
    ("resources: [web.yaml]\npatches:\n  - target: {kind: Deployment}\n    patch: '[{op: replace, path: /spec/nope/x, value: 1}]'\n",
     "no such path"),
    ("resources: [web.yaml]\npatches:\n  - target: {kind: Service}\n    patch: '[{op: remove, path: /spec}]'\n",
     "matches no resource"),
    ("resources: [web.yaml]\nreplicas: [{name: api, count: 2}]\n", "no workload named 'api'"),
    ("resources: [missing.yaml]\n", "missing.yaml: no such file"),
])
def test_unsupported_or_broken_kustomizations_are_errors(tmp_path: Path, kustomization: str, message: str) -> None:
    write(tmp_path, {"kustomization.yaml": kustomization, "web.yaml": DEPLOYMENT})
    with pytest.raises(KustomizeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(tmp_path)


def test_compose_interpolation() -> None:
    env = {"SET": "v", "EMPTY": ""}
    doc = {"a": "${SET:-d}", "b": "${UNSET:-d}", "c": "${EMPTY:-d}", "d": "${EMPTY-d}", "e": "$$SET",
           "f": ["x${SET}y", 1], "g": "${SET:+alt}", "h": "${UNSET:+alt}", "i": "$SET"}
    assert interpolate(doc, env) == {"a": "v", "b": "d", "c": "d", "d": "", "e": "$SET", "f": ["xvy", 1],
                                     "g": "alt", "h": "", "i": "v"}
    with pytest.raises(ValueError, match="UNSET"):
        interpolate("${UNSET:?must be set}", env)
