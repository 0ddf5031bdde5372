"""What a Job's and its pods' status mean for the prediction (pure).

The runner reports its own progress; these functions cover what it cannot report: a pod
that never starts (image pull, missing Secret, no node), one that dies without a word
(OOMKilled, evicted, killed at the deadline), and a Job that Kueue holds in its queue.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from whisperx_api import lifecycle as lc

# Waiting reasons that do not heal by waiting: fail now rather than at the start deadline.
_PERMANENT_WAITING = {
    "ErrImageNeverPull": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
}
# Waiting reasons a kubelet retries (a registry's rate limit, a Secret created late): the
# prediction waits a bounded grace, then fails with the reason named here.
RETRIED_WAITING = {
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "CreateContainerConfigError": "ContainerConfigError",
    "CreateContainerError": "ContainerCreateError",
    # The scheduler's: a claim that exists but is not bound yet (a provisioner at work).
    "VolumeUnbound": "VolumeUnbound",
}
_MAX_MESSAGE = 1024
# The Job controller's label on the pods it creates.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# The scheduler's words for a pod whose PersistentVolumeClaim (the model cache) does not
# exist, or is not bound yet (k8s.io/kubernetes pkg/scheduler/framework/plugins/
# volumebinding).
_MISSING_VOLUME = "persistentvolumeclaim"  # `persistentvolumeclaim "x" not found`
_UNBOUND_VOLUME = "unbound immediate PersistentVolumeClaims"
# A Job controller's FailedCreate for want of quota heals when quota frees up.
_QUOTA = "exceeded quota"
# The taint eviction controller's reason on the pods it deletes for a NoExecute taint.
_TAINT_DELETION = "DeletionByTaintManager"
NODE_LOST = "NodeLost"


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or ()}


def _true(conditions: dict[str, dict[str, Any]], type_: str) -> dict[str, Any] | None:
    condition = conditions.get(type_)
    return condition if condition is not None and condition.get("status") == "True" else None


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_MESSAGE else "..." + text[-_MAX_MESSAGE:]


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        state = status.get("state") or {}
        last = status.get("lastState") or {}
        terminated = state.get("terminated") or last.get("terminated")
        if terminated:
            return dict(terminated)
    return None


def _finished_at(pod: dict[str, Any]) -> str:
    terminated = _terminated(pod) or {}
    return str(terminated.get("finishedAt") or pod["metadata"].get("creationTimestamp") or "")


def pod_failure(pod: dict[str, Any]) -> tuple[str, str]:
    """(reason, message) of a failed pod, in the words a user can act on. The message
    becomes status.error, which the gateway returns to API callers: it never carries the
    runner's output (see `runner_output`)."""
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return "Evicted", _short(status.get("message") or "the pod was evicted")
    if _true(_conditions(pod), "DisruptionTarget"):
        condition = _conditions(pod)["DisruptionTarget"]
        return "Preempted", _short(condition.get("message") or "the pod was preempted")
    terminated = _terminated(pod)
    if terminated is None:
        return "PodFailed", _short(status.get("message") or "the runner pod failed")
    code = terminated.get("exitCode")
    if terminated.get("reason") == "OOMKilled":
        return (
            "OOMKilled",
            "the runner ran out of memory (OOMKilled); use a larger hardware profile",
        )
    if code == 2:
        return "InvalidInput", "the runner refused the input or audio (exit code 2)"
    if code == 1:
        return "RunnerFailed", "the runner failed (exit code 1)"
    if code == 143:
        return "Terminated", "the runner was terminated (SIGTERM)"
    return "RunnerCrashed", f"the runner exited with code {code}"


def runner_output(pod: dict[str, Any]) -> str:
    """The last lines a failed runner wrote (its termination message: the Job's
    FallbackToLogsOnError), "" if none. They may show a traceback, server paths or input
    values, so they go to the namespace's users as an Event, never to status.error."""
    return _short((_terminated(pod) or {}).get("message") or "")


