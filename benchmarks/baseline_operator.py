"""The floor for the benchmark: a bare kopf operator that creates one Job per Prediction.

No validation, no Secret, no status, no finalizer, no Redis: what any kopf operator pays to
turn a created resource into a created Job on the same API server. The Job is a valid one
that passes restricted Pod Security, created suspended (as the operator's are when Kueue
queues them), so no pod runs.
"""

from __future__ import annotations

from typing import Any

import kopf

from whisperx_api.crd import GROUP, PLURAL, VERSION
from whisperx_api.kube import ApiError, KubeClient, resource_path

RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@kopf.on.startup()
async def startup(memo: Any, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    memo.kube = KubeClient()


@kopf.on.create(GROUP, VERSION, PLURAL)
async def created(body: kopf.Body, memo: Any, **_: Any) -> None:
    name, namespace = body.metadata.name, body.metadata.namespace or "default"
    container = {"name": "runner", "image": "busybox", "command": ["true"],
                 "securityContext": RESTRICTED}  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }
    try:
        await memo.kube.create(
            resource_path(namespace, group="batch", version="v1", plural="jobs"), job
        )
    except ApiError as exc:
        if exc.status != 409:
            raise
