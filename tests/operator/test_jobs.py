"""The Job and Secret manifests of a prediction (pure)."""

from __future__ import annotations

import base64
import json
from typing import Any

from whisperx_operator import jobs
from whisperx_operator.config import DEFAULT_PROFILES, HardwareProfile, OperatorConfig

CONFIG = OperatorConfig(
    report_key=b"k" * 32,
    report_base_url="http://op:8081",
    runner_image="runner:1",
    model_cache_pvc="models",
    hf_token_secret="hf",
)


def ref(name: str = "p1", **spec: Any) -> jobs.PredictionRef:
    return jobs.PredictionRef(
        namespace="ns",
        name=name,
        uid="uid-1",
        spec={"input": {"audio_file": "https://x/a.wav"}, **spec},
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_job_is_owned_labelled_and_runs_the_runner_with_the_profile() -> None:
    job = jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx-a100-80gb"], CONFIG)
    meta = job["metadata"]
    assert meta["name"] == "p1" and meta["namespace"] == "ns"
    assert meta["ownerReferences"] == [
        {"apiVersion": "whisperx.io/v1alpha1", "kind": "Prediction", "name": "p1",
         "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip
    assert meta["labels"]["whisperx.io/prediction"] == "p1"
    # Argo CD's tracking label is never copied onto children.
    assert "app.kubernetes.io/instance" not in meta["labels"]
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["whisperx.io/prediction"] == "p1"
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["image"] == "runner:1"
    assert container["command"] == ["whisperx-runner", "run"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "64Gi"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = env_of(job)
    assert env["WHISPERX_REPORT_URL"] == "http://op:8081/reports/ns/p1"
    assert env["WHISPERX_INPUT_FILE"] == "/var/run/whisperx/input/input.json"
    assert env["WHISPERX_MODEL_DIR"] == "/models" and env["WHISPERX_MODEL"] == "large-v3"
    assert env["WHISPERX_DEVICE"] == "cuda" and env["WHISPERX_COMPUTE_TYPE"] == "float16"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    assert volumes["input"]["secret"]["secretName"] == "p1-runner"


def test_secrets_reach_the_pod_only_by_reference() -> None:
    given = ref(secretInputs={"huggingface_access_token": {"name": "mine", "key": "tok"}})
    job = jobs.runner_job(given, DEFAULT_PROFILES["whisperx"], CONFIG)
    env = env_of(job)
    assert env["WHISPERX_REPORT_TOKEN"] == {
        "secretKeyRef": {"name": "p1-runner", "key": "report-token"}
    }
    # Asked for by the user: a missing Secret must fail, not be silently skipped.
    assert env["WHISPERX_HF_TOKEN"] == {"secretKeyRef": {"name": "mine", "key": "tok"}}
    default = env_of(jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], CONFIG))
    assert default["WHISPERX_HF_TOKEN"] == {
        "secretKeyRef": {"name": "hf", "key": "token", "optional": True}
    }
    none = OperatorConfig(report_key=b"k" * 32)
    assert "WHISPERX_HF_TOKEN" not in env_of(
        jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], none)
    )


def test_runner_secret_holds_the_public_input_and_the_token() -> None:
    given = ref()
    given.spec["input"]["huggingface_access_token"] = "hf_leak"
    secret = jobs.runner_secret(given, "tok")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert json.loads(data["input.json"]) == {"audio_file": "https://x/a.wav"}
    assert data["report-token"] == "tok"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_failure_policy_deadlines_and_retries() -> None:
    job = jobs.runner_job(
        ref(startDeadlineSeconds=60, activeDeadlineSeconds=600, backoffLimit=2),
        DEFAULT_PROFILES["whisperx"],
        CONFIG,
    )
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == 660 and spec["backoffLimit"] == 2
    ignore, fail = spec["podFailurePolicy"]["rules"]
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "runner", "operator": "In", "values": [1, 2]}
    defaults = jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], CONFIG)["spec"]
    assert defaults["backoffLimit"] == 0
    assert defaults["activeDeadlineSeconds"] == 3600 + 7200


def test_kueue_queue_label_suspends_the_job() -> None:
    queued = OperatorConfig(report_key=b"k" * 32, kueue_queue="gpu")
    job = jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], queued)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert job["spec"]["suspend"] is True
    plain = jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], CONFIG)
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert "suspend" not in plain["spec"]


