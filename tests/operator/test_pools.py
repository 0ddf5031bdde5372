"""The warm pools' bookkeeping (operator/whisperx_operator/pools.py) without a cluster:
an in-memory API server and status writer. What runners do on a real control plane is in
test_warm_runners.py."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any, cast

from whisperx_api import lifecycle as lc
from whisperx_api.kube import ApiError, KubeClient
from whisperx_api.records import PredictionRecord
from whisperx_api.status_writer import StatusWriter
from whisperx_api.work import Assignment, WorkRequest
from whisperx_operator import jobs
from whisperx_operator.config import OperatorConfig, parse_profiles
from whisperx_operator.pools import Pools

KEY = b"k" * 32
WARM = "warm"
CONFIG = OperatorConfig(
    report_key=KEY,
    profiles=parse_profiles(
        {WARM: {"model": "tiny.en", "device": "cpu", "idleSeconds": 30, "maxRunners": 2}}
    ),
)


class Api:
    """Creates and lists Jobs and Secrets as the API server would, keeping them; the
    operator may not create Jobs in namespace "denied"."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if "/namespaces/denied/" in path:
            raise ApiError(403, "jobs.batch is forbidden", "Forbidden")
        created = copy.deepcopy(body)
        created["metadata"].setdefault("uid", str(uuid.uuid4()))
        if path.endswith("/jobs"):
            self.jobs.append(created)
        return created

    async def list(self, path: str, **params: str) -> list[dict[str, Any]]:
        return []

    async def delete(self, path: str) -> None:
        self.deleted.append(path)


class Writer:
    """Applies lifecycle events to records held in memory and tells the pools of each
    save, as StatusWriter and the operator's runtime do."""

    report_key = KEY

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], PredictionRecord] = {}
        self.on_saved: Callable[[PredictionRecord], None] = lambda record: None

    def add(self, namespace: str, name: str) -> PredictionRecord:
        state = lc.PredictionState(created_at=lc.now_utc())
        record = PredictionRecord(
            id=name, namespace=namespace, input={}, state=state, hardware=WARM
        )
        self.records[namespace, name] = record
        return record

    async def apply(self, namespace: str, name: str, event: lc.Event) -> PredictionRecord | None:
        record = self.records.get((namespace, name))
        if record is None:
            return None
        record = dataclasses.replace(record, state=lc.apply(record.state, event).state)
        self.records[namespace, name] = record
        self.on_saved(record)
        return record

    def report_token(self, record: PredictionRecord) -> str:
        return "token"


def pools_with(api: Api, writer: Writer, **config: Any) -> Pools:
    """Pools over `api` and `writer`, with CONFIG's settings changed as given."""
    pools = Pools(
        dataclasses.replace(CONFIG, **config), cast(KubeClient, api), cast(StatusWriter, writer)
    )
    writer.on_saved = pools.saved
    return pools


async def submit(pools: Pools, writer: Writer, namespace: str, name: str) -> None:
    record = writer.records.get((namespace, name)) or writer.add(namespace, name)
    await pools.submit({"metadata": {"name": name, "namespace": namespace}}, record)


async def take(pools: Pools, job: dict[str, Any]) -> Assignment:
    runner = jobs.runner_id(job["metadata"]["namespace"], job["metadata"]["name"])
    answer = await pools.claim(runner, WorkRequest(wait=0))
    assert isinstance(answer, Assignment), answer
    return answer


async def test_a_prediction_is_queued_once_per_namespace_and_leaves_its_queue_when_it_ends() -> (
    None
):
    api, writer = Api(), Writer()
    pools = pools_with(api, writer)
    await submit(pools, writer, "a", "p1")
    await submit(pools, writer, "a", "p1")  # kopf's repeated event: no second entry
    await submit(pools, writer, "b", "p1")  # the same name in another namespace
    await submit(pools, writer, "a", "p2")
    assert writer.records["a", "p1"].state.queued
    a_job, b_job = api.jobs  # a runner for each namespace (the profile allows two)
    await writer.apply("a", "p1", lc.Failed("Canceled", "canceled", lc.now_utc()))
    await pools.stop("b", "p1")
    assert (await take(pools, a_job)).id == "p2"
    assert (
        await pools.claim(jobs.runner_id("b", b_job["metadata"]["name"]), WorkRequest(wait=0))
        is None
    )
    assert (
        await pools.claim(jobs.runner_id("a", a_job["metadata"]["name"]), WorkRequest(wait=0))
        is None
    )
    # Out of its queue, so queued again when submitted again (a resume).
    await submit(pools, writer, "b", "p1")
    assert (await take(pools, b_job)).id == "p1"
    assert not any(pools._queued(namespace, name) for namespace, name in writer.records)


