"""The RBAC sets of manifest_support (which test_policy.py holds the rendered roles to)
against what the code really calls: the real operator process and the gateway's
Kubernetes backend, run against the emulated API server (tests/kube_fixtures.py) through
every path that touches the API, with each request recorded as the (group, resource,
verb) RBAC would check. Every call must be granted, and every grant must be called."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock
from aiohttp import web

from tests.conftest import free_port
from tests.kube_fixtures import (
    JOBS,
    PREDICTIONS,
    Emulator,
    Kubelet,
    PodPlan,
    emulator_url,
    operator_environment,
    prediction_body,
    running_emulator,
    running_operator,
    wait_for,
    wait_for_phase,
)
from tests.manifests import manifest_support as support
from whisperx_api.kube import KubeClient
from whisperx_api.store import Store
from whisperx_api.webhooks import generate_secret
from whisperx_gateway.app import create_app
from whisperx_gateway.auth import TokenMap
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.kube_backend import KubeBackend

Triple = tuple[str, str, str]
NS = "default"
SUCCEED = "https://fake.test/succeed"
HANG = "https://fake.test/hang"
TOKEN = "test-token-0123456789"
# Granted for an admission check, never called: creating an object whose owner reference
# sets blockOwnerDeletion needs it where OwnerReferencesPermissionEnforcement runs.
# The namespaced mode's rights (WHISPERX_NAMESPACES) go unused cluster-wide; that mode is
# run in tests/operator/test_operator.py.
OPERATOR_NEVER_CALLED = {
    ("whisperx.io", "predictions/finalizers", "update"),
    *support.NAMESPACED_MODE_RIGHTS,
}


def rbac_triples(requests: Iterable[Any]) -> set[Triple]:
    """(apiGroup, resource[/subresource], verb) of recorded API requests."""
    return {call[1:] for call in rbac_calls(requests)}


def rbac_calls(requests: Iterable[Any]) -> set[tuple[str | None, str, str, str]]:
    """(namespace or None for cluster-wide, apiGroup, resource[/subresource], verb) of
    recorded API requests; discovery requests (no resource) need no RBAC rule."""
    calls = set()
    for request in requests:
        resource = request.resource
        if resource is None or not resource.plural:
            continue
        method = str(request.method.value).upper()
        if method == "GET":
            watch = request.params.get("watch") in ("true", "1")
            verb = "watch" if watch else "get" if request.name else "list"
        elif method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}[method]
        plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((request.namespace, resource.group or "", plural, verb))
    return calls


@dataclass
class FakeRequest:
    """What rbac_triples reads of a kmock request."""

    method: kmock.method
    resource: kmock.resource | None
    name: str | None = None
    subresource: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    namespace: str | None = None


def test_triples_of_requests() -> None:
    pods = kmock.resource("", "v1", "pods")
    jobs = kmock.resource("batch", "v1", "jobs")
    predictions = kmock.resource("whisperx.io", "v1alpha1", "predictions")
    requests = [
        FakeRequest(kmock.method.GET, pods, params={"watch": "true"}),
        FakeRequest(kmock.method.GET, pods),
        FakeRequest(kmock.method.GET, jobs, "j"),
        FakeRequest(kmock.method.PATCH, predictions, "p", "status"),
        FakeRequest(kmock.method.PUT, predictions, "p", "finalizers"),
        FakeRequest(kmock.method.DELETE, jobs, "j"),
        FakeRequest(kmock.method.POST, kmock.resource("", "v1", "events")),
        FakeRequest(kmock.method.GET, None),  # discovery
    ]
    assert rbac_triples(requests) == {
        ("", "pods", "watch"),
        ("", "pods", "list"),
        ("batch", "jobs", "get"),
        ("whisperx.io", "predictions/status", "patch"),
        ("whisperx.io", "predictions/finalizers", "update"),
        ("batch", "jobs", "delete"),
        ("", "events", "create"),
    }
    scoped = [
        FakeRequest(kmock.method.GET, pods),
        FakeRequest(kmock.method.POST, jobs, namespace="t"),
    ]
    assert rbac_calls(scoped) == {(None, "", "pods", "list"), ("t", "batch", "jobs", "create")}


async def test_the_operator_calls_exactly_what_its_cluster_role_grants(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_emulator() as kube, Kubelet(kube, tmp_path / "kubelet") as kubelet:
        kube.keep_requests = True
        env = operator_environment(kube, redis_url, tmp_path)
        async with running_operator(kube, env, tmp_path / "operator.log") as operator:
            kubelet.plan("oom", PodPlan(oom_kill_after=0.3))
            # Succeeds, then its TTL deletes it (predictions delete).
            await create(kube, "ok", SUCCEED, ttlSecondsAfterFinished=1)
            # Its Job fails: the operator lists its pods for the reason.
            await create(kube, "oom", HANG)
            # Canceled: the Job is deleted.
            await create(kube, "cancel", HANG)
            # Running while the operator restarts: resuming finds its Secret and Job
            # already there (409) and gets them to check their owner.
            await create(kube, "slow", f"{SUCCEED}?seconds=4")
            await wait_for_phase(kube, "cancel", ["processing"])
            await kube.patch_object(PREDICTIONS, NS, "cancel", {"spec": {"cancel": True}})
            assert (await wait_for_phase(kube, "cancel"))["status"]["phase"] == "canceled"
            await wait_for(lambda: kube.get(JOBS, NS, "cancel") is None)
            await wait_for_phase(kube, "slow", ["processing"])
            await operator.restart(kube)
            assert (await wait_for_phase(kube, "slow"))["status"]["phase"] == "succeeded"
            assert (await wait_for_phase(kube, "oom"))["status"]["reason"] == "OOMKilled"
            await wait_for(lambda: kube.get(PREDICTIONS, NS, "ok") is None, within=10)
        calls = rbac_calls(kube)
    # NS plays a tenant namespace: the Role there adds the tenant rights.
    assert {ns for ns, *_ in calls} <= {None, NS}
    cluster_wide = {call[1:] for call in calls if call[0] is None}
    in_tenant = {call[1:] for call in calls if call[0] == NS}
    cluster, tenant = support.OPERATOR_CLUSTER_RIGHTS, support.OPERATOR_TENANT_RIGHTS
    assert cluster_wide - cluster == set(), "called cluster-wide without a cluster-wide grant"
    assert in_tenant - (cluster | tenant) == set(), "called without a grant"
    assert tenant - in_tenant == set(), "granted in tenant namespaces, never called"
    assert cluster - (cluster_wide | in_tenant) == OPERATOR_NEVER_CALLED, "granted, never called"


async def test_the_gateway_calls_exactly_what_its_role_grants(redis_url: str) -> None:
    async with running_emulator() as kube:
        kube.keep_requests = True
        config = GatewayConfig(
            tokens=TokenMap.from_mapping({TOKEN: NS}),
            redis_url=redis_url,
            webhook_secret=generate_secret(),
            files_key=b"test-files-key",
        )
        store = Store.from_url(redis_url)
        backend = KubeBackend(KubeClient(emulator_url(kube)))
        runner = web.AppRunner(create_app(config, store, backend))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
        body = {
            "version": "whisperx",
            "input": {"audio_file": "https://example.com/a.wav", "huggingface_access_token": "t"},
        }
        try:
            async with aiohttp.ClientSession(headers=auth) as http:
                # Create (Secret, Prediction, Secret owner patch), read before any status
                # (get), cancel (patch).
                async with http.post(f"{url}/v1/predictions", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    created = await resp.json()
                async with http.get(created["urls"]["get"]) as resp:
                    assert resp.status == 200, await resp.text()
                async with http.post(created["urls"]["cancel"]) as resp:
                    assert resp.status == 200, await resp.text()
                # The API server refuses the Prediction: the Secret is deleted again.
                kube[kmock.method.POST, PREDICTIONS] << 422
                async with http.post(f"{url}/v1/predictions", json=body) as resp:
                    assert resp.status >= 400
        finally:
            await runner.cleanup()
            await store.close()
        used = rbac_triples(kube)
    assert used - support.GATEWAY_RIGHTS == set(), "called without a grant"
    assert support.GATEWAY_RIGHTS - used == set(), "granted, never called"


async def create(kube: Emulator, name: str, audio: str, **spec: Any) -> None:
    await kube.create_object(PREDICTIONS, NS, prediction_body(name, audio, **spec))
