"""The operator and the gateway on the real control plane, each a local process holding a
token of its own ServiceAccount from manifests/, so the manifests' RBAC authorizes every
call they make."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import (
    TENANT,
    VENV_BIN,
    component_environment,
    operator_settings,
    service_account_kubeconfig,
)
from tests.conftest import free_port
from tests.flow.conftest import GatewayProcess
from tests.kube_fixtures import OperatorProcess

GATEWAY_TOKEN = "cluster-tenant-token-0001"


@dataclass
class Stack:
    """The running pieces of one test: operator, gateway, and how to reach them."""

    plane: ControlPlane
    operator: OperatorProcess
    gateway: GatewayProcess
    redis_url: str

    @property
    def token(self) -> str:
        return GATEWAY_TOKEN


@pytest.fixture
def cluster_operator_env(stack: ControlPlane, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The operator's environment; a test module may override this fixture."""
    return operator_settings(stack, redis_url, tmp_path)


@pytest.fixture
async def cluster_operator(
    cluster_operator_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[OperatorProcess]:
    operator = OperatorProcess(env=cluster_operator_env, log_path=tmp_path / "operator.log")
    operator.start()
    try:
        await operator.wait_ready(within=60)
        yield operator
    finally:
        await operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log_tail(150)}")


@pytest.fixture
async def cluster_gateway(
    stack: ControlPlane,
    redis_url: str,
    tmp_path: Path,
    cluster_operator_env: dict[str, str],
) -> AsyncIterator[GatewayProcess]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = component_environment(stack, ["whisperx-gateway-settings", "whisperx-shared-settings"])
    env.update(
        {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            "KUBECONFIG": str(
                service_account_kubeconfig(stack, "whisperx-gateway", tmp_path / "gw.kubeconfig")
            ),
            "REDIS_URL": redis_url,
            "WHISPERX_TOKENS": f"{GATEWAY_TOKEN}={TENANT}",
            "WHISPERX_GATEWAY_HOST": "127.0.0.1",
            "WHISPERX_GATEWAY_PORT": str(port),
            "WHISPERX_PUBLIC_URL": url,
            "WHISPERX_INTERNAL_URL": url,
            "WHISPERX_WEBHOOK_SECRET": cluster_operator_env["WHISPERX_WEBHOOK_SECRET"],
            "WHISPERX_FILES_KEY": "files-key-of-the-tests-0123456789",
            "PYTHONUNBUFFERED": "1",
        }
    )
    gateway = GatewayProcess(env=env, log_path=tmp_path / "gateway.log")
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()
        print(f"--- gateway log (tail) ---\n{gateway.log()[-3000:]}")


__all__ = ["GATEWAY_TOKEN", "Stack", "cluster_gateway", "cluster_operator", "cluster_operator_env"]
