"""The whole stack as pods on the real node, deployed as a user deploys it.

The project's images (scripts/build-images.sh, cached by content) are imported into the
node's containerd; the Secrets are made as manifests/secret-templates/README.md says; the
model cache and Redis's data are pre-made local volumes; then `kubectl apply -k` of an
overlay that is manifests/overlays/kind with only the API server's address (this node's,
on the plane's port) added to the `allow-apiserver` NetworkPolicy. The operator, the
gateway and Redis run from their Deployments and StatefulSet with the manifests' probes,
security contexts and NetworkPolicies; runner Jobs run the CPU runner image. Clients
reach the gateway through its Service's cluster IP, which kube-proxy routes from here.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import REPO_ROOT
from tests.cluster.node import CACHE, RealNode, wait_for

IMAGES_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"
IMAGES_DIR = Path(os.environ.get("WHISPERX_IMAGES_DIR") or CACHE / "images")
KIND_OVERLAY = REPO_ROOT / "manifests" / "overlays" / "kind"
# The images the kind overlay runs, as scripts/build-images.sh names them.
STACK_IMAGES = ("redis", "control-plane", "runner-cpu")
SYSTEM = "whisperx-system"
TENANT = "whisperx-demo"
RUNNER_UID = 1000
REDIS_UID = 999
COMPONENTS = ("deployment/whisperx-operator", "deployment/whisperx-gateway",
              "statefulset/whisperx-redis")  # fmt: skip


def build_images(*names: str) -> dict[str, dict[str, Any]]:
    """The images' index entries by reference (`docker.io/whisperx/...`), built first
    where their inputs changed."""
    done = subprocess.run(
        ["bash", str(IMAGES_SCRIPT), "--no-report", *names],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"building the images failed:\n{done.stderr[-4000:]}")
    images: dict[str, dict[str, Any]] = json.loads((IMAGES_DIR / "index.json").read_text())[
        "images"
    ]
    return images


@dataclass
class PodStack:
    """The deployed stack: how to reach the gateway, and the tenant's API token."""

    node: RealNode
    gateway_url: str
    token: str
    workdir: Path

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.node.kubectl(*args, **kwargs)

    def get(self, kind: str, name: str, namespace: str = TENANT) -> dict[str, Any]:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        obj: dict[str, Any] = json.loads(out)
        return obj

    def items(self, kind: str, *selectors: str, namespace: str = TENANT) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json", *(f"-l{s}" for s in selectors)]
        listed: list[dict[str, Any]] = json.loads(self.kubectl(*args).stdout)["items"]
        return listed

    def prediction_pods(self, prediction: str) -> list[dict[str, Any]]:
        """The pods that ran a prediction: its own Job's, or the warm runner's it names."""
        status = self.get("prediction", prediction).get("status") or {}
        pod = status.get("podName")
        return [self.get("pod", pod)] if pod else []

    def rollout(self, timeout: int = 240) -> None:
        for component in COMPONENTS:
            args = ("rollout", "status", "-n", SYSTEM, component, f"--timeout={timeout}s")
            done = self.kubectl(*args, timeout=timeout + 10, check=False)
            if done.returncode != 0:
                raise AssertionError(f"{component} not rolled out:\n{self.diagnosis()}")

    def diagnosis(self) -> str:
        """What a user would look at when the stack does not come up."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout]
        events = self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)
        parts.append("\n".join(events.stdout.splitlines()[-30:]))
        for pod in self.items("pod", namespace=SYSTEM):
            name = pod["metadata"]["name"]
            logs = self.kubectl("logs", "-n", SYSTEM, name, "--tail=20", check=False)
            parts.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts)

    def configure_operator(self, profiles: dict[str, Any] | None = None, **env: str | None) -> None:
        """Changes the operator's settings as an admin would, in one rollout: replaces
        the hardware profiles in their ConfigMap, and sets (or, given None, removes)
        environment variables on its Deployment; the operator reads both at start."""
        if profiles is not None:
            (name,) = [
                cm["metadata"]["name"]
                for cm in self.items("configmap", namespace=SYSTEM)
                if cm["metadata"]["name"].startswith("whisperx-profiles")
            ]
            data = {"data": {"profiles.yaml": yaml.safe_dump(profiles)}}
            self.kubectl("patch", "configmap", name, "-n", SYSTEM, "--type=merge", "-p",
                         json.dumps(data))  # fmt: skip
        deployment = ("-n", SYSTEM, "deployment/whisperx-operator")
        if env:
            pairs = [f"{k}-" if v is None else f"{k}={v}" for k, v in env.items()]
            self.kubectl("set", "env", *deployment, *pairs)
        # Unchanged variables would roll nothing, and the profiles are read at start.
        self.kubectl("rollout", "restart", *deployment)
        self.rollout()

    def exec_python(self, pod: str, code: str, namespace: str, timeout: float = 60) -> str:
        """Runs Python in a pod's container (the project's images have it)."""
        done = self.kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", code,
                            check=False, timeout=timeout)  # fmt: skip
        return done.stdout.strip() + done.stderr.strip()


def _secrets(stack_token: str) -> list[dict[str, Any]]:
    """The Secrets of manifests/secret-templates, with values made here."""

    def secret(name: str, **data: str) -> dict[str, Any]:
        meta = {"name": name, "namespace": SYSTEM}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}

    return [
        secret("whisperx-redis", password=secrets.token_hex(32)),
        secret("whisperx-report-key", key=secrets.token_hex(32)),
        secret("whisperx-webhook-secret", secret="whsec_" + secrets.token_urlsafe(32)),
        secret("whisperx-files-key", key=secrets.token_hex(32)),
        secret("whisperx-gateway-tokens", **{"tokens.yaml": f"{stack_token}: {TENANT}\n"}),
    ]


def _volume(folder: Path, uid: int, namespace: str, claim: str, size: str) -> dict[str, Any]:
    """A pre-made volume on the node for one claim (as a local PersistentVolume or an NFS
    export would be), owned by the uid of the pod that uses it, like a provisioned one."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, uid, uid)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{claim}-{namespace}"},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(folder), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }


