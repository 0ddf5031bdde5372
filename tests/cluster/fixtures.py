"""pytest fixtures for the real control plane: the plane itself (one per test session),
the stack deployed on it from manifests/ with the real kubectl, the kubelet stand-in, and
the operator and gateway as processes authenticated as their own ServiceAccounts.

In another test area's conftest.py: `from tests.cluster.fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.client import Cluster, ResourceRef
from tests.cluster.controlplane import REPO_ROOT, ControlPlane, build_binaries, free_port
from tests.cluster.kubelet import Kubelet
from whisperx_api.crd import GROUP, PLURAL, VERSION
from whisperx_api.schema import input_json_schema

PREDICTIONS = ResourceRef(GROUP, VERSION, PLURAL)
JOBS = ResourceRef("batch", "v1", "jobs")
PODS = ResourceRef("", "v1", "pods")
SECRETS = ResourceRef("", "v1", "secrets")
EVENTS = ResourceRef("", "v1", "events")
TENANT = "whisperx-demo"
# The kind overlay's tenant, and `default`, made a tenant too (tests/cluster/stack).
TENANTS = (TENANT, "default")
# The namespace manifests/base/tenant names its objects in (its kustomization's).
TENANT_BASE_NAMESPACE = "whisperx-demo"
SYSTEM = "whisperx-system"
STACK = REPO_ROOT / "tests" / "cluster" / "stack"
VENV_BIN = str(Path(sys.executable).parent)


def deploy_stack(plane: ControlPlane, models: Path) -> None:
    """What a user runs (README): the CRDs, then the kustomize tree, server-side. The
    model cache first: one folder of this machine, a PersistentVolume for each tenant's
    claim (as an NFS export would be), so the claims bind as they are created."""
    for namespace in TENANTS:
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"whisperx-models-{namespace}"},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(models)},
                "claimRef": {"namespace": namespace, "name": "whisperx-models"},
            },
        }
        plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(pv))
    plane.apply(
        "-f", str(REPO_ROOT / "crds" / "prediction.yaml"),
        "-f", str(REPO_ROOT / "manifests" / "base" / "kopf" / "peering-crds.yaml"),
    )  # fmt: skip
    plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    plane.apply("-k", str(STACK))
    for namespace in TENANTS:
        plane.kubectl("wait", "-n", namespace, "--for=jsonpath={.status.phase}=Bound",
                      "pvc/whisperx-models", "--timeout=60s")  # fmt: skip


def make_tenant(
    plane: ControlPlane, namespace: str, *, without: Collection[str] = frozenset()
) -> None:
    """Serves another namespace the way manifests/base/tenant tells users to (a copy with
    another `namespace:`), less the kinds in `without`, and its prefetch Job. Removed
    with the namespace at the session's end or by `remove_tenant`."""
    rendered = plane.kubectl("kustomize", str(REPO_ROOT / "manifests" / "base" / "tenant")).stdout
    docs = []
    for doc in yaml.safe_load_all(rendered):
        if doc["kind"] in without or doc["kind"] == "Job":
            continue
        if doc["kind"] == "Namespace":
            doc["metadata"]["name"] = namespace
        elif doc["metadata"].get("namespace") == TENANT_BASE_NAMESPACE:
            doc["metadata"]["namespace"] = namespace
        docs.append(doc)
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs))


def remove_tenant(plane: ControlPlane, namespace: str) -> None:
    plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def with_server_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """`spec.input` as the real API server stores it: the CRD schema's defaults filled in
    (the emulator stores what it is given)."""
    properties = input_json_schema(include_secrets=False)["properties"]
    defaults = {k: p["default"] for k, p in properties.items() if p.get("default") is not None}
    return {**defaults, **given}


def component_environment(plane: ControlPlane, configmaps: list[str]) -> dict[str, str]:
    """The plain settings the manifests give a component (its ConfigMaps' data)."""
    env: dict[str, str] = {}
    listed = json.loads(plane.kubectl("get", "configmap", "-n", SYSTEM, "-o", "json").stdout)
    for item in listed["items"]:
        name = item["metadata"]["name"]
        if any(name.startswith(prefix + "-") for prefix in configmaps):
            env.update(item.get("data") or {})
    return env


def service_account_kubeconfig(plane: ControlPlane, name: str, path: Path) -> Path:
    """A kubeconfig holding a TokenRequest token of the ServiceAccount `name`."""
    return plane.kubeconfig(plane.service_account_token(SYSTEM, name), path)


