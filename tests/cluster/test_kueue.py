"""Kueue for real: its controller, built from its module, admits the operator's GPU Jobs
against the project's own Kueue objects (manifests/overlays/gpu/kueue.yaml, applied as
`kueue.x-k8s.io/v1beta1` through Kueue's conversion webhook), with the GPU quota cut to
one. The GPU node has two GPUs, so the scheduler alone would run both Jobs: only Kueue
holds the second one back.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from tests.cluster.client import Cluster, ResourceRef
from tests.cluster.controlplane import GPU_NODE, ControlPlane
from tests.cluster.fixtures import JOBS, PREDICTIONS, TENANT, operator_settings
from tests.cluster.kubelet import Kubelet, PodPlan, wait_until
from tests.cluster.kueue import KueueController
from tests.cluster.test_control_plane import condition
from tests.conftest import REPO_ROOT
from tests.kube_fixtures import OperatorProcess
from whisperx_operator.jobs import RUNNER_LABEL, job_name

pytestmark = pytest.mark.whisperx

GPU_OVERLAY = REPO_ROOT / "manifests" / "overlays" / "gpu"
WORKLOADS = ResourceRef("kueue.x-k8s.io", "v1beta2", "workloads")
GPU = "nvidia.com/gpu"
# The flavor the profile's nodeSelector (Tesla-T4) lands on.
T4_FLAVOR = "gpu-t4"
# The profile of a Prediction without spec.hardware (the CRD's default).
DEFAULT_PROFILE = "whisperx"


def shipped_kueue_objects(gpu_quota: int) -> list[dict[str, Any]]:
    """kueue.yaml as shipped, with the T4 flavor's GPU quota set to `gpu_quota`."""
    docs = [d for d in yaml.safe_load_all((GPU_OVERLAY / "kueue.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] != "ClusterQueue":
            continue
        for group in doc["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                if flavor["name"] == T4_FLAVOR:
                    for resource in flavor["resources"]:
                        if resource["name"] == GPU:
                            resource["nominalQuota"] = gpu_quota
    return docs


CLUSTER_QUEUE = next(
    d["metadata"]["name"] for d in shipped_kueue_objects(gpu_quota=1) if d["kind"] == "ClusterQueue"
)


def gpu_profile(idle_seconds: int = 0) -> dict[str, Any]:
    """The gpu overlay's default profile (GPU request, T4 nodeSelector, GPU toleration),
    running tiny.en on the CPU: the kubelet stand-in has no GPU to give. One Job per
    prediction unless `idle_seconds` keeps its runners warm."""
    profiles = yaml.safe_load((GPU_OVERLAY / "profiles.yaml").read_text())
    profile = dict(profiles[DEFAULT_PROFILE])
    profile.update({"model": "tiny.en", "device": "cpu", "computeType": "int8", "batchSize": 4})
    profile["idleSeconds"] = idle_seconds
    return {DEFAULT_PROFILE: profile}


@pytest.fixture(scope="module")
def kueue(
    stack: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KueueController]:
    with KueueController(stack, tmp_path_factory.mktemp("kueue")) as controller:
        print(f"kueue ready in {controller.started_in:.1f} s")
        yield controller
        print(f"--- kueue log (tail) ---\n{controller.log_tail(40)}")


@pytest.fixture(scope="module")
def local_queue(stack: ControlPlane, kueue: KueueController) -> str:
    """The shipped ResourceFlavors, ClusterQueue and LocalQueue, with one GPU of quota."""
    docs = shipped_kueue_objects(gpu_quota=1)
    stack.kubectl("apply", "--server-side", "-f", "-",
                  stdin="\n---\n".join(json.dumps(d) for d in docs))  # fmt: skip
    stack.kubectl(
        "wait", "--for=condition=Active", f"clusterqueue/{CLUSTER_QUEUE}", "--timeout=60s"
    )
    local = next(d for d in docs if d["kind"] == "LocalQueue")
    assert local["metadata"]["namespace"] == TENANT
    return str(local["metadata"]["name"])


@pytest.fixture
def cluster_operator_env(
    stack: ControlPlane, redis_url: str, tmp_path: Path, local_queue: str
) -> dict[str, str]:
    profiles = tmp_path / "gpu-profiles.yaml"
    profiles.write_text(yaml.safe_dump(gpu_profile()))
    return operator_settings(
        stack, redis_url, tmp_path,
        WHISPERX_KUEUE_QUEUE=local_queue, WHISPERX_PROFILES_FILE=str(profiles),
    )  # fmt: skip


def test_the_project_kueue_objects_pass_kueue_webhooks_and_conversion(
    stack: ControlPlane, local_queue: str
) -> None:
    """v1beta1 in, v1beta2 stored and read back through the real conversion webhook; the
    mutating webhook added Kueue's finalizer, the validating one checks the shape."""
    stored = json.loads(
        stack.kubectl(
            "get", "clusterqueues.v1beta2.kueue.x-k8s.io", CLUSTER_QUEUE, "-o", "json"
        ).stdout
    )
    assert "kueue.x-k8s.io/resource-in-use" in stored["metadata"]["finalizers"]
    t4 = next(
        f for g in stored["spec"]["resourceGroups"] for f in g["flavors"] if f["name"] == T4_FLAVOR
    )
    assert {r["name"]: str(r["nominalQuota"]) for r in t4["resources"]}[GPU] == "1"
    assert stored["spec"]["namespaceSelector"] == {"matchLabels": {"whisperx.io/tenant": "true"}}
    # Quotas listed in another order than coveredResources: Kueue refuses, naming the field.
    queue = next(d for d in shipped_kueue_objects(gpu_quota=1) if d["kind"] == "ClusterQueue")
    queue["metadata"]["name"] = "whisperx-reordered"
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"].reverse()
    refused = stack.kubectl("create", "--dry-run=server", "-f", "-",
                            stdin=json.dumps(queue), check=False)  # fmt: skip
    assert refused.returncode != 0
    assert 'admission webhook "vclusterqueue.kb.io" denied the request' in refused.stderr
    assert "spec.resourceGroups[0].flavors[0].resources[0].name" in refused.stderr, refused.stderr


def prediction(name: str, audio: str) -> dict[str, Any]:
    return {
        "apiVersion": "whisperx.io/v1alpha1",
        "kind": "Prediction",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {"input": {"audio_file": audio, "language": "en"}},
    }


def workload_of(cluster: Cluster, job: str) -> dict[str, Any] | None:
    for workload in cluster.list(WORKLOADS, TENANT):
        if any(o["name"] == job for o in workload["metadata"].get("ownerReferences") or ()):
            return workload
    return None


def reservation_refused(cluster: Cluster, job: str) -> str | None:
    """Kueue's reason for not admitting the Job's Workload, if it says one."""
    for cond in ((workload_of(cluster, job) or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == "QuotaReserved" and cond["status"] == "False" and cond.get("message"):
            return str(cond["message"])
    return None


async def test_one_gpu_of_quota_runs_one_prediction_while_the_other_is_queued(
    stack: ControlPlane,
    kueue: KueueController,
    cluster: Cluster,
    node_agent: Kubelet,
    cluster_operator: OperatorProcess,
    fox_wav: Path,
) -> None:
    await cluster.track(WORKLOADS)
    names = ("gpu-one", "gpu-two")
    # Runner pods wait for this, so the queued state is seen while the first one runs.
    release = asyncio.Event()
    for name in names:
        node_agent.plan(job_name(name), PodPlan(hold=release))
    wav = await asyncio.to_thread(fox_wav.read_bytes)
    audio = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    created = "\n---\n".join(json.dumps(prediction(n, audio)) for n in names)
    stack.kubectl("create", "-f", "-", stdin=created)

    def one_admitted() -> tuple[str, str] | None:
        jobs = {n: cluster.get(JOBS, TENANT, job_name(n)) for n in names}
        if any(job is None for job in jobs.values()):
            return None
        running = [n for n, job in jobs.items() if job and not job["spec"].get("suspend")]
        waiting = [n for n, job in jobs.items() if job and job["spec"].get("suspend")]
        return (running[0], waiting[0]) if len(running) == len(waiting) == 1 else None

    first, second = await wait_until(one_admitted, within=60)
    assert job_name(first) and workload_of(cluster, job_name(first)) is not None
    await wait_until(lambda: node_agent.runs(job_name(first)), within=30)
    assert node_agent.runs(job_name(first))[0].node == GPU_NODE

    # The other reads Queued (phase starting), and Kueue's reason is the GPU quota.
    queued = await wait_until(lambda: condition(cluster.get(PREDICTIONS, TENANT, second), "Queued"))
    assert queued["reason"] == "Suspended"
    waiting = cluster.get(PREDICTIONS, TENANT, second)
    assert waiting is not None and waiting["status"]["phase"] == "starting"
    refused = await wait_until(lambda: reservation_refused(cluster, job_name(second)))
    assert GPU in refused and T4_FLAVOR in refused, refused
    # The GPU node has a second GPU free: only Kueue keeps the Job suspended.
    await asyncio.sleep(2)
    still = cluster.get(JOBS, TENANT, job_name(second))
    assert still is not None and still["spec"]["suspend"] is True
    assert not node_agent.runs(job_name(second))

    release.set()

    def unsuspended() -> bool:
        job = cluster.get(JOBS, TENANT, job_name(second))
        return job is not None and not job["spec"].get("suspend")

    await wait_until(unsuspended, within=300, interval=0.05)
    # The quota came back when the first Job finished, not before (the watch delivers
    # the Jobs' changes in order).
    assert condition(cluster.get(JOBS, TENANT, job_name(first)), "Complete")
    for name in (first, second):
        done = await wait_until(
            lambda n=name: condition(cluster.get(PREDICTIONS, TENANT, n), "Succeeded"), within=300
        )
        assert done
        status = (cluster.get(PREDICTIONS, TENANT, name) or {})["status"]
        # The runner transcribed the clip (about 2.5 s of speech).
        assert status["phase"] == "succeeded" and 1.5 < status["audioDuration"] < 4, status
    ran = cluster.get(PREDICTIONS, TENANT, second)
    assert ran is not None and not condition(ran, "Queued")
    assert node_agent.runs(job_name(second))[0].node == GPU_NODE


async def test_warm_runner_jobs_go_through_kueue_and_the_admitted_one_serves_the_queue(
    stack: ControlPlane,
    kueue: KueueController,
    cluster: Cluster,
    node_agent: Kubelet,
    local_queue: str,
    redis_url: str,
    tmp_path: Path,
    fox_wav: Path,
) -> None:
    """Warm runners (issue 11) under Kueue: three predictions ask for two runner Jobs,
    Kueue admits one against the single GPU of quota, and that runner, with the real
    whisperx pipeline loaded once, transcribes all three in turn."""
    profiles = tmp_path / "warm-gpu-profiles.yaml"
    warm = gpu_profile(idle_seconds=5)
    warm[DEFAULT_PROFILE]["maxRunners"] = 2
    profiles.write_text(yaml.safe_dump(warm))
    env = operator_settings(
        stack, redis_url, tmp_path,
        WHISPERX_KUEUE_QUEUE=local_queue, WHISPERX_PROFILES_FILE=str(profiles),
    )  # fmt: skip
    operator = OperatorProcess(env=env, log_path=tmp_path / "operator.log")
    operator.start()
    names = ("warm-one", "warm-two", "warm-three")
    try:
        await operator.wait_ready(within=60)
        wav = await asyncio.to_thread(fox_wav.read_bytes)
        audio = "data:audio/wav;base64," + base64.b64encode(wav).decode()
        created = "\n---\n".join(json.dumps(prediction(n, audio)) for n in names)
        stack.kubectl("create", "-f", "-", stdin=created)

        def runner_jobs() -> list[dict[str, Any]]:
            return [
                j
                for j in cluster.list(JOBS, TENANT)
                if RUNNER_LABEL in (j["metadata"].get("labels") or {})
            ]

        def admitted_and_held() -> tuple[str, str] | None:
            jobs = runner_jobs()
            running = [j["metadata"]["name"] for j in jobs if not j["spec"].get("suspend")]
            held = [j["metadata"]["name"] for j in jobs if j["spec"].get("suspend")]
            return (running[0], held[0]) if len(running) == len(held) == 1 else None

        admitted, held = await wait_until(admitted_and_held, within=60)
        statuses = []
        for name in names:
            done = await wait_until(
                lambda n=name: condition(cluster.get(PREDICTIONS, TENANT, n), "Succeeded"),
                within=300,
            )
            assert done
            statuses.append((cluster.get(PREDICTIONS, TENANT, name) or {})["status"])
        # One pod transcribed all three (the clip has about 2.5 s of speech) while Kueue
        # kept the other runner Job suspended.
        assert {s["jobName"] for s in statuses} == {admitted}, statuses
        assert len({s["podName"] for s in statuses}) == 1
        assert all(1.5 < s["audioDuration"] < 4 for s in statuses), statuses
        assert len(node_agent.runs(admitted)) == 1 and not node_agent.runs(held)
        assert node_agent.runs(admitted)[0].node == GPU_NODE
        assert (cluster.get(JOBS, TENANT, held) or {})["spec"]["suspend"] is True
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            for name in names:
                output = json.loads(await client.get(f"wx:p:{TENANT}:{name}:out") or "{}")
                text = " ".join(s["text"] for s in output["segments"]).lower()
                assert "quick brown fox" in text, text
        finally:
            await client.aclose()
    finally:
        await operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log_tail(80)}")
        stack.kubectl("delete", "jobs", "-l", RUNNER_LABEL, "-n", TENANT, "--wait=false",
                      check=False)  # fmt: skip


# Issue 10, item o: Kueue preempts a prediction while it runs; the run deadline must not
# count the time its Job spends suspended.
RUN_DEADLINE = 75
PRIORITY_CLASS = "whisperx-test-high"


def preemptor_job(queue: str, priority_class: str) -> dict[str, Any]:
    """A plain Job of the same queue and GPU class, at a higher Kueue priority."""
    profile = gpu_profile()[DEFAULT_PROFILE]
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "preemptor",
            "namespace": TENANT,
            "labels": {
                "kueue.x-k8s.io/queue-name": queue,
                "kueue.x-k8s.io/priority-class": priority_class,
            },
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": profile["nodeSelector"],
                    "tolerations": profile["tolerations"],
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "command": ["true"],
                            "resources": {"limits": {GPU: "1"}, "requests": {"cpu": "100m"}},
                            "securityContext": restricted,
                        }
                    ],
                }
            },
        },
    }


