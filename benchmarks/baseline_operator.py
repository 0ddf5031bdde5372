"""The floor for the benchmark: a bare kopf operator that creates one Job per Prediction.

No validation, no Secret, no status, no finalizer, no Redis: what any kopf operator pays to
turn a created resource into a created Job on the same API server.
"""

from __future__ import annotations

from typing import Any

import kopf

from whisperx_api.crd import GROUP, PLURAL, VERSION
from whisperx_api.kube import ApiError, KubeClient, resource_path


@kopf.on.startup()
async def startup(memo: Any, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    memo.kube = KubeClient()


@kopf.on.create(GROUP, VERSION, PLURAL)
async def created(body: kopf.Body, memo: Any, **_: Any) -> None:
    name, namespace = body.metadata.name, body.metadata.namespace or "default"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}},
    }
    try:
        await memo.kube.create(
            resource_path(namespace, group="batch", version="v1", plural="jobs"), job
        )
    except ApiError as exc:
        if exc.status != 409:
            raise