def failure_pod(pods: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The failed pod that failed a Job: the last one whose failure counted against it
    (preempted pods do not, by podFailurePolicy), else the last failed one."""
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    counted = [p for p in failed_pods if not _true(_conditions(p), "DisruptionTarget")]
    return max(counted or failed_pods, key=_finished_at) if failed_pods else None


def job_event(job: dict[str, Any], pods: Iterable[dict[str, Any]], at: datetime) -> lc.Event | None:
    """The lifecycle event a Job's status stands for, if any."""
    conditions = _conditions(job)
    failed = _true(conditions, "Failed") or _true(conditions, "FailureTarget")
    if failed is not None:
        reason = failed.get("reason") or "JobFailed"
        if reason == "DeadlineExceeded":
            seconds = (job.get("spec") or {}).get("activeDeadlineSeconds")
            return lc.Failed("DeadlineExceeded", f"the Job ran past its deadline ({seconds} s)", at)
        last = failure_pod(pods)
        if last is not None:
            pod_reason, message = pod_failure(last)
            return lc.Failed(pod_reason, message, at)
        return lc.Failed(reason, _short(failed.get("message") or "the Job failed"), at)
    if _true(conditions, "Complete") or _true(conditions, "SuccessCriteriaMet"):
        # The runner reports `completed` before it exits 0; reaching here means it did not.
        return lc.Failed("NoResult", "the runner exited without reporting a result", at)
    if (job.get("spec") or {}).get("suspend"):
        # Not the Job controller's message ("Job suspended"): the one its Suspended
        # condition brings a moment after creation would change the status a second time.
        return lc.Queued("Suspended", "the Job is suspended, waiting for admission (Kueue)", at)
    if "Suspended" in conditions:
        return lc.Admitted(at)
    return None


def _admitted(pod: dict[str, Any], at: datetime) -> lc.Admitted:
    """The pod runs, or will: it names the Job and pod that run the prediction."""
    meta = pod.get("metadata") or {}
    job = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
    return lc.Admitted(at, job=job, pod=meta.get("name"))


def node_lost(pod: dict[str, Any]) -> str | None:
    """Why the pod's run is lost with its node, or None. When a node stops reporting, the
    node lifecycle controller marks its pods not Ready (their containers still count as
    ready: no kubelet said otherwise), and past their toleration of the NotReady or
    unreachable taint (300 s by default) the taint eviction controller deletes them. No
    kubelet stops such a pod and its Job does not replace it while the node is gone. An
    admin's NoExecute taint on a live node deletes pods too, but its kubelet stops them
    (and the Job, ignoring the disruption, runs another): their Ready stays True."""
    conditions = _conditions(pod)
    disruption = _true(conditions, "DisruptionTarget")
    ready = conditions.get("Ready") or {}
    if (
        disruption is None
        or disruption.get("reason") != _TAINT_DELETION
        or ready.get("status") != "False"
        or ready.get("reason")
        or not _true(conditions, "ContainersReady")
    ):
        return None
    node = (pod.get("spec") or {}).get("nodeName") or "its node"
    return f"node {node} stopped responding and its pods are being deleted; the run was lost"


def pod_event(pod: dict[str, Any], at: datetime) -> lc.Event | None:
    """The lifecycle event of a pod that is stuck before the runner starts, or whose
    node was lost, if any."""
    lost = node_lost(pod)
    if lost is not None:
        return lc.Failed(NODE_LOST, lost, at)
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        if status.get("phase") == "Running":
            return _admitted(pod, at)
        return None
    for container in status.get("containerStatuses") or ():
        waiting = (container.get("state") or {}).get("waiting") or {}
        why = waiting.get("reason", "")
        if why not in _PERMANENT_WAITING and why not in RETRIED_WAITING:
            continue
        message = waiting.get("message") or why
        image = container.get("image")
        if why.startswith(("ErrImage", "ImagePull", "InvalidImage")) and image:
            message = f"cannot pull image {image}: {message}"
        if why in _PERMANENT_WAITING:
            return lc.Failed(_PERMANENT_WAITING[why], _short(message), at)
        return lc.Waiting(why, _short(message), at)
    scheduled = _conditions(pod).get("PodScheduled") or {}
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        message = _short(scheduled.get("message") or "no node fits the pod")
        if _UNBOUND_VOLUME in message:
            # A claim being bound or provisioned: waited on for the grace, like a kubelet's
            # retries; one that never binds fails then with this reason.
            return lc.Waiting("VolumeUnbound", message, at)
        if _MISSING_VOLUME in message:
            # No node will ever do until someone creates the claim.
            return lc.Failed("VolumeUnbound", message, at)
        return lc.Queued("Unschedulable", message, at)
    if scheduled.get("status") == "True":
        return _admitted(pod, at)
    return None


def has_had_pods(job: dict[str, Any]) -> bool:
    """Whether the Job controller has created a pod of `job` (one runs, or has ended):
    an earlier FailedCreate is then history (a replayed Event after a restart)."""
    status = job.get("status") or {}
    return any(status.get(count) for count in ("active", "succeeded", "failed"))


def pod_creation_failed(message: str, at: datetime) -> lc.Event:
    """The event for the Job controller's `FailedCreate` (it could not create the pod):
    no pod will come of it (a missing ServiceAccount, a Pod Security violation, an
    admission webhook's refusal), except for want of quota, which is waited on."""
    if _QUOTA in message:
        return lc.Queued("QuotaExceeded", _short(message), at)
    return lc.Failed("RunnerNotCreated", _short(message), at)
