"""What Job and pod status mean for a prediction (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from whisperx_api import lifecycle as lc
from whisperx_operator.pods import (
    RETRIED_WAITING,
    has_had_pods,
    job_event,
    pod_creation_failed,
    pod_event,
    runner_output,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)


def condition(
    type_: str, reason: str = "", message: str = "", status: str = "True"
) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def job(*conditions: dict[str, Any], suspend: bool = False) -> dict[str, Any]:
    return {
        "spec": {"suspend": suspend, "activeDeadlineSeconds": 90},
        "status": {"conditions": list(conditions)},
    }


def failed_pod(
    code: int | None = None,
    reason: str = "Error",
    finished: str = "2026-01-01T00:00:01Z",
    message: str = "",
    **status: Any,
) -> dict[str, Any]:
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "status": {"phase": "Failed", **status}}
    if code is not None:
        terminated = {
            "exitCode": code,
            "reason": reason,
            "finishedAt": finished,
            "message": message,
        }
        pod["status"]["containerStatuses"] = [
            {"name": "runner", "state": {"terminated": terminated}}
        ]
    return pod


FAILED = condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


@pytest.mark.parametrize(
    ("pods", "reason", "text"),
    [
        ([failed_pod(137, "OOMKilled")], "OOMKilled", "out of memory"),
        ([failed_pod(2, message="cannot decode audio")], "InvalidInput", "exit code 2"),
        ([failed_pod(1)], "RunnerFailed", "exit code 1"),
        ([failed_pod(139, message="Segmentation fault")], "RunnerCrashed", "exited with code 139"),
        ([failed_pod(reason="Evicted", message="x") | {"status": {"phase": "Failed",
          "reason": "Evicted", "message": "low on memory"}}], "Evicted", "low on memory"),
        ([], "BackoffLimitExceeded", "backoff limit"),
    ],
)  # fmt: skip
def test_failed_job_reads_as_its_pods_failure(
    pods: list[dict[str, Any]], reason: str, text: str
) -> None:
    event = job_event(job(FAILED), pods, AT)
    assert isinstance(event, lc.Failed) and event.reason == reason and text in event.message


@pytest.mark.parametrize("code", [1, 2, 3, 139, 143])
def test_a_runners_output_is_never_in_the_error(code: int) -> None:
    # The error reaches API callers; the output (a traceback, paths) is for an Event.
    tail = 'Traceback: File "/srv/secret.py", line 1\nhf_token=hf_abc'
    event = job_event(job(FAILED), [failed_pod(code, message=tail)], AT)
    assert isinstance(event, lc.Failed) and "hf_abc" not in event.message
    assert "secret" not in event.message
    assert runner_output(failed_pod(code, message=tail)) == tail


def test_the_latest_counted_failure_is_the_cause_not_a_preemption() -> None:
    preempted = failed_pod(
        143, finished="2026-01-01T00:00:09Z", conditions=[condition("DisruptionTarget")]
    )
    oom = failed_pod(137, "OOMKilled", finished="2026-01-01T00:00:05Z")
    event = job_event(job(FAILED), [preempted, oom], AT)
    assert isinstance(event, lc.Failed) and event.reason == "OOMKilled"


def test_deadline_and_pod_failure_policy() -> None:
    deadline = job_event(job(condition("Failed", "DeadlineExceeded")), [], AT)
    assert isinstance(deadline, lc.Failed) and deadline.reason == "DeadlineExceeded"
    assert "90 s" in deadline.message
    # FailureTarget comes before Failed on recent Kubernetes; either ends the prediction.
    policy = job_event(job(condition("FailureTarget", "PodFailurePolicy")), [failed_pod(2)], AT)
    assert isinstance(policy, lc.Failed) and policy.reason == "InvalidInput"


def test_complete_without_a_report_is_a_failure() -> None:
    event = job_event(job(condition("Complete")), [], AT)
    assert isinstance(event, lc.Failed) and event.reason == "NoResult"


def test_suspended_job_is_queued_and_resumed_is_admitted() -> None:
    queued = job_event(job(condition("Suspended", "JobSuspended"), suspend=True), [], AT)
    assert isinstance(queued, lc.Queued) and queued.reason == "Suspended"
    resumed = job_event(job(condition("Suspended", "JobResumed", status="False")), [], AT)
    assert isinstance(resumed, lc.Admitted)
    assert job_event(job(), [], AT) is None


def test_a_new_suspended_job_reads_the_same_once_its_controller_records_it() -> None:
    # A suspended Job is created without conditions; the Job controller adds Suspended a
    # moment later: the same Queued, so no second status write.
    created = job_event(job(suspend=True), [], AT)
    recorded = job_event(
        job(condition("Suspended", "JobSuspended", "Job suspended"), suspend=True), [], AT
    )
    assert created == recorded


def waiting_pod(reason: str, message: str = "") -> dict[str, Any]:
    state = {"waiting": {"reason": reason, "message": message}}
    return {
        "status": {
            "phase": "Pending",
            "conditions": [condition("PodScheduled")],
            "containerStatuses": [{"name": "runner", "image": "runner:1", "state": state}],
        }
    }


@pytest.mark.parametrize(
    ("reason", "text"),
    [("InvalidImageName", "cannot pull image runner:1"), ("ErrImageNeverPull", "runner:1")],
)
def test_pods_that_can_never_start_fail_the_prediction(reason: str, text: str) -> None:
    event = pod_event(waiting_pod(reason, "bad"), AT)
    assert isinstance(event, lc.Failed) and event.reason == "ImagePullFailed"
    assert text in event.message


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        ("ImagePullBackOff", "cannot pull image runner:1: toomanyrequests"),
        ("ErrImagePull", "cannot pull image runner:1"),
        ("CreateContainerConfigError", "toomanyrequests"),
        ("CreateContainerError", "toomanyrequests"),
    ],
)
def test_what_a_kubelet_retries_is_waited_on(reason: str, text: str) -> None:
    event = pod_event(waiting_pod(reason, "toomanyrequests"), AT)
    assert isinstance(event, lc.Waiting) and event.reason == reason and text in event.message


def test_transient_waits_and_scheduling() -> None:
    assert isinstance(pod_event(waiting_pod("ContainerCreating"), AT), lc.Admitted)
    unschedulable = {
        "status": {
            "phase": "Pending",
            "conditions": [condition("PodScheduled", "Unschedulable", "0/3 nodes: GPU", "False")],
        }
    }
    queued = pod_event(unschedulable, AT)
    assert isinstance(queued, lc.Queued) and queued.message == "0/3 nodes: GPU"
    assert isinstance(pod_event({"status": {"phase": "Running"}}, AT), lc.Admitted)
    assert pod_event({"status": {"phase": "Succeeded"}}, AT) is None
    assert pod_event({"status": {"phase": "Pending"}}, AT) is None


def test_a_missing_claim_fails_the_prediction_and_an_unbound_one_is_waited_on() -> None:
    def pending(message: str) -> dict[str, Any]:
        return {
            "status": {
                "phase": "Pending",
                "conditions": [condition("PodScheduled", "Unschedulable", message, "False")],
            }
        }

    missing = '0/3 nodes are available: persistentvolumeclaim "whisperx-models" not found.'
    event = pod_event(pending(missing), AT)
    assert isinstance(event, lc.Failed) and event.reason == "VolumeUnbound"
    assert event.message == missing
    # A claim a provisioner is still binding: the waiting grace, then VolumeUnbound.
    unbound = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    waiting = pod_event(pending(unbound), AT)
    assert isinstance(waiting, lc.Waiting) and waiting.reason == "VolumeUnbound"
    assert RETRIED_WAITING[waiting.reason] == "VolumeUnbound"


def test_a_pod_the_job_controller_could_not_create() -> None:
    refused = pod_creation_failed(
        'Error creating: pods "p-" is forbidden: error looking up service account '
        'ns/whisperx-runner: serviceaccount "whisperx-runner" not found',
        AT,
    )
    assert isinstance(refused, lc.Failed) and refused.reason == "RunnerNotCreated"
    assert 'serviceaccount "whisperx-runner" not found' in refused.message
    quota = pod_creation_failed(
        'pods "p-x" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1', AT
    )
    assert isinstance(quota, lc.Queued) and quota.reason == "QuotaExceeded"


def test_a_job_that_has_had_pods_is_past_its_failed_creates() -> None:
    assert not has_had_pods({}) and not has_had_pods({"status": {"active": 0}})
    for count in ("active", "succeeded", "failed"):
        assert has_had_pods({"status": {count: 1}})


def running_pod(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "gpu-7"},
        "status": {"phase": "Running", "conditions": list(conditions)},
    }


TAINT_DELETION = condition(
    "DisruptionTarget", "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint"
)


def test_a_pod_whose_node_stopped_responding_is_lost() -> None:
    # What the node lifecycle and taint eviction controllers leave on a lost node's pod.
    lost = running_pod(
        condition("Ready", status="False"), condition("ContainersReady"), TAINT_DELETION
    )
    event = pod_event(lost, AT)
    assert isinstance(event, lc.Failed) and event.reason == "NodeLost"
    assert "node gpu-7 stopped responding" in event.message


@pytest.mark.parametrize(
    "conditions",
    [
        # An admin's NoExecute taint on a live node: its kubelet stops the pod (and the
        # Job runs another), the pod still Ready meanwhile.
        [condition("Ready"), condition("ContainersReady"), TAINT_DELETION],
        # The kubelet reports its containers stopped.
        [
            condition("Ready", "ContainersNotReady", status="False"),
            condition("ContainersReady", "ContainersNotReady", status="False"),
            TAINT_DELETION,
        ],
        # Evicted through the API on a node that is fine.
        [
            condition("Ready"),
            condition("ContainersReady"),
            condition("DisruptionTarget", "EvictionByEvictionAPI"),
        ],
        # A node that is NotReady for a moment, before any toleration has run out.
        [condition("Ready", status="False"), condition("ContainersReady")],
    ],
)
def test_a_pod_on_a_node_that_reports_is_not_lost(conditions: list[dict[str, Any]]) -> None:
    event = pod_event(running_pod(*conditions), AT)
    assert not isinstance(event, lc.Failed)
