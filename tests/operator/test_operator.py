"""The real operator (a `whisperx-operator` process running kopf) against the emulated API
server, a real redis-server, and the fake kubelet running the stand-in runner."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.api.test_hostport import has_ipv6_loopback
from tests.cluster.client import ApiError
from tests.cluster.fixtures import RealKube, make_tenant, remove_tenant, with_server_defaults
from tests.conftest import free_port
from tests.kube_fixtures import (
    CLAIMS,
    GPU_HUNGRY,
    JOBS,
    NAMESPACES,
    PEERINGS,
    PREDICTIONS,
    SECRETS,
    SERVICE_ACCOUNTS,
    TEST_REPORT_KEY,
    Emulator,
    Kubelet,
    OperatorProcess,
    PodPlan,
    iter_events,
    operator_environment,
    prediction_body,
    running_operator,
    wait_for,
    wait_for_phase,
)
from whisperx_api.hostport import join_host_port
from whisperx_api.reports import SIGNATURE_HEADER, prediction_token, sign
from whisperx_api.webhooks import signature, tenant_secret
from whisperx_operator.runtime import FINALIZER

NS = "default"
SUCCEED = "https://fake.test/succeed"
HANG = "https://fake.test/hang"


@dataclass
class WebhookReceiver:
    url: str
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def events(self, prediction: str) -> list[str]:
        return [body["status"] for _, body in self.received if body["id"] == prediction]


@pytest.fixture
async def webhooks() -> AsyncIterator[WebhookReceiver]:
    port = free_port()
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{port}/hook")

    async def hook(request: web.Request) -> web.Response:
        receiver.received.append((dict(request.headers), await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver
    await runner.cleanup()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def create(kube: Emulator, name: str, audio: str = SUCCEED, **spec: Any) -> dict[str, Any]:
    return await kube.create_object(PREDICTIONS, NS, prediction_body(name, audio, **spec))


def current(kube: Emulator, name: str) -> dict[str, Any]:
    obj = kube.get(PREDICTIONS, NS, name)
    assert obj is not None, f"{name} is gone"
    return obj


def gone(kube: Emulator, resource: Any, name: str) -> Callable[[], bool]:
    return lambda: kube.get(resource, NS, name) is None


def exited(kubelet: Kubelet, job: str, code: int) -> Callable[[], bool]:
    return lambda: [run.exit_code for run in kubelet.runs(job)] == [code]


async def redis_json(client: aioredis.Redis, key: str) -> Any:
    raw = await client.get(key)
    assert raw is not None, f"{key} is missing"
    return json.loads(raw)


def conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or ()}


def event_reasons(kube: Emulator, name: str) -> list[str]:
    return [e["reason"] for e in iter_events(kube, name)]


async def report(
    operator: OperatorProcess, obj: dict[str, Any], payload: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, Any]]:
    meta = obj["metadata"]
    token = kw.pop("token", None) or prediction_token(
        TEST_REPORT_KEY.encode(), meta["namespace"], meta["name"], meta["uid"]
    )
    body = json.dumps(payload).encode()
    headers = {SIGNATURE_HEADER: kw.pop("signature", None) or sign(token, body, **kw)}
    url = f"{operator.report_url}/reports/{meta['namespace']}/{meta['name']}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_prediction_runs_to_success(
    kube: Emulator,
    kubelet: Kubelet,
    operator: OperatorProcess,
    operator_env: dict[str, str],
    redis_client: aioredis.Redis,
    webhooks: WebhookReceiver,
) -> None:
    # Left by an earlier Prediction of the same name (say, its finalizer was removed by
    # hand): it must not make this one's reports look like replays.
    await redis_client.hset("wx:p:default:p1:reports", mapping={"current": "", "seq:": 99})
    await redis_client.set("wx:p:default:p1:logs", "stale\n")
    created = await create(
        kube, "p1", webhook=webhooks.url, webhookEventsFilter=["start", "completed"]
    )
    obj = await wait_for_phase(kube, "p1")
    status = obj["status"]
    assert status["phase"] == "succeeded", status
    # `kubectl wait --for=condition=Succeeded` reads exactly this.
    assert conditions(obj) == {"Running": "False", "Succeeded": "True"}
    assert status["observedGeneration"] == 1 and status["jobName"] == "p1"
    assert status["createdAt"] and status["startedAt"] and status["completedAt"]
    assert status["detectedLanguage"] == "en" and status["audioDuration"] == 1.5
    assert status["metrics"]["predictTime"] == 0.25 and status["metrics"]["totalTime"] > 0
    assert status["output"] == {"store": "redis", "key": "wx:p:default:p1:out"}
    assert "segments" not in json.dumps(status)  # the transcript lives in Redis only

    output = await redis_json(redis_client, "wx:p:default:p1:out")
    assert output["segments"][0]["text"] == " the quick brown fox"
    logs = await redis_client.get("wx:p:default:p1:logs")
    assert isinstance(logs, str) and logs.startswith("loading model") and "transcribed" in logs

    # Redis mirrors the status, written just after it.
    async def mirrored() -> bool:
        record = await redis_json(redis_client, "wx:p:default:p1:rec")
        return bool(record["status"]["phase"] == "succeeded")

    await wait_for(mirrored)

    # One Job and one Secret, owned by the Prediction; no secret value in plain sight.
    assert kube.creations[JOBS, NS, "p1"] == 1
    job = kube.get(JOBS, NS, "p1")
    secret = kube.get(SECRETS, NS, "p1-runner")
    assert job is not None and secret is not None
    uid = created["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid
    token = prediction_token(TEST_REPORT_KEY.encode(), NS, "p1", uid)
    assert token not in json.dumps(job) and token not in json.dumps(obj)

    await wait_for(lambda: {"JobCreated", "Started", "Succeeded"} <= set(event_reasons(kube, "p1")))
    async with aiohttp.ClientSession() as session, session.get(operator.liveness_url) as resp:
        assert resp.status == 200  # kopf's liveness endpoint
    await wait_for(lambda: webhooks.events("p1") == ["processing", "succeeded"], within=10)
    await asyncio.sleep(0.5)  # nothing more arrives
    assert webhooks.events("p1") == ["processing", "succeeded"]
    headers, body = webhooks.received[-1]
    secret_key = tenant_secret(operator_env["WHISPERX_WEBHOOK_SECRET"], NS)
    expected = signature(
        secret_key,
        headers["webhook-id"],
        int(headers["webhook-timestamp"]),
        json.dumps(body, separators=(",", ":")),  # the compact form the operator sends
    )
    assert headers["webhook-signature"] == expected
    assert (
        body["output"]["segments"]
        and body["urls"]["get"] == "http://gateway.test/v1/predictions/p1"
    )


async def test_a_new_predictions_job_does_not_wait_for_kopfs_finalizer(
    kube: Emulator, operator: OperatorProcess
) -> None:
    # kopf runs create handlers only on the event its finalizer write brings back: the
    # Job is created on the first event instead, before that write (resource versions
    # are the API server's, etcd's revisions, in the order of the writes).
    seen: dict[str, list[dict[str, Any]]] = {"predictions": [], "jobs": []}

    async def collect(resource: Any, into: list[dict[str, Any]]) -> None:
        async for event in kube.subscribe(resource):
            if event["object"]["metadata"]["name"] == "early":
                into.append(event["object"])

    tasks = [
        asyncio.create_task(collect(PREDICTIONS, seen["predictions"])),
        asyncio.create_task(collect(JOBS, seen["jobs"])),
    ]
    try:
        await asyncio.sleep(0.1)  # both subscribed
        await create(kube, "early", HANG)
        await wait_for(lambda: seen["jobs"])
        finalized = await wait_for(
            lambda: [
                p for p in seen["predictions"] if FINALIZER in p["metadata"].get("finalizers", [])
            ]
        )
        job_written = int(seen["jobs"][0]["metadata"]["resourceVersion"])
        assert job_written < int(finalized[0]["metadata"]["resourceVersion"])
        # ...and by then its create handler has run, without creating anything twice.
        await wait_for(lambda: (current(kube, "early").get("status") or {}).get("phase"))
        assert kube.creations[JOBS, NS, "early"] == 1
        assert kube.creations[SECRETS, NS, "early-runner"] == 1
        assert "JobCreated" in await wait_for(lambda: event_reasons(kube, "early"))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_profile_and_secrets_reach_the_runner(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "cpu:\n  model: tiny.en\n  device: cpu\n  computeType: int8\n"
        "  resources: {requests: {cpu: 500m}}\n"
    )
    env = operator_environment(
        kube, redis_url, tmp_path,
        WHISPERX_PROFILES_FILE=str(profiles), WHISPERX_HF_TOKEN_SECRET="whisperx-hf-token",
    )  # fmt: skip
    for name, key, value in (("mine", "tok", "hf_user"), ("whisperx-hf-token", "token", "hf_op")):
        data = {key: __import__("base64").b64encode(value.encode()).decode()}
        await kube.create_object(SECRETS, NS, {"metadata": {"name": name}, "data": data})
    async with running_operator(kube, env, tmp_path / "operator.log"):
        secret_ref = {"huggingface_access_token": {"name": "mine", "key": "tok"}}
        await create(
            kube, "given", "https://fake.test/env", hardware="cpu", secretInputs=secret_ref
        )
        await create(kube, "default", "https://fake.test/env", hardware="cpu")
        await create(kube, "unknown", "https://fake.test/env")  # "whisperx" is not configured
        runs = {}
        for name in ("given", "default"):
            status = (await wait_for_phase(kube, name))["status"]
            assert status["phase"] == "succeeded", status
            client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            runs[name] = (await redis_json(client, f"wx:p:default:{name}:out"))["env"]
            await client.aclose()
        unknown = await wait_for_phase(kube, "unknown")
    assert runs["given"]["hf_token"] == "hf_user" and runs["default"]["hf_token"] == "hf_op"
    assert runs["given"]["model"] == "tiny.en" and runs["given"]["device"] == "cpu"
    assert runs["given"]["compute_type"] == "int8"
    given = {"audio_file": "https://fake.test/env"}
    if isinstance(kube, RealKube):
        given = with_server_defaults(given)
    assert runs["given"]["input"] == given
    assert unknown["status"]["reason"] == "UnknownHardware"
    assert "configured: cpu" in unknown["status"]["error"]


async def test_pods_that_die_or_never_start_end_the_prediction_with_the_reason(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess
) -> None:
    kubelet.plan("oom", PodPlan(oom_kill_after=0.3))
    kubelet.plan("evicted", PodPlan(evict_after=0.3))
    kubelet.plan("pull", PodPlan(waiting_reason="InvalidImageName", waiting_message="bad name"))
    if isinstance(kube, Emulator):
        kubelet.plan(
            "nogpu",
            PodPlan(unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
        )
        nogpu: dict[str, Any] = {}
    else:  # the real scheduler finds no node with that many GPUs
        nogpu = {"hardware": GPU_HUNGRY}
    await create(kube, "oom", HANG)
    # Preemption does not use up retries: with backoffLimit 0 the second pod still runs.
    await create(kube, "evicted", "https://fake.test/succeed?seconds=1", backoffLimit=0)
    await create(kube, "crash", "https://fake.test/crash")
    await create(kube, "pull", SUCCEED)
    await create(kube, "nogpu", SUCCEED, startDeadlineSeconds=1 if not nogpu else 5, **nogpu)
    await create(kube, "slow", HANG, activeDeadlineSeconds=1)
    await create(kube, "invalid", "https://fake.test/invalid", backoffLimit=3)
    await create(kube, "silent", "https://fake.test/noreport")

    expected = {
        "oom": ("failed", "OOMKilled", "out of memory"),
        "evicted": ("succeeded", "Succeeded", "transcription finished"),
        "crash": ("failed", "RunnerCrashed", "the runner exited with code 3"),
        "pull": ("failed", "ImagePullFailed", "cannot pull image whisperx/runner:test"),
        "nogpu": ("failed", "StartDeadlineExceeded", "Insufficient nvidia.com/gpu"),
        "slow": ("failed", "DeadlineExceeded", "longer than 1 s"),
        "invalid": ("failed", "InvalidAudio", "cannot be decoded"),
        "silent": ("failed", "NoResult", "without reporting a result"),
    }
    for name, (phase, reason, text) in expected.items():
        status = (await wait_for_phase(kube, name))["status"]
        assert (status["phase"], status["reason"]) == (phase, reason), (name, status)
        message = next(c["message"] for c in status["conditions"] if c["type"] == phase.title())
        assert text in message, (name, message)

    assert len(kubelet.runs("evicted")) == 2
    # exit code 2 fails the Job at once (podFailurePolicy), retries left or not
    assert len(kubelet.runs("invalid")) == 1
    # Pods that can never finish are stopped: their Jobs are deleted.
    for name in ("pull", "nogpu", "slow"):
        await wait_for(gone(kube, JOBS, name))
    warnings = [e for e in iter_events(kube, "oom") if e["type"] == "Warning"]
    assert warnings and warnings[0]["reason"] == "OOMKilled"
    # The crash's output (the termination message) is for `kubectl describe` only: the
    # error, which the gateway returns to API callers, says the exit code and no more.
    crashed = (await wait_for_phase(kube, "crash"))["status"]
    assert crashed["error"] == "the runner exited with code 3", crashed
    output = await wait_for(
        lambda: [e for e in iter_events(kube, "crash") if e["reason"] == "RunnerOutput"]
    )
    assert len(output) == 1 and "Segmentation fault" in output[0]["message"], output


async def test_a_replacement_pod_after_an_eviction_delivers_the_transcript(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess, redis_client: aioredis.Redis
) -> None:
    # The first pod is evicted mid-run, once its start and logs reports are in (it also
    # reports `canceled` on SIGTERM); the Job's replacement pod numbers its reports from 1.
    evict = asyncio.Event()
    kubelet.plan("ev", PodPlan(evict_when=evict))
    await create(kube, "ev", "https://fake.test/succeed?seconds=1.5")
    await wait_for(lambda: redis_client.exists("wx:p:default:ev:logs"))
    evict.set()
    obj = await wait_for_phase(kube, "ev", within=30)
    assert obj["status"]["phase"] == "succeeded", obj["status"]
    assert obj["status"]["detectedLanguage"] == "en"
    await wait_for(lambda: [run.exit_code for run in kubelet.runs("ev")] == [143, 0])
    output = await redis_json(redis_client, "wx:p:default:ev:out")
    assert output["segments"][0]["text"] == " the quick brown fox"
    logs = await redis_client.get("wx:p:default:ev:logs")
    assert isinstance(logs, str) and logs.count("loading model") == 2 and "transcribed" in logs


async def test_a_kubelet_retry_is_waited_on_for_a_grace_then_fails_with_its_reason(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    env = operator_environment(kube, redis_url, tmp_path, WHISPERX_WAITING_GRACE_SECONDS="3")
    rate_limited = "toomanyrequests: You have reached your pull rate limit"
    kubelet.plan(
        "gives-up", PodPlan(waiting_reason="ImagePullBackOff", waiting_message=rate_limited)
    )
    # The registry answers again within the grace: the pull succeeds, the run goes on.
    kubelet.plan(
        "recovers",
        PodPlan(waiting_reason="ImagePullBackOff", waiting_message=rate_limited, waiting_seconds=1),
    )
    # A Secret or key the container needs, missing: the kubelet retries it too.
    missing_key = "couldn't find key token in Secret default/whisperx-hf-token"
    kubelet.plan(
        "no-key", PodPlan(waiting_reason="CreateContainerConfigError", waiting_message=missing_key)
    )
    async with running_operator(kube, env, tmp_path / "operator.log"):
        await create(kube, "gives-up")
        await create(kube, "recovers")
        await create(kube, "no-key")

        def waiting() -> dict[str, Any] | None:
            obj = kube.get(PREDICTIONS, NS, "gives-up")
            return obj if obj and conditions(obj).get("Waiting") == "True" else None

        obj = await wait_for(waiting)
        assert obj["status"]["phase"] == "starting"  # not failed at first sight
        warning = await wait_for(
            lambda: next((e for e in iter_events(kube, "gives-up") if e["type"] == "Warning"), None)
        )
        assert warning["reason"] == "ImagePullBackOff" and "pull rate limit" in warning["message"]
        failed = (await wait_for_phase(kube, "gives-up"))["status"]
        recovered = await wait_for_phase(kube, "recovers")
        no_key = (await wait_for_phase(kube, "no-key"))["status"]
    assert (failed["phase"], failed["reason"]) == ("failed", "ImagePullFailed")
    assert "cannot pull image whisperx/runner:test" in failed["error"]
    assert "still ImagePullBackOff after 3 s" in failed["error"]
    await wait_for(gone(kube, JOBS, "gives-up"))
    assert recovered["status"]["phase"] == "succeeded"
    assert conditions(recovered)["Waiting"] == "False"
    assert (no_key["phase"], no_key["reason"]) == ("failed", "ContainerConfigError"), no_key
    assert missing_key in no_key["error"] and "after 3 s" in no_key["error"]


# The scheduler's words for a pod whose claim exists but is not bound (the emulator's).
UNBOUND_CLAIM = "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims."


async def test_a_namespace_without_the_runner_account_or_model_cache_fails_at_once(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    env = operator_environment(
        kube, redis_url, tmp_path,
        WHISPERX_RUNNER_SERVICE_ACCOUNT="whisperx-runner", WHISPERX_MODEL_CACHE_PVC="models",
        WHISPERX_WAITING_GRACE_SECONDS="3",
    )  # fmt: skip
    # "default" has the runner's ServiceAccount but no model cache claim "models"; "bare"
    # neither; "unbound" both, but its claim can never bind (no volume, no provisioner).
    if isinstance(kube, Emulator):
        await kube.create_object(SERVICE_ACCOUNTS, NS, {"metadata": {"name": "whisperx-runner"}})
        await kube.create_object(NAMESPACES, None, {"metadata": {"name": "bare"}})
        await kube.create_object(NAMESPACES, None, {"metadata": {"name": "unbound"}})
        await kube.create_object(
            SERVICE_ACCOUNTS, "unbound", {"metadata": {"name": "whisperx-runner"}}
        )
        await kube.create_object(CLAIMS, "unbound", {"metadata": {"name": "models"}})
        kubelet.plan("never-bound", PodPlan(unschedulable=UNBOUND_CLAIM))
    else:
        # A tenant as manifests/base/tenant makes one, less its runner ServiceAccount.
        await asyncio.to_thread(make_tenant, kube.plane, "bare", without={"ServiceAccount"})
        await asyncio.to_thread(make_tenant, kube.plane, "unbound")
        claim = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": "unbound"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                     "resources": {"requests": {"storage": "1Gi"}}},
        }  # fmt: skip
        kube.plane.kubectl("apply", "-f", "-", stdin=json.dumps(claim))
    try:
        async with running_operator(kube, env, tmp_path / "operator.log"):
            await create(kube, "no-cache")
            bare = prediction_body("no-account", SUCCEED)
            await kube.create_object(PREDICTIONS, "bare", bare)
            never_bound = prediction_body("never-bound", SUCCEED)
            await kube.create_object(PREDICTIONS, "unbound", never_bound)
            no_cache = (await wait_for_phase(kube, "no-cache"))["status"]
            no_account = (await wait_for_phase(kube, "no-account", namespace="bare"))["status"]
            never = (await wait_for_phase(kube, "never-bound", namespace="unbound"))["status"]
    finally:
        if isinstance(kube, RealKube):
            for namespace in ("bare", "unbound"):
                await asyncio.to_thread(remove_tenant, kube.plane, namespace)
    # Not at the start deadline (an hour by default): now, with the server's words.
    assert (no_cache["phase"], no_cache["reason"]) == ("failed", "VolumeUnbound")
    assert 'persistentvolumeclaim "models" not found' in no_cache["error"]
    assert (no_account["phase"], no_account["reason"]) == ("failed", "RunnerNotCreated")
    assert 'serviceaccount "whisperx-runner" not found' in no_account["error"]
    # A claim that exists may yet bind (a provisioner at work): waited on for the grace.
    assert (never["phase"], never["reason"]) == ("failed", "VolumeUnbound"), never
    assert "unbound immediate PersistentVolumeClaims" in never["error"]
    await wait_for(gone(kube, JOBS, "no-cache"))
    await wait_for(lambda: kube.get(JOBS, "bare", "no-account") is None)
    await wait_for(lambda: kube.get(JOBS, "unbound", "never-bound") is None)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_the_operator_process_answers_on_ipv4_and_ipv6_by_default(
    kube: Emulator, redis_url: str, tmp_path: Path
) -> None:
    """The runners' endpoint (reports, work, readiness) with WHISPERX_LISTEN_HOST unset:
    a pod on an IPv6 or dual-stack cluster reaches it at its IPv6 address."""
    env = operator_environment(kube, redis_url, tmp_path)
    del env["WHISPERX_LISTEN_HOST"]
    async with (
        running_operator(kube, env, tmp_path / "operator.log"),
        aiohttp.ClientSession() as http,
    ):
        for host in ("127.0.0.1", "::1"):
            url = f"http://{join_host_port(host, int(env['WHISPERX_REPORT_PORT']))}/readyz"
            async with http.get(url) as resp:
                assert resp.status == 200, host


async def test_a_job_held_by_kueue_reads_as_queued(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    env = operator_environment(kube, redis_url, tmp_path, WHISPERX_KUEUE_QUEUE="gpu-queue")
    async with running_operator(kube, env, tmp_path / "operator.log"):
        await create(kube, "q1")
        job = await wait_for(lambda: kube.get(JOBS, NS, "q1"))
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"

        def queued() -> dict[str, Any] | None:
            obj = kube.get(PREDICTIONS, NS, "q1")
            return obj if obj and conditions(obj).get("Queued") == "True" else None

        obj = await wait_for(queued)
        assert obj["status"]["phase"] == "starting"
        await asyncio.sleep(0.5)
        assert current(kube, "q1")["status"]["phase"] == "starting"  # not failed
        # Kueue admits the Job by unsuspending it.
        await kube.patch_object(JOBS, NS, "q1", {"spec": {"suspend": False}})
        done = await wait_for_phase(kube, "q1")
    assert done["status"]["phase"] == "succeeded"
    assert conditions(done)["Queued"] == "False"
    assert "Queued" in event_reasons(kube, "q1")


async def test_a_run_suspended_by_kueue_is_queued_again_and_its_deadline_paused(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess
) -> None:
    await create(kube, "pre", "https://fake.test/succeed?seconds=1.5", activeDeadlineSeconds=6)
    await wait_for_phase(kube, "pre", ["processing"])
    # Kueue preempts a running workload by suspending its Job; the Job controller stops
    # the pod (the stand-in does as it would).
    await kube.patch_object(JOBS, NS, "pre", {"spec": {"suspend": True}})

    def requeued() -> dict[str, Any] | None:
        obj = kube.get(PREDICTIONS, NS, "pre")
        return obj if obj and conditions(obj).get("Queued") == "True" else None

    obj = await wait_for(requeued)
    assert obj["status"]["phase"] == "processing" and conditions(obj)["Running"] == "False"
    await wait_for(exited(kubelet, "pre", 143))
    await asyncio.sleep(6.5)  # past the run deadline, had it kept running
    assert conditions(current(kube, "pre")) == {"Queued": "True", "Running": "False"}
    await kube.patch_object(JOBS, NS, "pre", {"spec": {"suspend": False}})
    done = await wait_for_phase(kube, "pre", within=20)
    assert done["status"]["phase"] == "succeeded", done["status"]
    assert conditions(done)["Queued"] == "False"
    # The Job controller's condition times have whole seconds.
    assert done["status"]["suspendedSeconds"] >= 5.5
    await wait_for(lambda: [run.exit_code for run in kubelet.runs("pre")] == [143, 0])


async def test_a_suspended_run_not_admitted_again_ends_at_its_start_deadline(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess
) -> None:
    await create(kube, "stuck", HANG, startDeadlineSeconds=2)
    await wait_for_phase(kube, "stuck", ["processing"])
    await kube.patch_object(JOBS, NS, "stuck", {"spec": {"suspend": True}})
    status = (await wait_for_phase(kube, "stuck"))["status"]
    assert (status["phase"], status["reason"]) == ("failed", "StartDeadlineExceeded")
    assert "suspended run was not admitted again within 2 s" in status["error"]
    await wait_for(gone(kube, JOBS, "stuck"))


async def test_cancel_by_field_or_annotation_and_no_revival(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess, redis_client: aioredis.Redis
) -> None:
    by_field = await create(kube, "c1", HANG)
    await create(kube, "c2", HANG)
    await wait_for_phase(kube, "c1", ["processing"])
    await wait_for_phase(kube, "c2", ["processing"])
    await kube.patch_object(PREDICTIONS, NS, "c1", {"spec": {"cancel": True}})
    annotation = {"metadata": {"annotations": {"whisperx.io/cancel": "true"}}}
    await kube.patch_object(PREDICTIONS, NS, "c2", annotation)
    for name in ("c1", "c2"):
        obj = await wait_for_phase(kube, name)
        assert obj["status"]["phase"] == "canceled" and conditions(obj)["Canceled"] == "True"
        await wait_for(gone(kube, JOBS, name))
        # The runner got SIGTERM and reported `canceled` (exit 143); nothing changed.
        await wait_for(exited(kubelet, name, 143))
    late = {"event": "completed", "seq": 50, "status": "succeeded", "output": {"segments": []}}
    assert await report(operator, by_field, late) == (
        200, {"applied": False, "reason": "prediction has ended"}
    )  # fmt: skip
    assert current(kube, "c1")["status"]["phase"] == "canceled"
    record = await redis_json(redis_client, "wx:p:default:c1:rec")
    assert record["status"]["phase"] == "canceled"


async def test_reports_need_this_predictions_fresh_signature(
    kube: Emulator, operator: OperatorProcess
) -> None:
    # No kubelet: the test plays the runner.
    mine = await create(kube, "r1")
    other = await create(kube, "r2")
    await wait_for(lambda: (current(kube, "r1").get("status") or {}).get("phase"))
    start = {"event": "start", "seq": 1}
    other_token = prediction_token(TEST_REPORT_KEY.encode(), NS, "r2", other["metadata"]["uid"])
    assert (await report(operator, mine, start, token=other_token))[0] == 401
    assert (await report(operator, mine, start, signature="t=1,v1=00"))[0] == 401
    assert (await report(operator, mine, start, timestamp=int(time.time()) - 3600))[0] == 401
    assert await report(operator, mine, start) == (200, {"applied": True})
    assert (await report(operator, mine, start))[1] == {
        "applied": False,
        "reason": "already applied",
    }
    assert (await report(operator, mine, {"event": "nonsense", "seq": 2}))[0] == 422
    assert current(kube, "r1")["status"]["phase"] == "processing"
    assert current(kube, "r2")["status"]["phase"] == "starting"


@pytest.mark.parametrize(
    ("spec", "reason", "field"),
    [
        ({"hardware": "h100"}, "UnknownHardware", "spec.hardware"),
        ({"input": {"audio_file": "ftp://x/a.wav"}}, "InvalidInput", "spec.input.audio_file"),
        ({"input": {"audio_file": SUCCEED, "min_speakers": 3, "max_speakers": 1}},
         "InvalidInput", "min_speakers must not be greater than max_speakers"),
        ({"input": {"audio_file": SUCCEED, "temperature": "hot"}}, "InvalidInput",
         "spec.input.temperature"),
    ],
)  # fmt: skip
async def test_bad_input_fails_with_a_condition_and_a_warning(
    kube: Emulator, operator: OperatorProcess, spec: dict[str, Any], reason: str, field: str
) -> None:
    body = prediction_body("bad", SUCCEED)
    body["spec"].update(spec)
    if isinstance(kube, RealKube) and reason == "InvalidInput":
        # The real API server applies the CRD schema: it refuses, naming the field.
        with pytest.raises(ApiError) as refused:
            await kube.create_object(PREDICTIONS, NS, body)
        assert refused.value.status == 422 and field in refused.value.message
        return
    # The emulator does not apply the CRD schema: this is the operator's own check.
    await kube.create_object(PREDICTIONS, NS, body)
    obj = await wait_for_phase(kube, "bad")
    assert obj["status"]["phase"] == "failed" and obj["status"]["reason"] == reason
    assert conditions(obj)["Failed"] == "True" and field in obj["status"]["error"]
    warning = await wait_for(
        lambda: next((e for e in iter_events(kube, "bad") if e["type"] == "Warning"), None)
    )
    assert warning["reason"] == reason and field in warning["message"]
    assert kube.creations[JOBS, NS, "bad"] == 0


async def test_ttl_deletes_the_prediction_and_its_data(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess, redis_client: aioredis.Redis
) -> None:
    await create(kube, "t1", ttlSecondsAfterFinished=1)
    # Refused predictions expire too.
    await create(kube, "t2", hardware="nope", ttlSecondsAfterFinished=0)
    await wait_for_phase(kube, "t1")
    assert await redis_client.exists("wx:p:default:t1:out", "wx:p:default:t1:rec") == 2
    await wait_for(lambda: kube.get(PREDICTIONS, NS, "t1") is None, within=10)
    # The garbage collector follows the owner references (in the background).
    await wait_for(lambda: kube.get(JOBS, NS, "t1") is None, within=60)
    await wait_for(lambda: kube.get(SECRETS, NS, "t1-runner") is None, within=60)
    await wait_for(lambda: kube.get(PREDICTIONS, NS, "t2") is None)
    keys = await redis_client.keys("wx:p:default:t*")
    assert keys == [] and await redis_client.zscore("wx:idx:default", "t1") is None


async def test_ttl_keeps_a_prediction_declared_in_git_and_removes_only_its_data(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess, redis_client: aioredis.Redis
) -> None:
    # Argo CD's self-heal would create a deleted one again, and it would run again.
    tracking_id = "wx:whisperx.io/Prediction:default/argo"
    markers = {
        "argo": {"annotations": {"argocd.argoproj.io/tracking-id": tracking_id}},
        "label": {"labels": {"app.kubernetes.io/instance": "transcripts"}},
        "keep": {"annotations": {"whisperx.io/keep": "true"}},
    }
    for name, meta in markers.items():
        body = prediction_body(name, SUCCEED, ttlSecondsAfterFinished=0)
        body["metadata"].update(meta)
        await kube.create_object(PREDICTIONS, NS, body)
    for name in markers:
        assert (await wait_for_phase(kube, name))["status"]["phase"] == "succeeded"

    async def data_removed(name: str) -> bool:
        record = await redis_json(redis_client, f"wx:p:default:{name}:rec")
        return bool(record["data_removed"])

    for name in markers:
        await wait_for(gone(kube, JOBS, name))
        await wait_for(functools.partial(data_removed, name))
        assert await redis_client.exists(f"wx:p:default:{name}:out") == 0
        assert await redis_client.exists(f"wx:p:default:{name}:logs") == 0
    await asyncio.sleep(1)
    for name in markers:
        assert current(kube, name)["status"]["phase"] == "succeeded"


async def test_an_operator_crash_loses_nothing_and_repeats_nothing(
    kube: Emulator,
    kubelet: Kubelet,
    operator: OperatorProcess,
    redis_client: aioredis.Redis,
    webhooks: WebhookReceiver,
) -> None:
    await create(
        kube, "k1", "https://fake.test/succeed?seconds=1.5",
        webhook=webhooks.url, webhookEventsFilter=["completed"],
    )  # fmt: skip
    await wait_for_phase(kube, "k1", ["processing"])
    await operator.kill()  # the runner's reports now fail; it retries
    await asyncio.sleep(2)
    await operator.restart(kube)
    obj = await wait_for_phase(kube, "k1")
    assert obj["status"]["phase"] == "succeeded"
    assert kube.creations[JOBS, NS, "k1"] == 1 and len(kubelet.runs("k1")) == 1
    await wait_for(lambda: webhooks.events("k1") == ["succeeded"])

    # A crash after the status was saved but before Redis heard of it: resuming
    # re-publishes the record and queues the terminal webhook exactly once.
    await operator.kill()
    await redis_client.delete("wx:p:default:k1:rec", "wx:p:default:k1:wh-completed")
    webhooks.received.clear()
    await operator.restart(kube)
    await wait_for(lambda: redis_client.exists("wx:p:default:k1:rec"))
    await wait_for(lambda: webhooks.events("k1") == ["succeeded"])
    await operator.kill()
    await operator.restart(kube)
    await asyncio.sleep(1)
    assert webhooks.events("k1") == ["succeeded"]
    assert kube.creations[JOBS, NS, "k1"] == 1


async def test_a_standby_replica_does_not_act(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    active_env = operator_environment(kube, redis_url, tmp_path, WHISPERX_PEERING_PRIORITY="10")
    standby = OperatorProcess(
        env=operator_environment(kube, redis_url, tmp_path, WHISPERX_PEERING_PRIORITY="5"),
        log_path=tmp_path / "standby.log",
    )
    async with running_operator(kube, active_env, tmp_path / "active.log"):
        standby.start()
        try:
            await wait_for(lambda: "replica is now standby" in standby.log_tail(400), within=15)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{standby.report_url}/readyz") as resp,
            ):
                assert resp.status == 503
            created = await create(kube, "s1")
            assert (await wait_for_phase(kube, "s1"))["status"]["phase"] == "succeeded"
            assert kube.creations[JOBS, NS, "s1"] == 1
            assert (await report(standby, created, {"event": "start", "seq": 9}))[0] == 503
            assert "s1" not in standby.log_tail(400)
        finally:
            await standby.stop()


async def test_an_operator_of_some_namespaces_peers_in_each_and_acts_only_there(
    kube: Emulator, kubelet: Kubelet, redis_url: str, tmp_path: Path
) -> None:
    for namespace in ("tenant-a", "tenant-b"):
        if isinstance(kube, RealKube):
            await asyncio.to_thread(make_tenant, kube.plane, namespace)
        else:
            await kube.create_object(NAMESPACES, None, {"metadata": {"name": namespace}})
    if isinstance(kube, RealKube):
        await kube.track(PEERINGS)
    env = operator_environment(kube, redis_url, tmp_path, WHISPERX_NAMESPACES="tenant-a,tenant-b")
    try:
        await _acts_only_in_its_namespaces(kube, env, tmp_path)
    finally:
        if isinstance(kube, RealKube):
            for namespace in ("tenant-a", "tenant-b"):
                await asyncio.to_thread(remove_tenant, kube.plane, namespace)


async def _acts_only_in_its_namespaces(kube: Emulator, env: dict[str, str], tmp_path: Path) -> None:
    async with running_operator(kube, env, tmp_path / "operator.log") as operator:
        # kopf peers through a KopfPeering in each namespace; none existed.
        identity = env["POD_ID"]

        def peered(namespace: str) -> bool:
            peering = kube.get(PEERINGS, namespace, "whisperx") or {}
            return identity in (peering.get("status") or {})

        await wait_for(lambda: peered("tenant-a") and peered("tenant-b"), within=15)
        await kube.create_object(PREDICTIONS, "tenant-b", prediction_body("mine", SUCCEED))
        await kube.create_object(PREDICTIONS, NS, prediction_body("not-mine", SUCCEED))
        done = await wait_for_phase(kube, "mine", namespace="tenant-b")
        assert done["status"]["phase"] == "succeeded", operator.log_tail()
        await asyncio.sleep(1)
    assert "status" not in current(kube, "not-mine") and kube.get(JOBS, NS, "not-mine") is None


async def test_a_prediction_where_the_operator_has_no_rights_fails_at_once(
    kube: Emulator, kubelet: Kubelet, operator: OperatorProcess
) -> None:
    if not isinstance(kube, RealKube):
        pytest.skip("RBAC is the real API server's: the emulator grants everything")
    # A namespace that is not a tenant: the operator's Role is not bound there.
    await kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": "not-a-tenant"}})
    try:
        await kube.create_object(PREDICTIONS, "not-a-tenant", prediction_body("lost", SUCCEED))
        status = (await wait_for_phase(kube, "lost", namespace="not-a-tenant"))["status"]
        assert (status["phase"], status["reason"]) == ("failed", "NamespaceNotServed")
        assert "namespace not-a-tenant is not served" in status["error"]
        assert "forbidden" in status["error"]
    finally:
        await asyncio.to_thread(remove_tenant, kube.plane, "not-a-tenant")
