"""The cluster path: the gateway creates Prediction resources on the real control plane
(tests/cluster; the emulator only with WHISPERX_KUBE_BACKEND=emulator), and the real
operator runs them as Jobs (the kubelet stand-in runs the Job's command, the operator's
stand-in runner) and writes status, Redis and webhooks; the official Python and
JavaScript clients drive it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx
import pytest
import yaml
from replicate.client import Client
from replicate.webhook import Webhooks

from tests.api.structural import admit
from tests.api.test_hostport import has_ipv6_loopback
from tests.cluster.fixtures import (
    RealKube,
    make_tenant,
    reset_namespace,
    service_account_kubeconfig,
    with_server_defaults,
)
from tests.conftest import free_port
from tests.flow.conftest import GatewayProcess
from tests.gateway.conftest import TOKEN, Gateway, Receiver, call, completed, serve
from tests.gateway.test_js_client import run_client
from tests.kube_fixtures import (  # noqa: F401
    PREDICTIONS,
    SECRETS,
    Emulator,
    emulator_url,
    kube,
    kube_plane,
    kubelet,
    operator,
    operator_environment,
    wait_for,
)
from whisperx_api.crd import DEFAULT_CRD_PATH
from whisperx_api.hostport import join_host_port
from whisperx_api.kube import KubeClient
from whisperx_api.store import Store
from whisperx_gateway.backend import NewPrediction
from whisperx_gateway.kube_backend import KubeBackend, prediction_manifest
from whisperx_gateway.models import ModelRef

GATEWAY_PORT = free_port()
NAMESPACE = "alpha"  # TOKEN's namespace


def kube_gateway(
    redis_url: str, emulator: Emulator, **config: Any
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    def make_backend(store: Store, url: str, secret: str) -> KubeBackend:
        # On the real API server: the gateway's ServiceAccount (the `alpha_tenant`
        # fixture points KUBECONFIG at its token).
        server = None if isinstance(emulator, RealKube) else emulator_url(emulator)
        return KubeBackend(KubeClient(server))

    return serve(redis_url, make_backend, **config)


@pytest.fixture(autouse=True)
async def alpha_tenant(
    kube: Emulator,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[dict[str, str]]:
    """How the gateway reaches the API server; on the real one, NAMESPACE is made a
    tenant the way manifests/base/tenant tells users to."""
    if not isinstance(kube, RealKube):
        yield {"WHISPERX_KUBE_SERVER": emulator_url(kube)}
        return
    await asyncio.to_thread(make_tenant, kube.plane, NAMESPACE)
    kubeconfig = service_account_kubeconfig(kube.plane, "whisperx-gateway", tmp_path / "gw.conf")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    try:
        yield {"KUBECONFIG": str(kubeconfig)}
    finally:
        await asyncio.to_thread(reset_namespace, kube.plane, NAMESPACE)


@pytest.fixture
def operator_env(kube: Emulator, redis_url: str, tmp_path: Path) -> dict[str, str]:  # noqa: F811
    # The operator writes the gateway's URLs into webhook bodies.
    return operator_environment(
        kube, redis_url, tmp_path, WHISPERX_PUBLIC_URL=f"http://127.0.0.1:{GATEWAY_PORT}"
    )


@pytest.fixture
async def cluster_gateway(
    redis_url: str,
    kube: Emulator,  # noqa: F811
    kubelet: Any,  # noqa: F811
    operator: Any,  # noqa: F811
    operator_env: dict[str, str],
) -> AsyncIterator[Gateway]:
    async with kube_gateway(
        redis_url, kube, port=GATEWAY_PORT, webhook_secret=operator_env["WHISPERX_WEBHOOK_SECRET"]
    ) as gw:
        yield gw


async def test_create_makes_a_prediction_resource_and_a_secret(
    redis_url: str,
    kube: Emulator,  # noqa: F811
) -> None:
    """Without an operator: what the gateway itself writes, and reads before any status."""
    async with kube_gateway(redis_url, kube) as gw, aiohttp.ClientSession() as http:
        body = {
            "version": "whisperx-a40-large",
            "input": {
                "audio_file": "https://example.com/a.wav",
                "huggingface_access_token": "hf_1",
                "language": "",  # Replicate clients' "unset": left out of spec.input
                "min_speakers": None,
            },
            "webhook": "https://example.com/hook",
            "webhook_events_filter": ["completed"],
        }
        headers = {**gw.auth(), "Cancel-After": "10m"}
        async with http.post(gw.url + "/v1/predictions", json=body, headers=headers) as resp:
            assert resp.status == 201
            created = await resp.json()
        prediction_id = created["id"]
        assert created["status"] == "starting" and created["model"] == "whisperx/whisperx-a40-large"
        sent = {"audio_file": "https://example.com/a.wav"}
        # The input as the API server stored it (with the schema's defaults filled in).
        stored = with_server_defaults(sent) if isinstance(kube, RealKube) else sent
        assert created["input"] == stored

        obj = kube.get(PREDICTIONS, NAMESPACE, prediction_id)
        assert obj is not None
        assert obj["metadata"]["labels"]["whisperx.io/source"] == "api"
        spec = obj["spec"]
        assert spec["input"] == stored
        assert spec["hardware"] == "whisperx-a40-large"
        assert spec["activeDeadlineSeconds"] == 600
        assert spec["webhook"] == "https://example.com/hook"
        assert spec["webhookEventsFilter"] == ["completed"]
        ref = spec["secretInputs"]["huggingface_access_token"]
        # Created, then given its owner once the Prediction exists.
        secret = await wait_for(
            lambda: (
                (s := kube.get(SECRETS, NAMESPACE, ref["name"]))
                and s["metadata"].get("ownerReferences")
                and s
            )
        )
        assert base64.b64decode(secret["data"][ref["key"]]) == b"hf_1"
        (owner,) = secret["metadata"]["ownerReferences"]
        assert owner["uid"] == obj["metadata"]["uid"] and owner["kind"] == "Prediction"

        # No operator, so no Redis record yet: the API server answers.
        async with http.get(created["urls"]["get"], headers=gw.auth()) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "starting"
        async with http.post(created["urls"]["cancel"], headers=gw.auth()) as resp:
            assert resp.status == 200
        # The gateway patched it; this test's view follows by a watch.
        cancel_requested = await wait_for(
            lambda: ((kube.get(PREDICTIONS, NAMESPACE, prediction_id) or {}).get("spec") or {}).get(
                "cancel"
            )
        )
        assert cancel_requested is True
        async with http.get(gw.url + "/v1/predictions/nosuchone", headers=gw.auth()) as resp:
            assert resp.status == 404


def test_the_manifest_is_what_the_crd_stores() -> None:
    """Unset optional inputs are left out: the CRD's enum for language has no null."""
    new = NewPrediction(
        id="p1",
        namespace=NAMESPACE,
        input={"audio_file": "https://a/b.wav", "language": None, "initial_prompt": None},
        secrets={},
        model=ModelRef(owner="whisperx", name="whisperx", version="v", hardware="whisperx"),
        webhook=None,
        webhook_events_filter=("completed",),
        run_deadline_seconds=None,
    )
    manifest = prediction_manifest(new)
    assert manifest["spec"]["input"] == {"audio_file": "https://a/b.wav"}
    crd = yaml.safe_load(DEFAULT_CRD_PATH.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert admit(schema, manifest, strict=True) == []


async def test_the_official_client_through_the_operator(
    cluster_gateway: Gateway,
    receiver: Receiver,
) -> None:
    client = Client(api_token=TOKEN, base_url=cluster_gateway.url)
    output = cast(
        "dict[str, Any]",
        await call(client.run, "acme/whisperx", input={"audio_file": "https://fake.test/succeed"}),
    )
    assert output["segments"][0]["text"] == " the quick brown fox"

    hanging = await call(
        client.predictions.create,
        version="whisperx",
        input={"audio_file": "https://fake.test/hang"},
        webhook=receiver.url,
    )
    await receiver.wait_for(lambda r: any(b["status"] == "processing" for b in r.bodies()))
    await call(hanging.cancel)
    await asyncio.wait_for(call(hanging.wait), 30)
    assert hanging.status == "canceled"

    # Webhooks come from the operator, signed with the secret the gateway hands out.
    await receiver.wait_for(completed)
    secret = await call(client.webhooks.default.secret)
    for headers, body in receiver.deliveries:
        Webhooks.validate(headers=headers, body=body, secret=secret, tolerance=60)
    assert hanging.urls is not None
    async with (
        aiohttp.ClientSession() as http,
        http.get(hanging.urls["get"], headers=cluster_gateway.auth()) as resp,
    ):
        assert receiver.bodies()[-1] == await resp.json()
    page = await call(client.predictions.list)
    assert [p.status for p in page.results] == ["canceled", "succeeded"]


async def test_a_runner_crash_shows_callers_its_exit_code_not_its_output(
    cluster_gateway: Gateway,
) -> None:
    # The stand-in runner writes "Segmentation fault (core dumped)" and exits 3; that
    # output becomes the pod's termination message (FallbackToLogsOnError).
    body = {"version": "whisperx", "input": {"audio_file": "https://fake.test/crash"}}
    async with aiohttp.ClientSession(headers=cluster_gateway.auth()) as http:
        async with http.post(cluster_gateway.url + "/v1/predictions", json=body) as resp:
            assert resp.status == 201
            url = (await resp.json())["urls"]["get"]

        async def ended() -> dict[str, Any] | None:
            async with http.get(url) as resp:
                shown: dict[str, Any] = await resp.json()
            return shown if shown["status"] in ("succeeded", "failed", "canceled") else None

        shown = await wait_for(ended, within=60, interval=0.5)
    assert shown["status"] == "failed" and shown["error"] == "the runner exited with code 3"
    assert "Segmentation" not in str(shown), shown


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_the_gateway_process_answers_on_ipv4_and_ipv6_by_default(
    redis_url: str, alpha_tenant: dict[str, str], tmp_path: Path
) -> None:
    """`whisperx-gateway` with WHISPERX_GATEWAY_HOST unset: IPv4 and IPv6 clients alike."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "REDIS_URL": redis_url,
        **alpha_tenant, "WHISPERX_TOKENS": f"{TOKEN}={NAMESPACE}",
        "WHISPERX_GATEWAY_PORT": str(port),
        "WHISPERX_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"w" * 32).decode(),
    }  # fmt: skip
    gateway = GatewayProcess(env=env, log_path=tmp_path / "gateway.log")
    try:
        await gateway.start()
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "::1"):
                async with http.get(f"http://{join_host_port(host, port)}/ready") as resp:
                    assert resp.status == 200, host
    finally:
        await gateway.stop()


async def test_the_official_javascript_client_through_the_operator(
    cluster_gateway: Gateway,
) -> None:
    result = await run_client(
        cluster_gateway,
        "cluster_run",
        WHISPERX_SUCCEED_URL="https://fake.test/succeed",
        WHISPERX_HANG_URL="https://fake.test/hang",
    )
    assert result["output"]["segments"][0]["text"] == " the quick brown fox"
    assert result["status"] == "canceled"
    # Every event (no filter), from the operator, signed with the secret the gateway gives.
    assert result["webhooks"][0] == "processing" and result["webhooks"][-1] == "canceled"
    assert all(result["valid"]) and len(result["valid"]) == len(result["webhooks"])


async def test_replicas_share_everything_and_a_restart_loses_nothing(
    alpha_tenant: dict[str, str],
    redis_url: str,
    kube: Emulator,  # noqa: F811
    kubelet: Any,  # noqa: F811
    operator: Any,  # noqa: F811
    operator_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Two replicas: one in-process, one the `whisperx-gateway` command itself."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": redis_url,
        "WHISPERX_TOKENS": f"{TOKEN}={NAMESPACE}",
        **alpha_tenant,
        "WHISPERX_GATEWAY_HOST": "127.0.0.1",
        "WHISPERX_GATEWAY_PORT": str(port),
        "WHISPERX_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "WHISPERX_WEBHOOK_SECRET": operator_env["WHISPERX_WEBHOOK_SECRET"],
    }
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("whisperx-gateway")), env=env, stdout=log, stderr=log
    )
    try:
        second = Client(api_token=TOKEN, base_url=f"http://127.0.0.1:{port}")
        async with kube_gateway(redis_url, kube) as gw:
            first = Client(api_token=TOKEN, base_url=gw.url)
            created = await call(
                first.predictions.create,
                version="whisperx",
                input={"audio_file": "https://fake.test/succeed?seconds=1"},
            )
            await _until_ready(second)
            seen = await call(second.predictions.get, created.id)  # the other replica
            await asyncio.wait_for(call(seen.wait), 30)
            assert seen.status == "succeeded"
        # The first replica is gone; a new one (same config) answers the same.
        async with kube_gateway(redis_url, kube) as gw:
            again = Client(api_token=TOKEN, base_url=gw.url)
            fetched = (await call(again.predictions.get, created.id)).dict()
            # Equal but for the URLs: these test replicas have different base URLs.
            assert {**fetched, "urls": None} == {**seen.dict(), "urls": None}
            page = await call(second.predictions.list)
            assert [p.id for p in page.results] == [created.id]
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
        log.close()


async def _until_ready(client: Client) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await call(client.models.get, "whisperx/whisperx")
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "whisperx-gateway did not start"
            await asyncio.sleep(0.2)
