"""The cluster backend: a prediction is a Prediction custom resource for the operator.

The gateway only creates Predictions and asks for cancellation (spec.cancel); the
operator is the single writer of status and of the Redis record the gateway reads. A
secret input goes to a Secret that spec.secretInputs references, never into the spec.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import aiohttp

from whisperx_api.crd import CREATED_AT_ANNOTATION, GROUP, KIND, PREDICTION_LABEL, VERSION
from whisperx_api.kube import ApiError, KubeClient, resource_path
from whisperx_api.lifecycle import format_time, now_utc
from whisperx_api.records import PredictionRecord
from whisperx_gateway.backend import BackendError, NewPrediction
from whisperx_gateway.errors import ApiError as HttpError

log = logging.getLogger(__name__)

SOURCE_LABEL = f"{GROUP}/source"


def secret_inputs_name(prediction_id: str) -> str:
    return f"{prediction_id}-inputs"


def prediction_manifest(new: NewPrediction) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # An optional field sent as null or "" (Replicate's "unset") is left out, as in
        # the CRD, where optional fields are not nullable.
        "input": {name: value for name, value in new.input.items() if value is not None},
        "hardware": new.model.hardware,
        "model": new.model.full_name,
        "version": new.model.version,
        "webhookEventsFilter": list(new.webhook_events_filter),
    }
    if new.webhook:
        spec["webhook"] = new.webhook
    if new.run_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = new.run_deadline_seconds
    if new.secrets:
        name = secret_inputs_name(new.id)
        spec["secretInputs"] = {field: {"name": name, "key": field} for field in new.secrets}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": new.id,
            "namespace": new.namespace,
            "labels": {SOURCE_LABEL: "api"},
            "annotations": {CREATED_AT_ANNOTATION: format_time(now_utc()) or ""},
        },
        "spec": spec,
    }


def secret_manifest(new: NewPrediction) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_inputs_name(new.id),
            "namespace": new.namespace,
            "labels": {PREDICTION_LABEL: new.id, SOURCE_LABEL: "api"},
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in new.secrets.items()},
    }


def owner_reference(prediction: dict[str, Any]) -> dict[str, Any]:
    meta = prediction["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "blockOwnerDeletion": False,
    }


def _translate(exc: ApiError, action: str) -> Exception:
    """An API server error as the gateway answers it."""
    if exc.status == 429 or exc.status >= 500:
        return BackendError(f"the Kubernetes API is busy or unavailable ({action}): {exc.message}")
    if exc.status in (400, 422):
        return HttpError(422, f"the cluster refused the prediction: {exc.message}")
    log.error("Kubernetes API error while %s: %s", action, exc)
    return HttpError(502, f"Kubernetes API error while {action}: {exc.status} {exc.reason}")


class KubeBackend:
    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.kube.close()

    async def create(self, new: NewPrediction) -> PredictionRecord:
        ns = new.namespace
        secrets_path = resource_path(ns, group="", version="v1", plural="secrets")
        try:
            if new.secrets:
                # Before the Prediction, so the operator never sees a reference to a
                # Secret that does not exist yet; owned by it right after, so deleting
                # the Prediction (or its TTL) removes the Secret too.
                await self.kube.create(secrets_path, secret_manifest(new))
            try:
                created = await self.kube.create(resource_path(ns), prediction_manifest(new))
            except Exception:
                if new.secrets:
                    await self.kube.delete(f"{secrets_path}/{secret_inputs_name(new.id)}")
                raise
            if new.secrets:
                await self.kube.merge_patch(
                    f"{secrets_path}/{secret_inputs_name(new.id)}",
                    {"metadata": {"ownerReferences": [owner_reference(created)]}},
                )
        except ApiError as exc:
            raise _translate(exc, "creating the prediction") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(f"the Kubernetes API is unreachable: {exc}") from exc
        log.info("prediction %s/%s created (%s)", ns, new.id, new.model.full_name)
        return PredictionRecord.from_resource(created)

    async def cancel(self, record: PredictionRecord) -> PredictionRecord:
        path = resource_path(record.namespace, record.id)
        try:
            updated = await self.kube.merge_patch(path, {"spec": {"cancel": True}})
        except ApiError as exc:
            if exc.status == 404:
                raise HttpError(404, f"prediction {record.id!r} not found") from exc
            raise _translate(exc, "canceling the prediction") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(f"the Kubernetes API is unreachable: {exc}") from exc
        return PredictionRecord.from_resource(updated)

    def metric_lines(self) -> list[str]:
        return []  # the operator exports what happens to runs in a cluster

    async def lookup(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        try:
            obj = await self.kube.get(resource_path(namespace, prediction_id))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise _translate(exc, "reading the prediction") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendError(f"the Kubernetes API is unreachable: {exc}") from exc
        return PredictionRecord.from_resource(obj)
