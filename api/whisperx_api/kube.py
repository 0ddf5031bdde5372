"""The few Kubernetes API calls the gateway and the operator make outside kopf (get, list,
create, merge-patch, delete), through the official client `kubernetes_asyncio`.

Credentials come from the official loaders, in kopf's order: the in-cluster
ServiceAccount (its rotating token re-read every minute, IPv6 service hosts bracketed),
else $KUBECONFIG / ~/.kube/config with whatever its user is (token, client certificate,
an exec credential plugin as on EKS and GKE). An explicit server URL without credentials
serves development and tests against an emulated API server. The operator logs kopf in
from the same loader (`whisperx_operator.login`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException

from whisperx_api.crd import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
# The official client logs whole response bodies at DEBUG: Secrets' values among them.
logging.getLogger("kubernetes_asyncio.client.rest").setLevel(logging.INFO)

# Every status answers with a JSON object (an object, a list, or a Status).
_AS_OBJECT = {status: "object" for status in range(200, 300)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_exception(cls, exc: ApiException) -> ApiError:
        """The API server's Status (reason, message) when the body holds one."""
        try:
            status = json.loads(exc.body or "")
        except (TypeError, ValueError):
            status = None
        if not isinstance(status, dict):
            return cls(int(exc.status or 0), str(exc.body or exc.reason or ""), "")
        return cls(int(exc.status or 0), str(status.get("message", "")), status.get("reason", ""))


async def load_configuration(server: str | None = None) -> Any:
    """The client configuration: `server` as given, else in-cluster, else the kubeconfig.

    Returns a `kubernetes_asyncio.client.Configuration`.
    """
    configuration = Configuration()
    if server:
        configuration.host = server.rstrip("/")
        return configuration
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
        return configuration
    except kube_config.ConfigException:
        pass
    loader = await kube_config.load_kube_config(
        # Read now: the library's default is $KUBECONFIG as it was at import.
        config_file=os.environ.get("KUBECONFIG") or "~/.kube/config",
        client_configuration=configuration,
        persist_config=False,
    )
    if hasattr(loader, "exec_plugin_expiry"):
        # The exec plugin's token expires: run it again when it has (the loader keeps
        # the token until its expirationTimestamp).
        async def refresh(conf: Any) -> None:
            await loader.load_from_exec_plugin()
            conf.api_key["BearerToken"] = loader.token

        configuration.refresh_api_key_hook = refresh
    return configuration


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
    """Loads its configuration on first use (`server`: see `load_configuration`)."""

    def __init__(
        self, server: str | None = None, *, timeout: float = 30.0, field_manager: str = ""
    ) -> None:
        self.server = server
        self.timeout = timeout
        # Names its writes in managedFields (server-side apply's owners, `kubectl get
        # --show-managed-fields`), not the client library's user agent.
        self.field_manager = field_manager
        self._api: Any = None  # kubernetes_asyncio.client.ApiClient
        self._lock = asyncio.Lock()

    async def connect(self) -> Any:
        """The official client's ApiClient, configured (credentials read) once."""
        async with self._lock:
            if self._api is None:
                api = ApiClient(await load_configuration(self.server))
                # As kopf's own session (whisperx_operator.login): the configuration's
                # proxy only. The official client trusts the environment, so aiohttp looks
                # up ~/.netrc and proxy variables in threads on every request, which
                # costs the operator a tenth of its CPU and two thread hops per call.
                api.rest_client.pool_manager._trust_env = False
                self._api = api
            return self._api

    async def _reconnect(self, stale: Any) -> None:
        """Reads credentials again (a 401: an expired token, a rotated plugin secret)."""
        async with self._lock:
            if self._api is stale:
                self._api = None
                await stale.close()

    async def close(self) -> None:
        async with self._lock:
            if self._api is not None:
                await self._api.close()
                self._api = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        call: dict[str, Any] = {
            "query_params": list(params.items()) if params else None,
            "header_params": {"Accept": "application/json", "Content-Type": content_type},
            "body": body,
        }
        api = await self.connect()
        try:
            return await self._call(api, method, path, call)
        except ApiException as exc:
            if exc.status != 401 or self.server is not None:
                raise ApiError.from_exception(exc) from None
        log.info("the API server refused our credentials: reading them again")
        await self._reconnect(api)
        try:
            return await self._call(await self.connect(), method, path, call)
        except ApiException as exc:
            raise ApiError.from_exception(exc) from None

    async def _call(self, api: Any, method: str, path: str, call: dict[str, Any]) -> dict[str, Any]:
        data = await api.call_api(
            path,
            method,
            auth_settings=["BearerToken"],
            response_types_map=_AS_OBJECT,
            _return_http_data_only=True,
            _request_timeout=self.timeout,
            **call,
        )
        return data if isinstance(data, dict) else {}

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def list(self, path: str, **params: str) -> list[dict[str, Any]]:
        data = await self.request("GET", path, params=params or None)
        return list(data.get("items") or [])

    def _writes(self) -> dict[str, str] | None:
        return {"fieldManager": self.field_manager} if self.field_manager else None

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=obj, params=self._writes())

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            path,
            body=patch,
            content_type="application/merge-patch+json",
            params=self._writes(),
        )

    async def delete(self, path: str, *, propagation: str = "Background") -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status != 404:
                raise
