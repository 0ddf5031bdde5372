"""The objects a prediction runs as: one Job and one Secret (pure manifest builders).

The Secret carries what must not sit in the Job or the Prediction as plain values: the
input (a data URI can exceed an environment variable's size limit, so the runner reads it
as a file) and the report token. The Hugging Face token comes from a Secret named in
`spec.secretInputs`, or from the operator's default HF Secret when there is one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from whisperx_api import work
from whisperx_api.crd import GROUP, KIND, PREDICTION_LABEL, VERSION
from whisperx_api.schema import public_input
from whisperx_operator.config import HardwareProfile, OperatorConfig

# Annotation with the full Prediction name (labels are capped at 63 characters).
PREDICTION_ANNOTATION = f"{GROUP}/prediction-name"
HARDWARE_ANNOTATION = f"{GROUP}/hardware"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER = "runner"
INPUT_KEY = "input.json"
TOKEN_KEY = "report-token"
INPUT_DIR = "/var/run/whisperx/input"
MODEL_DIR = "/models"
# Runner exit codes the Job fails on at once: 1 (failed; it has reported the failure, so
# a retry could change nothing) and 2 (invalid input or audio). Other deaths (OOMKilled,
# a crash without a report) use up `backoffLimit`; preemptions do not.
PERMANENT_EXIT_CODES = (1, 2)


def _bounded(name: str, limit: int) -> str:
    """`name` if it fits, else a prefix and a hash, deterministic for the same name."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11].rstrip('-.')}-{digest}"


def job_name(prediction: str) -> str:
    # Job names end up in a pod label (batch.kubernetes.io/job-name): at most 63.
    return _bounded(prediction, 63)


def label_value(prediction: str) -> str:
    return _bounded(prediction, 63)


def secret_name(prediction: str) -> str:
    return f"{_bounded(prediction, 63)}-runner"


def report_url(config: OperatorConfig, namespace: str, prediction: str) -> str:
    return work.report_url(config.report_base_url, namespace, prediction)


@dataclass(frozen=True)
class PredictionRef:
    """What the manifests need to know about the Prediction that owns them."""

    namespace: str
    name: str
    uid: str
    spec: dict[str, Any]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PredictionRef:
        meta = body["metadata"]
        return cls(
            namespace=meta.get("namespace") or "default",
            name=meta["name"],
            uid=meta.get("uid") or "",
            spec=dict(body.get("spec") or {}),
        )

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self) -> dict[str, str]:
        # Only our own labels: copying the Prediction's (e.g. Argo CD's tracking label
        # app.kubernetes.io/instance) would make Argo CD claim the Job as its own.
        return {
            PREDICTION_LABEL: label_value(self.name),
            "app.kubernetes.io/name": "whisperx-runner",
            "app.kubernetes.io/component": "prediction",
            "app.kubernetes.io/managed-by": "whisperx-operator",
        }

    def metadata(self, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.labels(), **(extra_labels or {})},
            "annotations": {PREDICTION_ANNOTATION: self.name},
            "ownerReferences": [self.owner_reference()],
        }


