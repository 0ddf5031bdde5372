"""The harness itself, on the real control plane: what the other suites rely on.

RBAC, Pod Security and TokenRequest are the API server's own; Jobs, garbage collection,
TTL-after-finished, namespaces and node lifecycle are the controller-manager's; binding
is the scheduler's. The kubelet stand-in only runs what they bound to its nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.client import NODES, Cluster
from tests.cluster.controlplane import CPU_NODE, GPU_NODE, ControlPlane
from tests.cluster.fixtures import JOBS, PODS, TENANT, reset_namespace
from tests.cluster.kubelet import Kubelet, PodPlan, can_make_mount_namespaces, wait_until

# A namespace without Pod Security labels: these pods are plain shells.
NS = "harness"


@pytest.fixture(autouse=True)
def harness_namespace(stack: ControlPlane) -> Iterator[None]:
    stack.kubectl("create", "namespace", NS, check=False)
    yield
    reset_namespace(stack, NS)


def job(name: str, script: str, **pod_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "busybox", "command": ["sh", "-c", script]}
                    ],
                    **pod_spec,
                }
            },
        },
    }


def pods_of(cluster: Cluster, job_name: str, namespace: str = NS) -> list[dict[str, Any]]:
    return cluster.list(PODS, namespace, labels={"batch.kubernetes.io/job-name": job_name})


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == type_ and cond["status"] == "True":
            return dict(cond)
    return None


def test_rbac_is_enforced_for_the_manifests_service_accounts(
    stack: ControlPlane, tmp_path: Path
) -> None:
    def can(sa: str, namespace: str, verb: str, what: str, sub: str = "") -> bool:
        home = namespace if sa == "whisperx-runner" else "whisperx-system"
        kubeconfig = stack.kubeconfig(
            stack.service_account_token(home, sa), tmp_path / f"{sa}.kubeconfig"
        )
        extra = [f"--subresource={sub}"] if sub else []
        result = stack.kubectl("auth", "can-i", verb, what, *extra, "-n", namespace,
                               kubeconfig=kubeconfig, check=False)  # fmt: skip
        return result.stdout.strip() == "yes"

    assert can("whisperx-gateway", TENANT, "create", "predictions.whisperx.io")
    assert not can("whisperx-gateway", "kube-public", "create", "predictions.whisperx.io")
    assert not can("whisperx-gateway", TENANT, "patch", "predictions.whisperx.io", "status")
    assert not can("whisperx-gateway", TENANT, "get", "secrets")
    assert can("whisperx-operator", TENANT, "patch", "predictions.whisperx.io", "status")
    assert not can("whisperx-operator", TENANT, "create", "pods")
    assert not can("whisperx-runner", TENANT, "get", "predictions.whisperx.io")
    # A request, not only a review: the runner's token is refused by the server itself.
    runner = stack.kubeconfig(stack.service_account_token(TENANT, "whisperx-runner"),
                              tmp_path / "runner-get.kubeconfig")  # fmt: skip
    refused = stack.kubectl("get", "pods", "-n", TENANT, kubeconfig=runner, check=False)
    assert refused.returncode != 0 and "Forbidden" in refused.stderr


def test_the_tenant_namespace_enforces_restricted_pod_security(stack: ControlPlane) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                                 "securityContext": {"privileged": True}}]},
    }  # fmt: skip
    refused = stack.kubectl("create", "-n", TENANT, "-f", "-", stdin=json.dumps(pod), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr


async def test_a_job_runs_on_a_node_and_the_controllers_clean_up(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    body = job(
        "hello",
        "echo hello from $HOSTNAME_VALUE",
    )
    body["spec"]["ttlSecondsAfterFinished"] = 1
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "HOSTNAME_VALUE",
                         "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]  # fmt: skip
    await cluster.create_object(JOBS, NS, body)
    # The session's first pod on the stand-in (its nodes just registered).
    try:
        done = await wait_until(
            lambda: condition(cluster.get(JOBS, NS, "hello"), "Complete"), within=90
        )
    except TimeoutError:
        seen = {
            "job": cluster.get(JOBS, NS, "hello"),
            "pods": pods_of(cluster, "hello"),
            "runs": [(r.name, r.node, r.exit_code) for r in node_agent.runs("hello")],
        }
        raise AssertionError(f"the Job did not complete: {json.dumps(seen, default=str)}") from None
    assert done["reason"] == "CompletionsReached"
    assert node_agent.logs("hello") == f"hello from {CPU_NODE}\n"
    # TTL-after-finished deletes the Job; the garbage collector its pod.
    await wait_until(lambda: cluster.get(JOBS, NS, "hello") is None)
    await wait_until(lambda: not pods_of(cluster, "hello"))


async def test_gpu_pods_go_to_the_gpu_node_and_wait_when_none_is_free(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    gpu = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}

    def gpu_job(name: str, count: int) -> dict[str, Any]:
        body = job(name, "sleep 0.2", **gpu)
        body["spec"]["template"]["spec"]["containers"][0]["resources"] = {
            "limits": {"nvidia.com/gpu": str(count)}
        }
        return body

    await cluster.create_object(JOBS, NS, gpu_job("one-gpu", 1))
    await cluster.create_object(JOBS, NS, gpu_job("many-gpus", 8))
    await wait_until(lambda: condition(cluster.get(JOBS, NS, "one-gpu"), "Complete"))
    assert node_agent.runs("one-gpu")[0].node == GPU_NODE
    pending = await wait_until(lambda: [p for p in pods_of(cluster, "many-gpus")
                                        if _false(p, "PodScheduled")])  # fmt: skip
    unscheduled = _false(pending[0], "PodScheduled")
    assert unscheduled and "Insufficient nvidia.com/gpu" in unscheduled["message"]


def _false(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond["type"] == type_ and cond["status"] == "False" and cond.get("message"):
            return dict(cond)
    return None


async def test_the_stand_in_resolves_env_and_volumes_as_a_kubelet(
    stack: ControlPlane, cluster: Cluster, node_agent: Kubelet
) -> None:
    stack.kubectl("create", "secret", "generic", "s1", "-n", NS, "--from-literal=k=from-secret")
    stack.kubectl("create", "configmap", "c1", "-n", NS, "--from-literal=k=from-configmap")
    # Container paths in env values and args map to the pod's local folders.
    body = job("envs", 'echo "$A $B $C $D"; cat "$S/k"; echo; cat "$CM/k"; ls "$SCRATCH"')
    spec = body["spec"]["template"]["spec"]
    spec["containers"][0]["env"] = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}},
        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c1", "key": "k"}}},
        {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "D", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k",
                                                     "optional": True}}},
        {"name": "S", "value": "/mnt/s"}, {"name": "CM", "value": "/mnt/c"},
        {"name": "SCRATCH", "value": "/scratch"},
    ]  # fmt: skip
    spec["containers"][0]["volumeMounts"] = [
        {"name": "s", "mountPath": "/mnt/s"}, {"name": "c", "mountPath": "/mnt/c"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]  # fmt: skip
    spec["volumes"] = [{"name": "s", "secret": {"secretName": "s1"}},
                       {"name": "c", "configMap": {"name": "c1"}},
                       {"name": "scratch", "emptyDir": {}}]  # fmt: skip
    try:
        await cluster.create_object(JOBS, NS, body)
        await wait_until(lambda: condition(cluster.get(JOBS, NS, "envs"), "Complete"))
        assert node_agent.logs("envs") == (
            f"from-secret from-configmap {NS} \nfrom-secret\nfrom-configmap"  # `ls` of empty
        )
    finally:
        stack.kubectl("delete", "-n", NS, "secret/s1", "configmap/c1", check=False)


async def test_a_read_only_mount_cannot_be_written_even_by_root(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    if not can_make_mount_namespaces():
        pytest.skip("no mount namespaces on this machine: the stand-in cannot enforce readOnly")
    # One volume, mounted read-write and read-only: the process writes through the first
    # and reads what it wrote through the second, which refuses a write.
    script = 'echo written > "$RW/f"; cat "$RO/f"; touch "$RO/g" 2>/dev/null || echo refused'
    body = job("read-only", script)
    spec = body["spec"]["template"]["spec"]
    spec["containers"][0]["env"] = [{"name": "RW", "value": "/rw"}, {"name": "RO", "value": "/ro"}]
    spec["containers"][0]["volumeMounts"] = [
        {"name": "v", "mountPath": "/rw"}, {"name": "v", "mountPath": "/ro", "readOnly": True},
    ]  # fmt: skip
    spec["volumes"] = [{"name": "v", "emptyDir": {}}]
    await cluster.create_object(JOBS, NS, body)
    await wait_until(lambda: condition(cluster.get(JOBS, NS, "read-only"), "Complete"))
    assert node_agent.logs("read-only") == "written\nrefused\n"


async def test_a_missing_secret_key_leaves_the_container_waiting(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    body = job("config-error", "true")
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}
    ]
    await cluster.create_object(JOBS, NS, body)

    def waiting() -> str | None:
        for pod in pods_of(cluster, "config-error"):
            for status in (pod.get("status") or {}).get("containerStatuses") or ():
                reason = (status["state"].get("waiting") or {}).get("reason")
                if reason == "CreateContainerConfigError":
                    return str(status["state"]["waiting"]["message"])
        return None

    assert 'secret "absent" not found' in await wait_until(waiting)


async def test_injected_faults_read_as_a_kubelet_reports_them(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    node_agent.plan("oom", PodPlan(oom_kill_after=0.3))
    node_agent.plan("evicted", PodPlan(evict_after=0.3))
    node_agent.plan("pull", PodPlan(waiting_reason="ImagePullBackOff", waiting_message="rate"))
    for name in ("oom", "evicted", "pull"):
        body = job(name, "sleep 30")
        body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 1
        if name == "evicted":
            body["spec"]["podFailurePolicy"] = {"rules": [{
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }]}  # fmt: skip
            body["spec"]["backoffLimit"] = 0
        await cluster.create_object(JOBS, NS, body)

    def terminated(name: str) -> dict[str, Any] | None:
        for pod in pods_of(cluster, name):
            for status in (pod.get("status") or {}).get("containerStatuses") or ():
                if "terminated" in status["state"]:
                    return {**status["state"]["terminated"], "pod": pod}
        return None

    oom = await wait_until(lambda: terminated("oom"))
    assert (oom["reason"], oom["exitCode"]) == ("OOMKilled", 137)
    await wait_until(lambda: condition(cluster.get(JOBS, NS, "oom"), "Failed"))
    evicted = await wait_until(lambda: terminated("evicted"))
    assert evicted["pod"]["status"]["reason"] == "Evicted"
    assert condition(evicted["pod"], "DisruptionTarget")
    # The Job controller ignores the disruption (podFailurePolicy) and starts a new pod.
    await wait_until(lambda: len(pods_of(cluster, "evicted")) == 2)
    assert not condition(cluster.get(JOBS, NS, "evicted"), "Failed")

    def pulling() -> bool:
        return any(
            (s["state"].get("waiting") or {}).get("reason") == "ImagePullBackOff"
            for p in pods_of(cluster, "pull")
            for s in (p.get("status") or {}).get("containerStatuses") or ()
        )

    await wait_until(pulling)


async def test_a_lost_node_turns_not_ready_and_its_pods_are_evicted(
    cluster: Cluster, node_agent: Kubelet
) -> None:
    await cluster.track(NODES)
    body = job("on-lost-node", "sleep 60")
    await cluster.create_object(JOBS, NS, body)
    await wait_until(lambda: [p for p in pods_of(cluster, "on-lost-node")
                              if p["status"].get("phase") == "Running"])  # fmt: skip
    await node_agent.lose_node(CPU_NODE)

    def not_ready() -> bool:
        node = cluster.get(NODES, None, CPU_NODE) or {}
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        return bool(ready["status"] != "True")

    await wait_until(not_ready, within=60)
    # The taint eviction controller marks the pod disrupted and deletes it.
    evicted = await wait_until(
        lambda: [p for p in pods_of(cluster, "on-lost-node")
                 if p["metadata"].get("deletionTimestamp") and condition(p, "DisruptionTarget")],
        within=60,
    )  # fmt: skip
    disrupted = condition(evicted[0], "DisruptionTarget")
    assert disrupted and disrupted["reason"] == "DeletionByTaintManager"
