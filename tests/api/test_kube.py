"""The Kubernetes client: the official loaders' credentials, and the API server's errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import kopf
import pytest
from aiohttp import web
from kopf._core.intents.causes import Activity
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import incluster_config

from tests.conftest import free_port
from tests.kube_auth import plugin_runs, write_exec_kubeconfig
from whisperx_api.kube import ApiError, KubeClient, load_configuration, resource_path
from whisperx_operator.login import connection_info, login

PATH = resource_path("default", "p1")


@dataclass
class TokenServer:
    """An API server stand-in that accepts only the token now in `token_file`."""

    url: str
    token_file: Path
    seen: list[str | None] = field(default_factory=list)


def status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason}
    return web.json_response({**body, "message": message, "code": code}, status=code)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TokenServer]:
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    port = free_port()
    state = TokenServer(f"http://127.0.0.1:{port}", token_file)

    async def handle(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        state.seen.append(header)
        if header != f"Bearer {token_file.read_text()}":
            return status(401, "Unauthorized", "Unauthorized")
        if request.path != PATH:
            return status(404, "NotFound", f'predictions "{request.path}" not found')
        return web.json_response({"metadata": {"name": "p1"}, "method": request.method})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


async def test_exec_plugin_credentials_are_sent(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_exec_kubeconfig(tmp_path / "config", server.url, server.token_file)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient()
    try:
        assert (await client.get(PATH))["method"] == "GET"
        await client.merge_patch(PATH, {"spec": {"cancel": True}})
    finally:
        await client.close()
    assert server.seen == ["Bearer token-1", "Bearer token-1"]
    assert plugin_runs(kubeconfig) == 1  # no expiry: the credential is kept


async def test_a_refused_credential_runs_the_plugin_again(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_exec_kubeconfig(tmp_path / "config", server.url, server.token_file)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient()
    try:
        await client.get(PATH)
        server.token_file.write_text("token-2")  # rotated: token-1 is now refused
        await client.get(PATH)
    finally:
        await client.close()
    assert server.seen == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
    assert plugin_runs(kubeconfig) == 2


async def test_an_expiring_plugin_credential_is_renewed_before_use(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within the client's five-minute skew: expired at once, so every request renews it.
    kubeconfig = write_exec_kubeconfig(
        tmp_path / "config", server.url, server.token_file, lifetime=60
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient()
    try:
        await client.get(PATH)
        server.token_file.write_text("token-2")
        await client.get(PATH)
    finally:
        await client.close()
    assert server.seen == ["Bearer token-1", "Bearer token-2"]  # no 401 on the way


async def test_an_explicit_server_is_used_without_credentials(server: TokenServer) -> None:
    client = KubeClient(server.url)
    try:
        with pytest.raises(ApiError) as refused:
            await client.get(PATH)
    finally:
        await client.close()
    assert (refused.value.status, refused.value.reason) == (401, "Unauthorized")
    assert server.seen == [None]  # nothing to read again: not retried


async def test_not_found_keeps_reason_and_message(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_exec_kubeconfig(tmp_path / "config", server.url, server.token_file)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient()
    try:
        with pytest.raises(ApiError) as missing:
            await client.get(resource_path("default", "other"))
        await client.delete(resource_path("default", "other"))  # a 404 on delete is done
    finally:
        await client.close()
    assert (missing.value.status, missing.value.reason) == (404, "NotFound")
    assert "not found" in missing.value.message


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], int]:
    """An in-cluster environment: the ServiceAccount files, the Service's host and port;
    returns what rotates the token as the kubelet does."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token-1")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return token.write_text


async def test_in_cluster_ipv6_host_is_bracketed(service_account: Callable[[str], int]) -> None:
    configuration = await load_configuration()
    assert configuration.host == "https://[fd00:10:96::1]:443"


async def test_in_cluster_token_is_read_again_after_rotation(
    service_account: Callable[[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kubelet rotates the projected token; the client re-reads it (every minute).
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", timedelta(0))
    configuration = await load_configuration()
    assert await configuration.get_api_key_with_prefix("BearerToken") == "Bearer sa-token-1"
    service_account("sa-token-2")
    assert await configuration.get_api_key_with_prefix("BearerToken") == "Bearer sa-token-2"


async def test_kopf_logs_in_with_the_same_credentials(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_exec_kubeconfig(tmp_path / "config", server.url, server.token_file)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    info = await connection_info(await load_configuration())
    assert (info.server, info.scheme, info.token) == (server.url, "Bearer", "token-1")
    assert info.as_http_headers() == {"Authorization": "Bearer token-1"}


def test_kopf_has_no_other_login() -> None:
    """Ours replaces kopf's fallbacks (which would pick another installed client)."""
    registry = kopf.get_default_registry()
    handlers = registry._activities.get_handlers(activity=Activity.AUTHENTICATION)
    assert [handler.fn for handler in handlers] == [login]


async def test_the_helper_takes_the_token_itself(
    server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_exec_kubeconfig(tmp_path / "config", server.url, "token-1")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient()
    try:
        await client.get(PATH)
    finally:
        await client.close()
    assert server.seen == ["Bearer token-1"]


def test_an_error_without_a_status_body_keeps_the_text() -> None:
    exc = ApiException(status=502, reason="Bad Gateway")
    exc.body = "upstream connect error"
    error = ApiError.from_exception(exc)
    assert (error.status, error.reason, error.message) == (502, "", "upstream connect error")


def test_response_bodies_are_never_logged() -> None:
    """The official client logs bodies (Secrets' values) at DEBUG; the operator's tests
    and its debug level must not."""
    rest = logging.getLogger("kubernetes_asyncio.client.rest")
    assert not rest.isEnabledFor(logging.DEBUG)


async def test_no_proxy_is_taken_from_the_environment(
    server: TokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As kopf's own client: a proxy comes from the kubeconfig, never from the environment
    # (looking it up cost two thread hops on every call). This one would refuse.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = KubeClient(server.url)
    try:
        with pytest.raises(ApiError) as refused:
            await client.get(PATH)  # no token: the server itself answers
        assert refused.value.status == 401
    finally:
        await client.close()