def runner_secret(ref: PredictionRef, token: str) -> dict[str, Any]:
    data = {
        INPUT_KEY: json.dumps(public_input(ref.spec.get("input") or {})),
        TOKEN_KEY: token,
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": ref.metadata(secret_name(ref.name)),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _hf_token_env(ref: PredictionRef, config: OperatorConfig) -> dict[str, Any] | None:
    given = (ref.spec.get("secretInputs") or {}).get("huggingface_access_token")
    if given:
        # The user asked for this Secret: a missing one must fail visibly, not silently.
        return _secret_env("WHISPERX_HF_TOKEN", given["name"], given["key"])
    if config.hf_token_secret:
        return _secret_env(
            "WHISPERX_HF_TOKEN", config.hf_token_secret, config.hf_token_secret_key, optional=True
        )
    return None


def deadlines(ref: PredictionRef, config: OperatorConfig) -> tuple[int, int]:
    """(start deadline, run deadline) in seconds."""
    spec = ref.spec
    start = int(spec.get("startDeadlineSeconds") or config.default_start_deadline_seconds)
    active = int(spec.get("activeDeadlineSeconds") or config.default_active_deadline_seconds)
    return start, active


def runner_job(
    ref: PredictionRef, profile: HardwareProfile, config: OperatorConfig
) -> dict[str, Any]:
    start_deadline, active_deadline = deadlines(ref, config)
    backoff = ref.spec.get("backoffLimit")
    queue = {KUEUE_QUEUE_LABEL: config.kueue_queue} if config.kueue_queue else {}
    env: list[dict[str, Any]] = [
        {"name": "WHISPERX_INPUT_FILE", "value": f"{INPUT_DIR}/{INPUT_KEY}"},
        {"name": "WHISPERX_REPORT_URL", "value": report_url(config, ref.namespace, ref.name)},
        _secret_env("WHISPERX_REPORT_TOKEN", secret_name(ref.name), TOKEN_KEY),
        # Each pod of the Job is one runner attempt: a replacement (eviction, preemption,
        # a retry) numbers its reports from 1 again, so its reports name their pod.
        {
            "name": "WHISPERX_RUNNER_ATTEMPT",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
        },
        {"name": "WHISPERX_MODEL_DIR", "value": MODEL_DIR},
        {"name": "WHISPERX_MODEL", "value": profile.model},
        {"name": "WHISPERX_DEVICE", "value": profile.device},
        {"name": "WHISPERX_COMPUTE_TYPE", "value": profile.compute_type},
        # Libraries write caches under $HOME; the root filesystem is read-only.
        {"name": "HOME", "value": "/tmp"},
    ]
    if profile.batch_size is not None:
        env.append({"name": "WHISPERX_BATCH_SIZE", "value": str(profile.batch_size)})
    hf = _hf_token_env(ref, config)
    if hf is not None:
        env.append(hf)
    env += [{"name": k, "value": v} for k, v in sorted(config.runner_env.items())]

    # The shared cache is filled by the prefetch Job and only read here; without one, an
    # emptyDir takes what the runner downloads (WHISPERX_ALLOW_DOWNLOADS).
    cache = bool(config.model_cache_pvc)
    models: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": config.model_cache_pvc, "readOnly": True}}
        if cache
        else {"emptyDir": {}}
    )
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.runner_image,
        "imagePullPolicy": config.runner_image_pull_policy,
        "command": list(config.runner_command),
        "env": env,
        "resources": {k: dict(v) for k, v in profile.resources.items()},
        "volumeMounts": [
            {"name": "input", "mountPath": INPUT_DIR, "readOnly": True},
            {"name": "models", "mountPath": MODEL_DIR, "readOnly": cache},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # On a crash the last log lines become the pod's termination message: the error.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Time for the runner to report `canceled` after SIGTERM.
        "terminationGracePeriodSeconds": 15,
        # No fsGroup: emptyDirs are writable and Secret files readable by any uid, and an
        # fsGroup would have the kubelet chown the whole model cache on some drivers.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "input",
                "secret": {
                    "secretName": secret_name(ref.name),
                    "items": [{"key": INPUT_KEY, "path": INPUT_KEY}],
                },
            },
            {"name": "models", **models},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if config.runner_service_account:
        pod_spec["serviceAccountName"] = config.runner_service_account
    if profile.node_selector:
        pod_spec["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in profile.tolerations]

    spec: dict[str, Any] = {
        "backoffLimit": config.default_backoff_limit if backoff is None else int(backoff),
        # A backstop that holds while the operator is down; the operator itself enforces the
        # start and run deadlines separately and with clearer reasons.
        "activeDeadlineSeconds": start_deadline + active_deadline,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                },
            ]
        },
        "template": {
            "metadata": {
                "labels": ref.labels(),
                "annotations": {
                    PREDICTION_ANNOTATION: ref.name,
                    HARDWARE_ANNOTATION: ref.spec.get("hardware") or "whisperx",
                },
            },
            "spec": pod_spec,
        },
    }
    if queue:
        # Kueue admits the Job by unsuspending it; until then it reads as queued.
        spec["suspend"] = True
    meta = ref.metadata(job_name(ref.name), queue)
    meta["annotations"][HARDWARE_ANNOTATION] = ref.spec.get("hardware") or "whisperx"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