def overlay(workdir: Path, node_ip: str, port: int) -> Path:
    """manifests/overlays/kind with the API server's address: the one change a user makes
    for their cluster (manifests/README.md)."""
    folder = workdir / "overlay"
    folder.mkdir(parents=True, exist_ok=True)
    to = {"ipBlock": {"cidr": f"{node_ip}/32"}}
    patch = [
        {"op": "add", "path": "/spec/egress/0/to/-", "value": to},
        {"op": "add", "path": "/spec/egress/0/ports/-", "value": {"protocol": "TCP", "port": port}},
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KIND_OVERLAY, folder)],
        "patches": [
            {
                "target": {"kind": "NetworkPolicy", "name": "allow-apiserver"},
                "patch": yaml.safe_dump(patch),
            }
        ],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return folder


def deploy(node: RealNode, workdir: Path) -> PodStack:
    images = build_images(*STACK_IMAGES)
    for ref, entry in images.items():
        if entry["name"] in STACK_IMAGES:
            node.import_image(Path(entry["archive"]), ref)
    token = "r8_" + secrets.token_hex(20)
    # The tenant's model cache, and Redis's volume (its StatefulSet's claim template).
    volumes = [
        _volume(workdir / "models", RUNNER_UID, TENANT, "whisperx-models", "2Gi"),
        _volume(workdir / "redis", REDIS_UID, SYSTEM, "data-whisperx-redis-0", "1Gi"),
    ]
    for volume in volumes:
        node.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(volume))
    node.kubectl(
        "apply", "--server-side",
        "-f", str(REPO_ROOT / "crds" / "prediction.yaml"),
        "-f", str(REPO_ROOT / "manifests" / "base" / "kopf" / "peering-crds.yaml"),
    )  # fmt: skip
    node.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    node.kubectl("create", "namespace", SYSTEM)
    for secret in _secrets(token):
        node.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(secret))
    node.kubectl("apply", "--server-side", "-k",
                 str(overlay(workdir, node.node_ip, node.plane.port)))  # fmt: skip
    stack = PodStack(node, "", token, workdir)
    stack.rollout()
    ip = stack.get("service", "whisperx-gateway", SYSTEM)["spec"]["clusterIP"]
    stack.gateway_url = f"http://{ip}:8000"
    # The prefetch Job fills the model cache (its punkt data; tiny.en is in the image).
    node.kubectl("wait", "-n", TENANT, "--for=condition=Complete", "job",
                 "-l", "app.kubernetes.io/name=whisperx-prefetch", "--timeout=240s",
                 timeout=250)  # fmt: skip
    return stack


def eventually(what: str, check: Callable[[], Any], within: float = 120) -> Any:
    """`check()`'s first truthy value, polled until `within` seconds have passed."""
    return wait_for(what, check, within)


@pytest.fixture(scope="session")
def pod_stack(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodStack]:
    began = time.monotonic()
    stack = deploy(real_node, tmp_path_factory.mktemp("pod-stack"))
    print(f"pod stack deployed in {time.monotonic() - began:.1f} s")
    yield stack


__all__ = ["PodStack", "build_images", "eventually", "pod_stack"]