def reset_namespace(plane: ControlPlane, namespace: str) -> None:
    """Removes what a test left: Predictions (finalizers too, the operator may be down),
    their Jobs, pods and Secrets, and Events."""
    ns = ["-n", namespace]
    listed = plane.kubectl("get", "predictions", *ns, "-o", "name", check=False).stdout.split()
    for name in listed:
        plane.kubectl("patch", name, *ns, "--type=merge", "-p",
                      '{"metadata": {"finalizers": null}}', check=False)  # fmt: skip
    plane.kubectl("delete", "predictions,jobs", "--all", *ns, "--wait=false", check=False)
    plane.kubectl("delete", "pods", "--all", *ns, "--grace-period=0", "--force",
                  "--wait=false", check=False)  # fmt: skip
    plane.kubectl("delete", "secrets,events", "-l", "whisperx.io/prediction", *ns,
                  "--wait=false", check=False)  # fmt: skip
    plane.kubectl("delete", "events", "--all", *ns, "--wait=false", check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = plane.kubectl("get", "predictions,jobs,pods", *ns, "-o", "name",
                             check=False).stdout.split()  # fmt: skip
        if not left:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{namespace} not empty after a test: {left}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane(workdir, bin_dir=build_binaries()) as plane:
        yield plane


@pytest.fixture(scope="session")
def cluster_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache's folder (the PersistentVolumes' hostPath); empty until a test
    asks for `aligner` (tiny.en itself comes from its package)."""
    path = tmp_path_factory.mktemp("cluster-models")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def aligner(cluster_models: Path, model_dir: Path) -> Path:
    """The runner tests' English aligner, placed in the cluster's model cache."""
    target = cluster_models / "align"
    if not target.exists():
        target.symlink_to(model_dir / "align")
    return cluster_models


@pytest.fixture(scope="session")
def stack(control_plane: ControlPlane, cluster_models: Path) -> ControlPlane:
    deploy_stack(control_plane, cluster_models)
    return control_plane


class RealKube(Cluster):
    """The admin's view of a control plane, which it can also mint tokens from."""

    def __init__(self, plane: ControlPlane) -> None:
        super().__init__(plane.url, plane.admin.token, plane.ssl_context())
        self.plane = plane


@contextlib.asynccontextmanager
async def real_kube(plane: ControlPlane) -> AsyncIterator[RealKube]:
    """An admin client with caches of a prediction's objects; on the way out, what the
    test left in the tenant namespaces is removed."""
    async with RealKube(plane) as client:
        await client.track(PREDICTIONS, JOBS, PODS, SECRETS, EVENTS)
        try:
            yield client
        finally:
            await asyncio.to_thread(reset_namespace, plane, TENANT)
            await asyncio.to_thread(reset_namespace, plane, "default")


@contextlib.asynccontextmanager
async def node_agent_for(kube: RealKube, workdir: Path) -> AsyncIterator[Kubelet]:
    """The kubelet stand-in; runner processes find the project's programs on PATH."""
    env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    async with Kubelet(kube.plane, workdir, extra_env=env) as kubelet:
        yield kubelet


@pytest.fixture
async def cluster(stack: ControlPlane) -> AsyncIterator[RealKube]:
    async with real_kube(stack) as client:
        yield client


@pytest.fixture
async def node_agent(cluster: RealKube, tmp_path: Path) -> AsyncIterator[Kubelet]:
    async with node_agent_for(cluster, tmp_path / "kubelet") as kubelet:
        yield kubelet


def operator_settings(
    plane: ControlPlane, redis_url: str, workdir: Path, **overrides: str
) -> dict[str, str]:
    """The operator's environment as its Deployment gets it, with local addresses and a
    kubeconfig holding its ServiceAccount's token."""
    report_port = free_port()
    env = component_environment(plane, ["whisperx-operator-settings", "whisperx-shared-settings"])
    profiles = json.loads(plane.kubectl("get", "configmap", "-n", SYSTEM, "-o", "json").stdout)[
        "items"
    ]
    profile_data = next(
        i["data"]["profiles.yaml"]
        for i in profiles
        if i["metadata"]["name"].startswith("whisperx-profiles-")
    )
    (workdir / "profiles.yaml").write_text(profile_data)
    env.update(
        {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "HOME": str(workdir),
            "KUBECONFIG": str(service_account_kubeconfig(
                plane, "whisperx-operator", workdir / "operator.kubeconfig")),
            "REDIS_URL": redis_url,
            "WHISPERX_PROFILES_FILE": str(workdir / "profiles.yaml"),
            "WHISPERX_REPORT_KEY": "test-report-key-0123456789abcdef",
            "WHISPERX_WEBHOOK_SECRET": "whsec_" + "d2ViaG9vay1zZWNyZXQtb2YtdGhlLXRlc3RzLTAxMjM=",
            "WHISPERX_REPORT_BASE_URL": f"http://127.0.0.1:{report_port}",
            "WHISPERX_REPORT_PORT": str(report_port),
            "WHISPERX_LIVENESS_PORT": str(free_port()),
            "WHISPERX_LISTEN_HOST": "127.0.0.1",
            "WHISPERX_RUNNER_COMMAND": json.dumps(["whisperx-runner", "run"]),
            "WHISPERX_RUNNER_ENV": json.dumps({"WHISPERX_ALLOW_HOSTS": "127.0.0.1"}),
            "POD_ID": f"operator-{report_port}",
            "WHISPERX_LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
        }
    )  # fmt: skip
    env.update(overrides)
    return env


def yaml_dump(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


__all__ = [
    "aligner",
    "cluster",
    "cluster_models",
    "control_plane",
    "node_agent",
    "stack",
]
