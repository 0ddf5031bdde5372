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
# On every Job and pod the operator makes: what it watches (selected server-side).
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "whisperx-operator"
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
            MANAGED_BY_LABEL: MANAGED_BY,
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


def _model_env(profile: HardwareProfile, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "WHISPERX_MODEL_DIR", "value": MODEL_DIR},
        {"name": "WHISPERX_MODEL", "value": profile.model},
        {"name": "WHISPERX_DEVICE", "value": profile.device},
        {"name": "WHISPERX_COMPUTE_TYPE", "value": profile.compute_type},
        # Libraries write caches under $HOME; the root filesystem is read-only.
        {"name": "HOME", "value": "/tmp"},
    ]
    if profile.batch_size is not None:
        env.append({"name": "WHISPERX_BATCH_SIZE", "value": str(profile.batch_size)})
    return env


def _pod_spec(
    profile: HardwareProfile,
    config: OperatorConfig,
    env: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The runner's pod, one-shot or warm: restricted Pod Security, the model cache,
    the profile's resources and placement."""
    env = [*env, *({"name": k, "value": v} for k, v in sorted(config.runner_env.items()))]
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
            *mounts,
            {"name": "models", "mountPath": MODEL_DIR, "readOnly": cache},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # On a crash the last log lines become the pod's termination message, which the
        # operator posts as an Event on the Prediction (pods.runner_output).
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
        "volumes": [*volumes, {"name": "models", **models}, {"name": "tmp", "emptyDir": {}}],
    }
    if config.runner_service_account:
        pod_spec["serviceAccountName"] = config.runner_service_account
    if profile.node_selector:
        pod_spec["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in profile.tolerations]
    return pod_spec


def _queued(spec: dict[str, Any], config: OperatorConfig) -> dict[str, str]:
    """Through Kueue when configured: the Job starts suspended, and Kueue admits it by
    unsuspending it (until then it reads as queued). The labels the Job needs for it."""
    if not config.kueue_queue:
        return {}
    spec["suspend"] = True
    return {KUEUE_QUEUE_LABEL: config.kueue_queue}


def runner_job(
    ref: PredictionRef, profile: HardwareProfile, config: OperatorConfig
) -> dict[str, Any]:
    """The one-shot Job of a prediction whose profile keeps no runner warm."""
    start_deadline, active_deadline = deadlines(ref, config)
    backoff = ref.spec.get("backoffLimit")
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
        *_model_env(profile, config),
    ]
    hf = _hf_token_env(ref, config)
    if hf is not None:
        env.append(hf)
    input_volume = {
        "name": "input",
        "secret": {
            "secretName": secret_name(ref.name),
            "items": [{"key": INPUT_KEY, "path": INPUT_KEY}],
        },
    }
    input_mount = {"name": "input", "mountPath": INPUT_DIR, "readOnly": True}
    pod_spec = _pod_spec(profile, config, env, [input_volume], [input_mount])
    hardware = ref.spec.get("hardware") or "whisperx"
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
                "annotations": {PREDICTION_ANNOTATION: ref.name, HARDWARE_ANNOTATION: hardware},
            },
            "spec": pod_spec,
        },
    }
    meta = ref.metadata(job_name(ref.name), _queued(spec, config))
    meta["annotations"][HARDWARE_ANNOTATION] = hardware
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


# --- warm runners ---

# On a warm runner's Job and pod: the hardware profile it serves is its HARDWARE_ANNOTATION.
RUNNER_LABEL = f"{GROUP}/runner"
RUNNER_TOKEN_KEY = "runner-token"
# Finished runner Jobs (and their token Secrets, which they own) are removed after this.
RUNNER_JOB_TTL_SECONDS = 300


def runner_labels() -> dict[str, str]:
    return {
        RUNNER_LABEL: "warm",
        "app.kubernetes.io/name": "whisperx-runner",
        "app.kubernetes.io/component": "warm-runner",
        MANAGED_BY_LABEL: MANAGED_BY,
    }


def warm_job_name(profile: str, suffix: str) -> str:
    return f"{_bounded(f'whisperx-{profile}'.lower(), 56)}-{suffix}"


def runner_id(namespace: str, job: str) -> str:
    """A warm runner's id in the work protocol: its namespace and Job (a namespace name
    has no dots)."""
    return f"{namespace}.{job}"


def parse_runner_id(runner: str) -> tuple[str, str] | None:
    namespace, _, job = runner.partition(".")
    return (namespace, job) if namespace and job else None


def warm_token_secret(namespace: str, job: dict[str, Any], token: str) -> dict[str, Any]:
    """The runner's work credential, owned by its Job (removed with it)."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": f"{meta['name']}-runner",
            "namespace": namespace,
            "labels": runner_labels(),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "data": {RUNNER_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def warm_runner_job(
    namespace: str,
    name: str,
    hardware: str,
    profile: HardwareProfile,
    config: OperatorConfig,
) -> dict[str, Any]:
    """A warm runner's Job: it loads the model once and asks the operator for the
    predictions of its profile in its namespace, one after another, until it has been
    idle for the profile's idle time. Each prediction's input and secrets come in the
    answer to that request, never in the Job."""
    env: list[dict[str, Any]] = [
        {
            "name": "WHISPERX_WORK_URL",
            "value": work.work_url(config.report_base_url, runner_id(namespace, name)),
        },
        _secret_env("WHISPERX_RUNNER_TOKEN", f"{name}-runner", RUNNER_TOKEN_KEY),
        {"name": "WHISPERX_IDLE_SECONDS", "value": str(profile.idle_seconds)},
        {"name": "WHISPERX_MAX_PREDICTIONS", "value": str(profile.max_predictions)},
        *_model_env(profile, config),
    ]
    if config.hf_token_secret:
        # The namespace's default token; a prediction's own comes with its assignment.
        env.append(
            _secret_env(
                "WHISPERX_HF_TOKEN",
                config.hf_token_secret,
                config.hf_token_secret_key,
                optional=True,
            )
        )
    spec: dict[str, Any] = {
        # A runner whose pod fails is not retried: the operator fails or re-queues the one
        # prediction it held, and starts another runner when work needs one.
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": RUNNER_JOB_TTL_SECONDS,
        "template": {
            "metadata": {
                "labels": runner_labels(),
                "annotations": {HARDWARE_ANNOTATION: hardware},
            },
            "spec": _pod_spec(profile, config, env, [], []),
        },
    }
    labels = {**runner_labels(), **_queued(spec, config)}
    meta = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "annotations": {HARDWARE_ANNOTATION: hardware},
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
