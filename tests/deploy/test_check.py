"""`make deploy-check` passes on the repository and names what is wrong in a broken copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checks_common import Report
from compose_check import check_compose
from k8s_check import check_k8s

from tests.deploy.conftest import ROOT  # also puts deploy/check on sys.path


def run_checker(root: Path, only: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "check"), "--root", str(root), "--only", only],
                          capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def failures(check, root: Path) -> list[str]:
    report = Report()
    check(root, report)
    assert report.ok, "nothing was checked"
    return report.errors


def test_repository_passes_every_check() -> None:
    code, out = run_checker(ROOT, "compose,k8s,config,docker,nats")
    assert code == 0, out
    assert " 0 failed" in out


def test_unknown_field_in_a_manifest_fails_validation(repo, edit) -> None:
    edit(repo / "deploy/k8s/base/edge.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimits: 5")
    errors = failures(check_k8s, repo)
    assert len(errors) == 3   # one per overlay
    assert all("Deployment/edgecache-edge: valid" in e and "revisionHistoryLimits" in e for e in errors)


def test_wrong_type_in_a_manifest_fails_validation(repo, edit) -> None:
    edit(repo / "deploy/k8s/nats-hub/hub.yaml", "storage: 10Gi", "storage: [10Gi]")
    errors = failures(check_k8s, repo)
    assert errors and all(e.startswith("k8s/us-east: StatefulSet/nats-hub: valid") for e in errors)


def test_region_missing_from_the_topology_is_flagged(repo, edit) -> None:
    edit(repo / "deploy/k8s/overlays/eu-west/topology.toml", 'region = "eu-west"', 'region = "eu-wset"')
    errors = failures(check_k8s, repo)
    assert errors == ["k8s/eu-west: Deployment/edgecache-edge: --region eu-west: "
                      "topology.toml: no edge with region 'eu-west' (known: eu-wset)"]


def test_bad_key_in_a_configmap_topology_names_the_key(repo, edit) -> None:
    edit(repo / "deploy/k8s/overlays/us-east/topology.toml", "[bus]\n", "[bus]\nnats_urls = 1\n")
    errors = failures(check_k8s, repo)
    assert errors and all("bus.nats_urls: unknown key" in e for e in errors)
    assert {e.split(":")[1].strip() for e in errors} == {"Deployment/edgecache-edge", "Deployment/edgecache-origin",
                                                          "StatefulSet/edgecache-sim"}


def test_missing_secret_key_is_flagged(repo, edit) -> None:
    edit(repo / "deploy/k8s/base/secrets.dev.env", "EDGECACHE_NODE_TOKEN=", "EDGECACHE_NODETOKEN=")
    errors = failures(check_k8s, repo)
    assert any("Deployment/edgecache-edge: env EDGECACHE_NODE_TOKEN from Secret" in e and "key EDGECACHE_NODE_TOKEN" in e
               for e in errors)


def test_nats_address_that_is_no_service_is_flagged(repo, edit) -> None:
    edit(repo / "deploy/k8s/overlays/ap-south/edge-nats.yaml", "nats://nats-leaf:4222", "nats://nats-laef:4222")
    errors = failures(check_k8s, repo)
    assert errors == ["k8s/ap-south: Deployment/edgecache-edge: reaches nats-laef: "
                      "neither a Service of the overlay nor an outside (dotted) name"]


def test_kustomization_loading_a_file_outside_its_folder_fails(repo, edit) -> None:
    shutil.copy(repo / "deploy/local.toml", repo / "deploy/k8s/overlays/local.toml")
    edit(repo / "deploy/k8s/overlays/eu-west/kustomization.yaml", "- topology.toml", "- ../local.toml")
    errors = failures(check_k8s, repo)
    assert errors == ["k8s/eu-west: renders: " + str((repo / "deploy/k8s/overlays/eu-west/kustomization.yaml").resolve())
                      + ": ../local.toml: files must lie inside the kustomization's folder "
                        "(kustomize's default load restrictor)"]


def test_compose_key_unknown_to_the_specification_fails(repo, edit) -> None:
    edit(repo / "deploy/compose.yaml", "    ipc: host\n", "    ipc: host\n    gpu_count: 1\n")
    errors = failures(check_compose, repo)
    assert len(errors) == 2   # the default stack and the vllm profile
    assert all("valid against the compose specification: services.vllm: 'gpu_count'" in e for e in errors)


def test_compose_backend_outside_the_profile_is_flagged(repo, edit) -> None:
    edit(repo / "deploy/compose/topology-vllm.toml", 'url = "http://vllm:8000"', 'url = "http://vllm-1:8000"')
    errors = failures(check_compose, repo)
    assert errors == ["compose.yaml [vllm]: services.origin: reaches vllm-1: not a service of this variant"]


def test_compose_edge_port_must_match_its_topology(repo, edit) -> None:
    edit(repo / "deploy/compose.yaml", '"8102:8101"', '"8102:8102"')
    errors = failures(check_compose, repo)
    assert errors and all("services.edge-eu-west: published port 8102: the service listens on 8101" in e for e in errors)


def test_compose_unknown_subcommand_is_flagged(repo, edit) -> None:
    edit(repo / "deploy/compose.yaml", '["sim", "--topology"', '["simulate", "--topology"')
    errors = failures(check_compose, repo)
    assert errors and all("services.sim-1: `edgecache simulate" in e and "invalid choice" in e for e in errors)


def test_broken_topology_fails_config_check(repo, edit) -> None:
    edit(repo / "deploy/compose/topology.toml", "[semantic]\n", "[semantic]\nenabeld = true\n")
    code, out = run_checker(repo, "config")
    assert code == 1
    assert "FAIL  edgecache config check deploy/compose/topology.toml" in out
    assert "semantic.enabeld: unknown key" in out


def test_dockerfile_entry_point_and_copy_sources_are_checked(repo, edit) -> None:
    edit(repo / "deploy/Dockerfile", 'ENTRYPOINT ["edgecache"]', 'ENTRYPOINT ["edgecache-node"]')
    edit(repo / ".dockerignore", "!nodes\n", "")
    code, out = run_checker(repo, "docker")
    assert code == 1
    assert 'FAIL  Dockerfile: ENTRYPOINT ["edgecache"]' in out
    assert "FAIL  Dockerfile: COPY nodes: excluded by .dockerignore" in out


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
def test_broken_nats_config_fails_nats_server_test(repo, edit) -> None:
    edit(repo / "deploy/nats/leaf.conf", "reconnect: 2", "reconnect_every: 2")
    code, out = run_checker(repo, "nats")
    assert code == 1
    for conf in ("leaf.conf", "leaf-us-east.conf", "leaf-eu-west.conf", "leaf-ap-south.conf"):
        assert f"FAIL  nats-server -t deploy/nats/{conf}" in out
    assert 'unknown field "reconnect_every"' in out
