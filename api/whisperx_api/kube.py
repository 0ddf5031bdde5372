"""A small async Kubernetes API client (aiohttp) for the few calls the gateway and the
operator's status writer make outside kopf: get, list, create, merge-patch, delete.

It reads an in-cluster service account, a kubeconfig (token or client certificate), or
an explicit server URL (tests, against an emulated API server).
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from whisperx_api.crd import GROUP, PLURAL, VERSION

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class KubeConfig:
    server: str
    token: str | None = None
    ssl_context: ssl.SSLContext | bool = True

    @classmethod
    def load(cls, server: str | None = None) -> KubeConfig:
        """An explicit server, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
        if server:
            return cls(server=server.rstrip("/"), ssl_context=False)
        if (SERVICE_ACCOUNT_DIR / "token").exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster()
        path = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0])
        return cls.from_kubeconfig(path.expanduser())

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
        token = (SERVICE_ACCOUNT_DIR / "token").read_text().strip()
        return cls(server=f"https://{host}:{port}", token=token, ssl_context=context)

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeConfig:
        config = yaml.safe_load(path.read_text())
        current = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user: dict[str, Any] = next(
            (u["user"] for u in config.get("users", []) if u["name"] == context.get("user")), {}
        )
        server = cluster["server"].rstrip("/")
        if not server.startswith("https"):
            return cls(server=server, token=user.get("token"), ssl_context=False)
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context: ssl.SSLContext | bool = False
        else:
            ssl_context = ssl.create_default_context()
            if "certificate-authority-data" in cluster:
                ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
                ssl_context.load_verify_locations(cadata=ca)
            elif "certificate-authority" in cluster:
                ssl_context.load_verify_locations(cafile=cluster["certificate-authority"])
        if isinstance(ssl_context, ssl.SSLContext) and "client-certificate-data" in user:
            _load_client_cert(ssl_context, user)
        return cls(server=server, token=user.get("token"), ssl_context=ssl_context)


def _load_client_cert(context: ssl.SSLContext, user: dict[str, Any]) -> None:
    # ssl can only load a certificate chain from files.
    with tempfile.TemporaryDirectory() as tmp:
        cert = Path(tmp) / "client.crt"
        key = Path(tmp) / "client.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        context.load_cert_chain(str(cert), str(key))


def resource_path(
    namespace: str,
    name: str | None = None,
    *,
    group: str = GROUP,
    version: str = VERSION,
    plural: str = PLURAL,
    subresource: str | None = None,
) -> str:
    base = f"/api/{version}" if group == "" else f"/apis/{group}/{version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    def __init__(self, config: KubeConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        headers = {"Accept": "application/json"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self._session = aiohttp.ClientSession(
            base_url=config.server,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=config.ssl_context, limit=100),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        async with self._session.request(
            method,
            path,
            json=body,
            params=params,
            headers={"Content-Type": content_type} if body is not None else None,
        ) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = {"message": await resp.text()}
            if resp.status >= 400:
                data = data if isinstance(data, dict) else {}
                raise ApiError(resp.status, data.get("message", ""), data.get("reason", ""))
            return data if isinstance(data, dict) else {}

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def list(self, path: str, **params: str) -> list[dict[str, Any]]:
        data = await self.request("GET", path, params=params or None)
        return list(data.get("items") or [])

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=obj)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, *, propagation: str = "Background") -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status != 404:
                raise
