"""End to end on a real cluster: deploy manifests/overlays/kind and run a prediction.

Runs only where a kubeconfig points at a reachable kind or k3d cluster (context name
`kind-*` or `k3d-*`; any other context only if WHISPERX_E2E_CONTEXT names it, so that a
developer's production context is never deployed to by accident). The images must be in
the cluster already, e.g.
`kind load docker-image whisperx/control-plane:0.1.0 whisperx/runner:0.1.0-cpu`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import manifest_support as support
import pytest
import yaml
from manifest_support import CONTROL_NS, TENANT_NS

pytestmark = pytest.mark.e2e

OVERLAY = support.OVERLAYS["kind"]
TERMINAL = {"succeeded", "failed", "canceled"}


def kubectl(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        [support.kubectl(), *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def cluster_skip_reason(env: dict[str, str] | None = None) -> str | None:
    """Why the e2e test cannot run here, or None when it can."""
    env = dict(os.environ) if env is None else env
    configs = env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not any(Path(p).is_file() for p in configs.split(os.pathsep) if p):
        return f"no kubeconfig ({configs} does not exist)"
    try:
        subprocess.run(
            [support.kubectl(), "version", "--request-timeout=3s"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        )
        context = subprocess.run(
            [support.kubectl(), "config", "current-context"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"no reachable cluster: {detail.strip().splitlines()[-1] if detail.strip() else e}"
    if not context.startswith(("kind-", "k3d-")) and env.get("WHISPERX_E2E_CONTEXT") != context:
        return (
            f"context {context!r} is not a kind/k3d cluster; "
            f"set WHISPERX_E2E_CONTEXT={context} to deploy the kind overlay to it"
        )
    return None


def test_skip_reason_without_a_cluster(tmp_path: Path) -> None:
    """Runs everywhere: the guard names why it skips, and never passes a bad config."""
    missing = str(tmp_path / "absent")
    assert (
        cluster_skip_reason({"KUBECONFIG": missing}) == f"no kubeconfig ({missing} does not exist)"
    )
    config = tmp_path / "config"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "kind-x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "kind-x",
            }
        )
    )
    reason = cluster_skip_reason({"KUBECONFIG": str(config), "PATH": os.environ["PATH"]})
    assert reason is not None and reason.startswith("no reachable cluster")


def _apply(docs: list[dict[str, Any]]) -> None:
    kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=whisperx-e2e", "-f", "-",
        stdin=yaml.safe_dump_all(docs),
    )  # fmt: skip


def _secret(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": data,
    }


@pytest.fixture(scope="module")
def deployed() -> Iterator[str]:
    """Deploys the kind overlay with fresh Secrets; yields a gateway API token."""
    reason = cluster_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    objs = [d for d in yaml.safe_load_all(support.kustomize(OVERLAY)) if d]
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    _apply(crds)
    for crd in crds:
        kubectl(
            "wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s"
        )
    # The prefetch Job is named by its spec: applying the same one again changes nothing.
    _apply([o for o in objs if o["kind"] != "CustomResourceDefinition"])
    token = "wx-e2e-" + secrets.token_hex(16)
    _apply(
        [
            _secret(CONTROL_NS, "whisperx-redis", {"password": secrets.token_hex(24)}),
            _secret(CONTROL_NS, "whisperx-report-key", {"key": secrets.token_hex(32)}),
            _secret(
                CONTROL_NS,
                "whisperx-webhook-secret",
                {"secret": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()},
            ),
            _secret(CONTROL_NS, "whisperx-files-key", {"key": secrets.token_hex(32)}),
            _secret(
                CONTROL_NS, "whisperx-gateway-tokens", {"tokens.yaml": f"{token}: {TENANT_NS}\n"}
            ),
        ]
    )
    # Pods that started before their Secrets existed pick them up on restart.
    kubectl("-n", CONTROL_NS, "rollout", "restart", "statefulset/whisperx-redis",
            "deployment/whisperx-operator", "deployment/whisperx-gateway")  # fmt: skip
    for workload in (
        "statefulset/whisperx-redis",
        "deployment/whisperx-operator",
        "deployment/whisperx-gateway",
    ):
        kubectl("-n", CONTROL_NS, "rollout", "status", workload, "--timeout=300s", timeout=320)
    prefetch = support.prefetch_job(objs)["metadata"]["name"]
    kubectl("-n", TENANT_NS, "wait", "--for=condition=Complete", f"job/{prefetch}",
            "--timeout=600s", timeout=620)  # fmt: skip
    yield token


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gateway_url(deployed: str) -> Iterator[str]:
    port = _free_port()
    forward = subprocess.Popen(
        [
            support.kubectl(),
            "-n",
            CONTROL_NS,
            "port-forward",
            "svc/whisperx-gateway",
            f"{port}:8000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_prediction_runs_on_the_cluster(deployed: str, gateway_url: str, fox_wav: Path) -> None:
    name = "e2e-" + secrets.token_hex(4)
    audio = "data:audio/wav;base64," + base64.b64encode(fox_wav.read_bytes()).decode()
    manifest = {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": name, "namespace": TENANT_NS},
        "spec": {"input": {"audio_file": audio, "language": "en"}, "activeDeadlineSeconds": 900},
    }
    kubectl("create", "-f", "-", stdin=json.dumps(manifest))
    try:
        deadline = time.monotonic() + 1200
        while True:
            obj = json.loads(kubectl("-n", TENANT_NS, "get", "prediction", name, "-o", "json"))
            if obj.get("status", {}).get("phase") in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(5)
        status = obj.get("status", {})
        assert status.get("phase") == "succeeded", status
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        assert conditions.get("Succeeded") == "True", status
        # The transcript is read back through the gateway (status + Redis).
        request = urllib.request.Request(
            f"{gateway_url}/v1/predictions/{name}",
            headers={"Authorization": f"Bearer {deployed}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "succeeded", body
        assert "fox" in json.dumps(body["output"]).lower(), body["output"]
    finally:
        kubectl("-n", TENANT_NS, "delete", "prediction", name, "--ignore-not-found", "--wait=false")


def _call(
    method: str, url: str, token: str, body: bytes | None = None, content_type: str = ""
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_an_uploaded_file_reaches_the_runner(
    deployed: str, gateway_url: str, fox_wav: Path
) -> None:
    """The official clients upload a local file input to /v1/files and pass its signed
    link: the runner pod fetches it from the gateway's Service (WHISPERX_PUBLIC_URL),
    which its allow-list and the NetworkPolicies must let it reach."""
    boundary = "wx" + secrets.token_hex(12)
    form = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="content"; filename="fox.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    form += fox_wav.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    uploaded = _call(
        "POST", f"{gateway_url}/v1/files", deployed, form,
        f"multipart/form-data; boundary={boundary}",
    )  # fmt: skip
    link = uploaded["urls"]["get"]
    assert link.startswith(f"http://whisperx-gateway.{CONTROL_NS}.svc:8000/v1/files/"), link
    body = {"version": "whisperx", "input": {"audio_file": link, "language": "en"}}
    created = _call(
        "POST", f"{gateway_url}/v1/predictions", deployed, json.dumps(body).encode(),
        "application/json",
    )  # fmt: skip
    deadline = time.monotonic() + 1200
    while True:
        prediction = _call("GET", f"{gateway_url}/v1/predictions/{created['id']}", deployed)
        if prediction["status"] in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert prediction["status"] == "succeeded", prediction
    assert "fox" in json.dumps(prediction["output"]).lower(), prediction["output"]
