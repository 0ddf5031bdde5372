"""Warm runners on the cluster path (operator/whisperx_operator/pools.py): runner Jobs of a
hardware profile with an idle time serve many predictions each. The real operator process
on the real control plane, its kubelet stand-in running the stand-in runner
(tests/operator/fake_runner.py), which speaks the work protocol as `whisperx-runner run`
does."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.cluster.fixtures import make_tenant, remove_tenant
from tests.conftest import REPO_ROOT
from tests.kube_fixtures import (
    JOBS,
    PREDICTIONS,
    SECRETS,
    Kube,
    OperatorProcess,
    iter_events,
    operator_environment,
    prediction_body,
    running_operator,
    wait_for,
    wait_for_phase,
)
from whisperx_operator.jobs import RUNNER_LABEL

NS = "default"
WARM = "warm"
OTHER_NS = "tenant-b"


def warm_profiles(idle: int, max_runners: int) -> str:
    kind = (REPO_ROOT / "manifests" / "overlays" / "kind" / "profiles.yaml").read_text()
    return kind + (
        f"{WARM}:\n"
        "  model: tiny.en\n  device: cpu\n  computeType: int8\n"
        f"  idleSeconds: {idle}\n  maxRunners: {max_runners}\n"
        "  resources: {requests: {cpu: 50m, memory: 64Mi}}\n"
    )


@pytest.fixture
async def warm(
    kube: Kube, kubelet: Any, redis_url: str, tmp_path: Path
) -> AsyncIterator[OperatorProcess]:
    """The operator with a warm profile: a runner waits 30 s for work, one at a time."""
    profiles = tmp_path / "warm-profiles.yaml"
    profiles.write_text(warm_profiles(idle=30, max_runners=1))
    env = operator_environment(kube, redis_url, tmp_path, WHISPERX_PROFILES_FILE=str(profiles))
    async with running_operator(kube, env, tmp_path / "operator.log") as operator:
        yield operator
        print(f"--- operator log (tail) ---\n{operator.log_tail(200)}")


async def create(
    kube: Kube, name: str, audio: str, namespace: str = NS, **spec: Any
) -> dict[str, Any]:
    body = prediction_body(name, audio, hardware=WARM, **spec)
    return await kube.create_object(PREDICTIONS, namespace, body)


def runner_jobs(kube: Kube, namespace: str = NS) -> list[dict[str, Any]]:
    return [
        j
        for j in kube.list(JOBS)
        if RUNNER_LABEL in (j["metadata"].get("labels") or {})
        and j["metadata"]["namespace"] == namespace
    ]


def status(kube: Kube, name: str, namespace: str = NS) -> dict[str, Any]:
    obj = kube.get(PREDICTIONS, namespace, name)
    assert obj is not None
    return dict(obj.get("status") or {})


async def test_one_runner_serves_predictions_in_turn_and_status_names_its_job_and_pod(
    kube: Kube, kubelet: Any, warm: OperatorProcess
) -> None:
    await create(kube, "w1", "https://fake.test/succeed")
    first = await wait_for_phase(kube, "w1", within=60)
    assert first["status"]["phase"] == "succeeded", first["status"]
    # Queued for a slot, then more at once: served oldest first by the same runner.
    for name in ("w2", "w3", "w4"):
        await create(kube, name, "https://fake.test/succeed?seconds=0.3")
    ended = [await wait_for_phase(kube, n, within=60) for n in ("w2", "w3", "w4")]
    assert [o["status"]["phase"] for o in ended] == ["succeeded"] * 3
    statuses = [first["status"], *(o["status"] for o in ended)]
    (job,) = runner_jobs(kube)
    name = job["metadata"]["name"]
    assert {s["jobName"] for s in statuses} == {name}
    pods = {s["podName"] for s in statuses}
    assert len(pods) == 1 and len(kubelet.runs(name)) == 1  # one pod, one process
    started = [s["startedAt"] for s in statuses[1:]]
    assert started == sorted(started)  # oldest first
    # No Job or Secret of their own; `kubectl describe` tells where each ran.
    assert all(kube.get(JOBS, NS, n) is None for n in ("w1", "w2", "w3", "w4"))
    (pod,) = pods
    assert any(
        e["reason"] == "RunnerAssigned" and pod in e["message"] and name in e["message"]
        for e in iter_events(kube, "w3")
    )
    await wait_for(lambda: "served 4 prediction(s)" in kubelet.logs(name))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{warm.report_url}/metrics") as resp,
    ):
        metrics = await resp.text()
    assert 'whisperx_operator_prediction_starts_total{start="cold"} 1.0' in metrics
    assert 'whisperx_operator_prediction_starts_total{start="warm"} 3.0' in metrics
    assert "whisperx_operator_queued_seconds_count 4" in metrics
    assert "whisperx_operator_runners_busy 0" in metrics


async def test_a_predictions_secret_reaches_its_runner_only_in_its_assignment(
    kube: Kube, kubelet: Any, warm: OperatorProcess, redis_url: str
) -> None:
    data = {"tok": base64.b64encode(b"hf_user").decode()}
    await kube.create_object(SECRETS, NS, {"metadata": {"name": "warm-hf"}, "data": data})
    ref = {"huggingface_access_token": {"name": "warm-hf", "key": "tok"}}
    await create(kube, "s1", "https://fake.test/env", secretInputs=ref)
    await create(kube, "s2", "https://fake.test/env")
    missing = {"huggingface_access_token": {"name": "warm-hf", "key": "nope"}}
    await create(kube, "s3", "https://fake.test/env", secretInputs=missing)
    runs = {}
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for name in ("s1", "s2"):
            obj = await wait_for_phase(kube, name, within=60)
            assert obj["status"]["phase"] == "succeeded", obj["status"]
            runs[name] = json.loads(await client.get(f"wx:p:default:{name}:out") or "{}")["env"]
    finally:
        await client.aclose()
    assert runs["s1"]["input"]["huggingface_access_token"] == "hf_user"
    assert "huggingface_access_token" not in runs["s2"]["input"]  # same runner, not leaked
    assert status(kube, "s1")["podName"] == status(kube, "s2")["podName"]
    failed = await wait_for_phase(kube, "s3", within=30)
    assert failed["status"]["reason"] == "SecretNotFound"
    assert "spec.secretInputs.huggingface_access_token" in failed["status"]["error"]
    # Nowhere in the runner's Job or any Secret of its own.
    (job,) = runner_jobs(kube)
    assert "hf_user" not in json.dumps(job)
    assert all(kube.get(SECRETS, NS, f"{n}-runner") is None for n in ("s1", "s2", "s3"))


async def test_cancel_stops_the_warm_runner_holding_it_and_the_next_gets_a_new_one(
    kube: Kube, kubelet: Any, warm: OperatorProcess
) -> None:
    await create(kube, "c1", "https://fake.test/hang")
    await wait_for_phase(kube, "c1", ["processing"], within=60)
    (job,) = runner_jobs(kube)
    started = time.monotonic()
    await kube.patch_object(PREDICTIONS, NS, "c1", {"spec": {"cancel": True}})
    obj = await wait_for_phase(kube, "c1", within=10)
    assert obj["status"]["phase"] == "canceled"
    # The runner got SIGTERM (its Job deleted) and ended within 3 s.
    name = job["metadata"]["name"]
    await wait_for(lambda: [r.exit_code for r in kubelet.runs(name)] == [143], within=10)
    assert time.monotonic() - started < 3.0 + 1.0  # + the test's own polling
    await wait_for(lambda: kube.get(JOBS, NS, name) is None)
    await create(kube, "c2", "https://fake.test/succeed")
    obj = await wait_for_phase(kube, "c2", within=60)
    assert obj["status"]["phase"] == "succeeded"
    assert obj["status"]["jobName"] != name


async def test_a_crashed_warm_runner_fails_only_the_prediction_it_held(
    kube: Kube, kubelet: Any, warm: OperatorProcess
) -> None:
    await create(kube, "x1", "https://fake.test/crash")
    await create(kube, "x2", "https://fake.test/succeed")
    crashed = await wait_for_phase(kube, "x1", within=60)
    assert crashed["status"]["phase"] == "failed"
    assert crashed["status"]["reason"] == "RunnerCrashed", crashed["status"]
    served = await wait_for_phase(kube, "x2", within=60)
    assert served["status"]["phase"] == "succeeded", served["status"]
    assert served["status"]["jobName"] != crashed["status"]["jobName"]


async def test_an_operator_restart_loses_no_queued_or_running_prediction(
    kube: Kube, kubelet: Any, warm: OperatorProcess
) -> None:
    await create(kube, "r1", "https://fake.test/succeed?seconds=3")
    for name in ("r2", "r3"):
        await create(kube, name, "https://fake.test/succeed?seconds=0.2")
    await wait_for_phase(kube, "r1", ["processing"], within=60)
    await warm.kill()
    await asyncio.sleep(1)
    await warm.restart(kube)
    ended = [await wait_for_phase(kube, n, within=60) for n in ("r1", "r2", "r3")]
    assert [o["status"]["phase"] for o in ended] == ["succeeded"] * 3, [o["status"] for o in ended]
    # The runner that held r1 across the restart went on serving: one runner in all.
    assert len({o["status"]["jobName"] for o in ended}) == 1
    assert len(runner_jobs(kube)) == 1


async def test_namespaces_take_turns_for_the_profiles_last_runner(
    kube: Kube, kubelet: Any, warm: OperatorProcess
) -> None:
    await asyncio.to_thread(make_tenant, kube.plane, OTHER_NS)  # type: ignore[union-attr]
    try:
        for name in ("f1", "f2", "f3"):
            await create(kube, name, "https://fake.test/succeed?seconds=1")
        await wait_for_phase(kube, "f1", ["processing", "succeeded"], within=60)
        await create(kube, "g1", "https://fake.test/succeed", namespace=OTHER_NS)
        other = await wait_for_phase(kube, "g1", namespace=OTHER_NS, within=90)
        assert other["status"]["phase"] == "succeeded", other["status"]
        last = await wait_for_phase(kube, "f3", within=90)
        # With one runner allowed for the profile, the busy namespace's runner gave up
        # its slot for the other namespace's prediction before serving f3.
        assert other["status"]["startedAt"] < last["status"]["startedAt"]
        assert other["status"]["jobName"] not in {
            status(kube, n)["jobName"] for n in ("f1", "f2", "f3")
        }
    finally:
        await asyncio.to_thread(remove_tenant, kube.plane, OTHER_NS)  # type: ignore[union-attr]


async def test_a_runner_job_goes_through_kueue_and_a_preempted_runner_requeues_its_prediction(
    kube: Kube, kubelet: Any, redis_url: str, tmp_path: Path
) -> None:
    profiles = tmp_path / "warm-profiles.yaml"
    profiles.write_text(warm_profiles(idle=30, max_runners=1))
    env = operator_environment(
        kube, redis_url, tmp_path,
        WHISPERX_PROFILES_FILE=str(profiles), WHISPERX_KUEUE_QUEUE="gpu-queue",
    )  # fmt: skip
    async with running_operator(kube, env, tmp_path / "operator.log") as operator:
        await create(kube, "k1", "https://fake.test/succeed?seconds=2")
        job = await wait_for(lambda: next(iter(runner_jobs(kube)), None))
        name = job["metadata"]["name"]
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        await wait_for(lambda: status(kube, "k1").get("conditions"))
        assert {c["type"]: c["status"] for c in status(kube, "k1")["conditions"]} == {
            "Queued": "True"
        }
        # Kueue admits the runner's Job by unsuspending it...
        await kube.patch_object(JOBS, NS, name, {"spec": {"suspend": False}})
        await wait_for_phase(kube, "k1", ["processing"], within=60)
        # ...and preempts it by suspending it again: the Job controller stops its pod.
        await kube.patch_object(JOBS, NS, name, {"spec": {"suspend": True}})

        def requeued() -> bool:
            conditions = {c["type"]: c for c in status(kube, "k1").get("conditions") or ()}
            queued = conditions.get("Queued") or {}
            return queued.get("status") == "True" and queued.get("reason") == "Preempted"

        await wait_for(requeued, within=20)
        assert status(kube, "k1")["phase"] == "processing"
        await wait_for(lambda: [r.exit_code for r in kubelet.runs(name)] == [143], within=20)
        await kube.patch_object(JOBS, NS, name, {"spec": {"suspend": False}})
        done = await wait_for_phase(kube, "k1", within=60)
        print(operator.log_tail(40))
    assert done["status"]["phase"] == "succeeded", done["status"]
    assert done["status"]["jobName"] == name
    assert len(kubelet.runs(name)) == 2  # the same runner Job's second pod served it