async def test_a_requeued_prediction_counts_its_time_queued_from_the_requeue() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer)
    await submit(pools, writer, "a", "p1")
    await asyncio.sleep(0.2)  # queued this long before its first runner took it
    job = api.jobs[0]
    assert (await take(pools, job)).id == "p1"
    first_wait = pools.metrics.queued.sums[()]
    assert first_wait >= 0.2
    await asyncio.sleep(0.3)  # running on that runner
    # Kueue preempts the runner: its Job is suspended, and what it held is queued again.
    await pools.job_changed("MODIFIED", {**job, "spec": {**job["spec"], "suspend": True}})
    queued = writer.records["a", "p1"].state.condition("Queued")
    assert queued is not None and queued.reason == "Preempted"
    # Kueue admits the Job again: its new pod asks for work and takes it.
    assert (await take(pools, job)).id == "p1"
    second_wait = pools.metrics.queued.sums[()] - first_wait
    assert second_wait < 0.2  # not the 0.5 s since it was first queued


async def test_a_namespace_where_no_runner_may_start_fails_its_queue() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer)
    await submit(pools, writer, "denied", "p1")
    state = writer.records["denied", "p1"].state
    assert state.phase is lc.Phase.FAILED and state.reason == "NamespaceNotServed"
    assert not pools._queued("denied", "p1")


def runner_pod(job: dict[str, Any], waiting: str | None) -> dict[str, Any]:
    """The runner Job's pod, its container waiting for `waiting` (or running)."""
    state = {"waiting": {"reason": waiting, "message": "pull failed"}} if waiting else {}
    meta = job["metadata"]
    return {
        "metadata": {"name": meta["name"] + "-x", "namespace": meta["namespace"],
                     "labels": {"batch.kubernetes.io/job-name": meta["name"]}},
        "status": {"phase": "Pending" if waiting else "Running",
                   "containerStatuses": [{"image": "runner:gone", "state": state}]},
    }  # fmt: skip


async def test_a_runner_stuck_on_image_pull_back_off_fails_its_queue_after_the_grace() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer, waiting_grace_seconds=1)
    await submit(pools, writer, "a", "p1")
    (job,) = api.jobs
    await pools.pod_changed(runner_pod(job, "ErrImagePull"))
    await pools.pod_changed(runner_pod(job, "ImagePullBackOff"))
    await asyncio.sleep(1.3)
    state = writer.records["a", "p1"].state
    assert state.phase is lc.Phase.FAILED and state.reason == "ImagePullFailed"
    assert "cannot pull image runner:gone" in (state.error or "")
    assert "still ImagePullBackOff after 1 s" in (state.error or "")
    assert api.deleted == [f"/apis/batch/v1/namespaces/a/jobs/{job['metadata']['name']}"]


async def test_a_runner_whose_pull_recovers_within_the_grace_is_kept() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer, waiting_grace_seconds=1)
    await submit(pools, writer, "a", "p1")
    (job,) = api.jobs
    await pools.pod_changed(runner_pod(job, "ImagePullBackOff"))
    await pools.pod_changed(runner_pod(job, None))
    await asyncio.sleep(1.3)
    assert not writer.records["a", "p1"].state.terminal
    assert api.deleted == []
    assert (await take(pools, job)).id == "p1"


async def test_a_runner_on_a_lost_node_gives_back_what_it_held_and_is_replaced() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer)
    await submit(pools, writer, "a", "p1")
    (job,) = api.jobs
    assert (await take(pools, job)).id == "p1"
    lost = runner_pod(job, None)
    lost["spec"] = {"nodeName": "gpu-7"}
    lost["status"]["conditions"] = [
        {"type": "Ready", "status": "False"},
        {"type": "ContainersReady", "status": "True"},
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"},
    ]
    await pools.pod_changed(lost)
    queued = writer.records["a", "p1"].state.condition("Queued")
    assert queued is not None and queued.status == "True" and queued.reason == "NodeLost"
    assert "node gpu-7 stopped responding" in queued.message
    assert api.deleted == [f"/apis/batch/v1/namespaces/a/jobs/{job['metadata']['name']}"]
    # A new runner (the lost one no longer counts) takes it.
    _, replacement = api.jobs
    assert (await take(pools, replacement)).id == "p1"


async def test_a_runner_that_never_starts_is_deleted_at_the_start_deadline() -> None:
    # Kueue never admits its Job, or no node fits it: it never asks for work.
    api, writer = Api(), Writer()
    pools = pools_with(api, writer, default_start_deadline_seconds=1)
    await submit(pools, writer, "a", "p1")
    stuck = api.jobs[0]
    await asyncio.sleep(1.3)
    assert api.deleted == [f"/apis/batch/v1/namespaces/a/jobs/{stuck['metadata']['name']}"]
    # Its slot is free again: the prediction, still queued, gets a new runner, which
    # asks for work in time and is kept.
    assert not writer.records["a", "p1"].state.terminal
    _, started = api.jobs
    assert (await take(pools, started)).id == "p1"
    await asyncio.sleep(1.3)
    assert len(api.deleted) == 1


async def test_a_runner_stuck_on_a_pull_does_not_count_as_free() -> None:
    api, writer = Api(), Writer()
    pools = pools_with(api, writer)
    await submit(pools, writer, "a", "p1")
    (job,) = api.jobs
    await pools.pod_changed(runner_pod(job, "ImagePullBackOff"))
    # The queued prediction does not count on it: another runner starts (the profile
    # allows two).
    await pools.scale(WARM)
    assert len(api.jobs) == 2
