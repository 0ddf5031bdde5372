"""Real users' credentials, on the real control plane: a kubeconfig whose user is an exec
credential plugin (as EKS and GKE write them), for kubectl, the operator (kopf and the
official client) and the gateway; and a rotated token, a plugin's or a ServiceAccount's
in-cluster one, picked up without a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.config import incluster_config
from replicate.client import Client

from tests.cluster.client import Cluster
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import PREDICTIONS, SYSTEM, TENANT
from tests.cluster.kubelet import Kubelet, wait_until
from tests.cluster.stack_fixtures import GATEWAY_TOKEN
from tests.flow.conftest import GatewayProcess
from tests.kube_auth import plugin_runs, write_exec_kubeconfig
from tests.kube_fixtures import OperatorProcess, operator_environment
from whisperx_api.kube import ApiError, KubeClient, resource_path


def exec_kubeconfig(plane: ControlPlane, account: str, path: Path) -> Path:
    token = plane.service_account_token(SYSTEM, account)
    return write_exec_kubeconfig(path, plane.url, token, ca_file=plane.ca_file)


def test_kubectl_with_an_exec_plugin(stack: ControlPlane, tmp_path: Path) -> None:
    kubeconfig = exec_kubeconfig(stack, "whisperx-operator", tmp_path / "exec.kubeconfig")
    listed = stack.kubectl("get", "pred", "-A", kubeconfig=kubeconfig)
    assert listed.returncode == 0 and plugin_runs(kubeconfig) >= 1
    # The plugin's token is the operator's: its RBAC holds, not an admin's.
    refused = stack.kubectl("get", "secrets", "-n", SYSTEM, kubeconfig=kubeconfig, check=False)
    assert refused.returncode != 0 and "Forbidden" in refused.stderr


async def test_operator_and_gateway_with_exec_plugins_and_a_rotated_token(
    cluster: Any,
    node_agent: Kubelet,
    redis_url: str,
    tmp_path: Path,
) -> None:
    plane: ControlPlane = cluster.plane
    operator_config = exec_kubeconfig(plane, "whisperx-operator", tmp_path / "op.kubeconfig")
    env = operator_environment(cluster, redis_url, tmp_path)
    env.update(KUBECONFIG=str(operator_config))
    operator = OperatorProcess(env=env, log_path=tmp_path / "operator.log")
    operator.start()
    # The gateway's first token dies with the Secret it is bound to: after the rotation,
    # only a client that runs its plugin again gets through.
    gateway_config = write_exec_kubeconfig(
        tmp_path / "gw.kubeconfig", plane.url, bound_token(plane, "gw-cred-1"),
        ca_file=plane.ca_file,
    )  # fmt: skip
    gateway = GatewayProcess(
        env={
            **{k: v for k, v in env.items() if k in ("PATH", "HOME", "REDIS_URL")},
            "KUBECONFIG": str(gateway_config),
            "WHISPERX_TOKENS": f"{GATEWAY_TOKEN}={TENANT}",
            "WHISPERX_GATEWAY_HOST": "127.0.0.1",
            "WHISPERX_GATEWAY_PORT": str(_port()),
            "WHISPERX_WEBHOOK_SECRET": env["WHISPERX_WEBHOOK_SECRET"],
        },
        log_path=tmp_path / "gateway.log",
    )
    try:
        await operator.wait_ready(within=60)
        await gateway.start()
        client = Client(api_token=GATEWAY_TOKEN, base_url=gateway.url)
        first = await asyncio.to_thread(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": "https://fake.test/succeed"},
        )
        await wait_until(lambda: _phase(cluster, first.id) == "succeeded", within=60)
        # Rotation: the plugin hands out a new token, the old one is revoked.
        token_file = Path(str(gateway_config) + ".token")
        old = await asyncio.to_thread(token_file.read_text)
        await asyncio.to_thread(token_file.write_text, bound_token(plane, "gw-cred-2"))
        runs = plugin_runs(gateway_config)
        plane.kubectl("delete", "secret", "gw-cred-1", "-n", SYSTEM)
        # The API server caches a token's review for a few seconds.
        stale = plane.kubeconfig(old, tmp_path / "stale.kubeconfig")
        await wait_until(
            lambda: plane.kubectl("auth", "whoami", kubeconfig=stale, check=False).returncode,
            within=60, interval=1,
        )  # fmt: skip
        second = await asyncio.to_thread(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": "https://fake.test/succeed"},
        )
        await wait_until(lambda: _phase(cluster, second.id) == "succeeded", within=60)
        assert plugin_runs(operator_config) >= 1 and plugin_runs(gateway_config) > runs
    finally:
        await gateway.stop()
        await operator.stop()
        print(operator.log_tail(60))


async def test_a_rotated_service_account_token_is_read_again_in_cluster(
    stack: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod: the kubelet rewrites the projected token file before the old token
    expires. The client (the gateway's and the operator's) reads the file again, at the
    library's refresh or at the API server's first 401, with no restart."""
    token_file = tmp_path / "token"
    token_file.write_text(bound_token(stack, "sa-cred-1"))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token_file))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(stack.ca_file))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(stack.port))
    client = KubeClient()
    missing = resource_path(TENANT, "no-such-prediction")
    try:
        # 404: authenticated and allowed (the gateway's Role reads Predictions there).
        with pytest.raises(ApiError) as first:
            await client.get(missing)
        assert first.value.status == 404
        old = token_file.read_text()
        token_file.write_text(bound_token(stack, "sa-cred-2"))
        stack.kubectl("delete", "secret", "sa-cred-1", "-n", SYSTEM)
        stale = stack.kubeconfig(old, tmp_path / "stale.kubeconfig")
        await wait_until(
            lambda: stack.kubectl("auth", "whoami", kubeconfig=stale, check=False).returncode,
            within=60, interval=1,
        )  # fmt: skip
        with pytest.raises(ApiError) as after:
            await client.get(missing)
        assert after.value.status == 404
    finally:
        await client.close()
        stack.kubectl("delete", "secret", "sa-cred-2", "-n", SYSTEM, check=False)


def bound_token(plane: ControlPlane, secret: str) -> str:
    """A token of the gateway's ServiceAccount that is valid while Secret `secret` lives."""
    plane.kubectl("create", "secret", "generic", secret, "-n", SYSTEM)
    return plane.kubectl(
        "create", "token", "whisperx-gateway", "-n", SYSTEM,
        "--bound-object-kind=Secret", f"--bound-object-name={secret}",
    ).stdout.strip()  # fmt: skip


def _phase(cluster: Cluster, name: str) -> str | None:
    obj = cluster.get(PREDICTIONS, TENANT, name)
    return ((obj or {}).get("status") or {}).get("phase")


def _port() -> int:
    from tests.conftest import free_port

    return free_port()