@pytest.fixture
def preemption(stack: ControlPlane, local_queue: str) -> Iterator[str]:
    """A higher WorkloadPriorityClass, and the ClusterQueue preempting lower priorities
    within itself (the shipped one never preempts); both undone afterwards."""
    high = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
            "metadata": {"name": PRIORITY_CLASS}, "value": 1000}  # fmt: skip
    stack.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(high))
    patch = '{"spec": {"preemption": {"withinClusterQueue": "%s"}}}'
    stack.kubectl(
        "patch", "clusterqueue", CLUSTER_QUEUE, "--type=merge", "-p", patch % "LowerPriority"
    )
    try:
        yield PRIORITY_CLASS
    finally:
        stack.kubectl("patch", "clusterqueue", CLUSTER_QUEUE, "--type=merge", "-p", patch % "Never")
        stack.kubectl("delete", "workloadpriorityclass", PRIORITY_CLASS, check=False)


async def test_preempted_while_processing_the_run_deadline_waits_for_readmission(
    stack: ControlPlane,
    kueue: KueueController,
    local_queue: str,
    preemption: str,
    cluster: Cluster,
    node_agent: Kubelet,
    cluster_operator: OperatorProcess,
    fox_wav: Path,
) -> None:
    await cluster.track(WORKLOADS)
    name = "preempted"
    job = job_name(name)
    wav = await asyncio.to_thread(fox_wav.read_bytes)
    body = prediction(name, "data:audio/wav;base64," + base64.b64encode(wav).decode())
    body["spec"]["activeDeadlineSeconds"] = RUN_DEADLINE
    body["spec"]["startDeadlineSeconds"] = 600
    # The preemptor's pod holds its GPU until released: the suspension lasts past the
    # prediction's run deadline, however fast the runner is.
    release = asyncio.Event()
    node_agent.plan("preemptor", PodPlan(hold=release))
    stack.kubectl("create", "-f", "-", stdin=json.dumps(body))

    def phase() -> str | None:
        return ((cluster.get(PREDICTIONS, TENANT, name) or {}).get("status") or {}).get("phase")

    await wait_until(lambda: phase() == "processing", within=120, interval=0.02)
    stack.kubectl("create", "-f", "-", stdin=json.dumps(preemptor_job(local_queue, preemption)))

    def evicted() -> dict[str, Any] | None:
        return condition(workload_of(cluster, job), "Evicted")

    eviction = await wait_until(evicted, within=30)
    assert eviction["reason"] == "Preempted", eviction
    # Kueue records the eviction on the Workload, then suspends the Job.
    await wait_until(lambda: (cluster.get(JOBS, TENANT, job) or {})["spec"].get("suspend"))
    queued = await wait_until(lambda: condition(cluster.get(PREDICTIONS, TENANT, name), "Queued"))
    assert queued["reason"] == "Suspended"
    await wait_until(lambda: node_agent.runs("preemptor"), within=30)

    # Past the run deadline as counted from the start, while the Job is suspended.
    started = (cluster.get(PREDICTIONS, TENANT, name) or {})["status"]["startedAt"]
    started_at = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
    while dt.datetime.now(dt.UTC) < started_at + dt.timedelta(seconds=RUN_DEADLINE + 3):
        assert phase() == "processing", cluster.get(PREDICTIONS, TENANT, name)
        await asyncio.sleep(0.5)
    assert phase() == "processing" and condition(cluster.get(PREDICTIONS, TENANT, name), "Queued")

    release.set()
    done = await wait_until(
        lambda: phase() in ("succeeded", "failed", "canceled"), within=RUN_DEADLINE + 60
    )
    final = cluster.get(PREDICTIONS, TENANT, name)
    assert done and phase() == "succeeded", final
    assert condition(cluster.get(JOBS, TENANT, "preemptor"), "Complete")
    # The runner ran twice: once preempted, once to the end.
    assert len(node_agent.runs(job)) == 2
