"""API Priority and Fairness on the real API server: the operator's FlowSchema and
PriorityLevelConfiguration (manifests/base/flowcontrol) are accepted, and the server
classifies the operator's requests, and only the operator's, into that priority level
(it names both in every answer's X-Kubernetes-PF-* headers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import SYSTEM, TENANT

NAME = "whisperx-operator"


def _object(plane: ControlPlane, kind: str) -> dict[str, Any]:
    got = plane.kubectl("get", f"{kind}.flowcontrol.apiserver.k8s.io", NAME, "-o", "json")
    obj: dict[str, Any] = json.loads(got.stdout)
    return obj


def _classified(plane: ControlPlane, account: str, path: str) -> tuple[str, str]:
    """(FlowSchema UID, PriorityLevel UID) the server put `account`'s GET of `path` in."""
    token = plane.service_account_token(SYSTEM, account)
    request = urllib.request.Request(plane.url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=plane.ssl_context(), timeout=10) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as exc:  # refused by RBAC: still classified first
        headers = exc.headers
    return (
        headers.get("X-Kubernetes-PF-FlowSchema-UID", ""),
        headers.get("X-Kubernetes-PF-PriorityLevel-UID", ""),
    )


def test_the_operators_requests_have_a_priority_level_of_their_own(stack: ControlPlane) -> None:
    schema = _object(stack, "flowschema")
    level = _object(stack, "prioritylevelconfiguration")
    conditions = {c["type"]: c["status"] for c in schema.get("status", {}).get("conditions", [])}
    # The server found the level the schema names.
    assert conditions.get("Dangling") == "False", schema.get("status")
    assert schema["spec"]["priorityLevelConfiguration"]["name"] == level["metadata"]["name"]
    expected = (schema["metadata"]["uid"], level["metadata"]["uid"])
    # Namespaced, cluster-scoped and non-resource requests alike.
    for path in (
        f"/apis/whisperx.io/v1alpha1/namespaces/{TENANT}/predictions",
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        "/apis",
    ):
        assert _classified(stack, NAME, path) == expected, path
    # Another ServiceAccount of the same namespace keeps the default classification.
    gateway = _classified(stack, "whisperx-gateway", f"/api/v1/namespaces/{TENANT}/pods")
    assert gateway[0] and gateway[0] != expected[0]
    assert gateway[1] != expected[1]