def test_cpu_profile_without_model_cache_uses_an_empty_dir() -> None:
    cpu = HardwareProfile.model_validate(
        {"model": "tiny.en", "device": "cpu", "computeType": "int8",
         "resources": {"requests": {"cpu": "500m"}}, "nodeSelector": {"k": "v"}}
    )  # fmt: skip
    job = jobs.runner_job(ref(), cpu, OperatorConfig(report_key=b"k" * 32))
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["models"] == {"name": "models", "emptyDir": {}}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
    assert mount["readOnly"] is False  # downloads land here
    assert pod["nodeSelector"] == {"k": "v"} and "tolerations" not in pod
    env = env_of(job)
    assert (env["WHISPERX_DEVICE"], env["WHISPERX_COMPUTE_TYPE"]) == ("cpu", "int8")


def test_the_model_cache_is_mounted_read_only_without_an_fs_group() -> None:
    job = jobs.runner_job(ref(), DEFAULT_PROFILES["whisperx"], CONFIG)
    pod = job["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["models"]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": jobs.MODEL_DIR, "readOnly": True}
    # An fsGroup would have the kubelet chown the whole cache at every start on some drivers.
    assert "fsGroup" not in pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_long_names_are_bounded_and_deterministic() -> None:
    name = "a" * 60 + "." + "b" * 100
    assert len(jobs.job_name(name)) == 63 and jobs.job_name(name) == jobs.job_name(name)
    assert jobs.job_name(name) != jobs.job_name(name + "c")
    assert len(jobs.label_value(name)) <= 63
    job = jobs.runner_job(ref(name), DEFAULT_PROFILES["whisperx"], CONFIG)
    assert job["metadata"]["annotations"][jobs.PREDICTION_ANNOTATION] == name
    assert jobs.job_name("short") == "short"


WARM = HardwareProfile.model_validate(
    {**DEFAULT_PROFILES["whisperx"].model_dump(by_alias=True), "idleSeconds": 120,
     "maxPredictions": 50}
)  # fmt: skip


def test_a_warm_runners_job_carries_no_prediction_and_its_credential_only_by_reference() -> None:
    job = jobs.warm_runner_job("ns", "whisperx-big-abc123", "big", WARM, CONFIG)
    meta = job["metadata"]
    assert "ownerReferences" not in meta  # it outlives every prediction it serves
    assert meta["labels"][jobs.RUNNER_LABEL] == "warm"
    assert meta["annotations"][jobs.HARDWARE_ANNOTATION] == "big"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == jobs.RUNNER_JOB_TTL_SECONDS
    assert "suspend" not in job["spec"]  # no Kueue queue configured
    env = env_of(job)
    assert env["WHISPERX_WORK_URL"] == "http://op:8081/work/ns.whisperx-big-abc123"
    assert env["WHISPERX_RUNNER_TOKEN"] == {
        "secretKeyRef": {"name": "whisperx-big-abc123-runner", "key": jobs.RUNNER_TOKEN_KEY}
    }
    assert env["WHISPERX_IDLE_SECONDS"] == "120" and env["WHISPERX_MAX_PREDICTIONS"] == "50"
    assert env["WHISPERX_MODEL"] == "large-v3"
    # No prediction's input, report URL or token: those come with each assignment.
    assert not {"WHISPERX_INPUT_FILE", "WHISPERX_REPORT_URL", "WHISPERX_REPORT_TOKEN"} & set(env)
    pod = job["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} == {"models", "tmp"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    # What the runner NetworkPolicies select, and what the operator watches.
    assert labels["app.kubernetes.io/name"] == "whisperx-runner"
    assert labels[jobs.MANAGED_BY_LABEL] == jobs.MANAGED_BY

    queued = jobs.warm_runner_job(
        "ns", "j", "big", WARM, OperatorConfig(report_key=b"k" * 32, kueue_queue="gpu")
    )
    assert queued["spec"]["suspend"] is True
    assert queued["metadata"]["labels"][jobs.KUEUE_QUEUE_LABEL] == "gpu"


def test_a_runner_token_secret_is_owned_by_its_job() -> None:
    job = {"metadata": {"name": "j", "uid": "job-uid"}}
    secret = jobs.warm_token_secret("ns", job, "tok")
    assert secret["metadata"]["name"] == "j-runner"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    assert base64.b64decode(secret["data"][jobs.RUNNER_TOKEN_KEY]) == b"tok"


def test_runner_ids_name_the_namespace_and_job() -> None:
    assert jobs.runner_id("ns", "whisperx-a-1") == "ns.whisperx-a-1"
    assert jobs.parse_runner_id("ns.whisperx-a-1") == ("ns", "whisperx-a-1")
    assert jobs.parse_runner_id("nodot") is None
    # Long profile names still make a valid Job name (63 at most, for the pod label).
    assert len(jobs.warm_job_name("x" * 200, "abcdef")) <= 63
