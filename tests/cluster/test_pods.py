"""The whole stack as pods on the real node (tests/cluster/pod_stack.py), seen as a user
sees it: the official clients through the gateway's Service, the real runner image in
runner Jobs under runc, and what a kubelet and containerd enforce (SIGTERM on cancel, the
OOM killer, evictions, a killed operator pod, the gateway's NetworkPolicy applied by
kube-router's policy controller)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from replicate.client import Client
from replicate.prediction import Prediction

from tests.cluster.pod_stack import SYSTEM, TENANT, PodStack, eventually
from tests.flow.conftest import FOX_WORDS, stems

pytestmark = pytest.mark.whisperx

KIND_PROFILES = Path(__file__).resolve().parents[2] / "manifests/overlays/kind/profiles.yaml"
RUNNER_IMAGE = "whisperx/runner:0.1.0-cpu"
# A tag nobody imported.
MISSING_IMAGE = "whisperx/runner:0.0.0-missing"
JS_DIR = Path(__file__).resolve().parents[1] / "js"


@pytest.fixture(scope="module")
def long_wav(fox_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About three minutes of speech: long enough to act on a run while it transcribes."""
    path = tmp_path_factory.mktemp("long") / "long.wav"
    subprocess.run(["sox", str(fox_wav), str(path), "repeat", "70"], check=True)
    return path


@pytest.fixture(scope="module")
def longer_wav(fox_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About eighteen minutes of speech: a run that lasts a minute or more."""
    path = tmp_path_factory.mktemp("longer") / "longer.wav"
    subprocess.run(["sox", str(fox_wav), str(path), "repeat", "400"], check=True)
    return path


def client(stack: PodStack) -> Client:
    return Client(api_token=stack.token, base_url=stack.gateway_url)


async def create(stack: PodStack, wav: Path, model: str = "whisperx/whisperx") -> Prediction:
    """A prediction of `wav` made by the official client, which uploads the file."""
    with wav.open("rb") as audio:
        prediction: Prediction = await asyncio.to_thread(
            client(stack).predictions.create,
            model=model,
            input={"audio_file": audio, "align_output": False},
        )
    return prediction


def words(output: Any) -> list[str]:
    """The transcript's words, as stems (tiny.en may hear "jumps" as "jump")."""
    assert isinstance(output, dict), output
    return stems(" ".join(s["text"] for s in output["segments"]).split())


def kind_profiles(**changes: Any) -> dict[str, Any]:
    profiles: dict[str, Any] = yaml.safe_load(KIND_PROFILES.read_text())
    for profile in profiles.values():
        profile.update(changes)
    return profiles


@pytest.fixture
def warm(pod_stack: PodStack) -> Iterator[PodStack]:
    """The kind overlay's profiles with runners kept warm for a minute."""
    pod_stack.configure_operator(kind_profiles(idleSeconds=60))
    try:
        yield pod_stack
    finally:
        pod_stack.configure_operator(kind_profiles())


def ran(stack: PodStack, prediction: str) -> dict[str, Any]:
    """The pod that ran `prediction`: the real runner image, checked by the kubelet to run
    as a non-root user."""
    (pod,) = stack.prediction_pods(prediction)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == RUNNER_IMAGE
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (state,) = pod["status"]["containerStatuses"]
    assert state["imageID"], state
    return pod


def terminated(stack: PodStack, selector: str, within: float) -> dict[str, Any]:
    """The first terminated state a container of the selected pods reports."""

    def seen() -> dict[str, Any] | None:
        for pod in stack.items("pod", selector):
            for state in pod.get("status", {}).get("containerStatuses") or []:
                if "terminated" in state.get("state", {}):
                    return dict(state["state"]["terminated"])
        return None

    result: dict[str, Any] = eventually(f"a container of {selector} ends", seen, within)
    return result


def status(stack: PodStack, prediction: str) -> dict[str, Any]:
    return stack.get("prediction", prediction).get("status") or {}


def until_processing(stack: PodStack, prediction: str) -> None:
    """Until the runner has reported its start (its model loaded)."""
    eventually(f"{prediction} processing",
               lambda: status(stack, prediction).get("phase") == "processing", 180)  # fmt: skip


async def test_python_client_one_shot(pod_stack: PodStack, fox_wav: Path) -> None:
    prediction = await create(pod_stack, fox_wav)
    await asyncio.to_thread(prediction.wait)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs)
    assert words(prediction.output) == stems(FOX_WORDS)
    pod = ran(pod_stack, prediction.id)
    # It reported its end, then exited 0.
    ended = terminated(pod_stack, f"batch.kubernetes.io/job-name={prediction.id}", 30)
    assert ended["exitCode"] == 0, ended
    # `kubectl logs` of the runner pod shows its progress.
    logs = pod_stack.kubectl("logs", "-n", TENANT, pod["metadata"]["name"]).stdout
    assert "Transcribing" in logs, logs


async def test_javascript_client(pod_stack: PodStack, fox_wav: Path) -> None:
    node = shutil.which("node")
    assert node, "node is not installed: run scripts/setup.sh"
    env = {"PATH": "/usr/bin:/bin", "WHISPERX_BASE_URL": pod_stack.gateway_url + "/v1",
           "WHISPERX_TOKEN": pod_stack.token, "WHISPERX_AUDIO_FILE": str(fox_wav)}  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, [node, "client.mjs", "cluster_transcribe"], cwd=JS_DIR, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout.strip().splitlines()[-1])["cluster_transcribe"]["output"]
    assert words(output) == stems(FOX_WORDS)


async def test_warm_runner_serves_both_clients_predictions(warm: PodStack, fox_wav: Path) -> None:
    ids = []
    for _ in range(2):
        prediction = await create(warm, fox_wav)
        await asyncio.to_thread(prediction.wait)
        assert prediction.status == "succeeded", (prediction.error, prediction.logs)
        assert words(prediction.output) == stems(FOX_WORDS)
        ids.append(prediction.id)
    first, second = (ran(warm, i)["metadata"]["name"] for i in ids)
    # One runner pod (its model loaded once) served both.
    assert first == second


async def test_cancel_stops_the_runner_with_sigterm(pod_stack: PodStack, long_wav: Path) -> None:
    prediction = await create(pod_stack, long_wav)
    await asyncio.to_thread(until_processing, pod_stack, prediction.id)
    await asyncio.to_thread(prediction.cancel)
    # runc delivers SIGTERM to the runner (PID 1 of its container): it reports the
    # cancel and exits 143 within its grace period.
    ended = await asyncio.to_thread(
        terminated, pod_stack, f"batch.kubernetes.io/job-name={prediction.id}", 60
    )
    assert ended["exitCode"] == 143, ended
    await asyncio.to_thread(prediction.wait)
    assert prediction.status == "canceled"


async def test_out_of_memory_ends_the_prediction_with_that_reason(
    pod_stack: PodStack, fox_wav: Path
) -> None:
    small = {"requests": {"cpu": "200m", "memory": "150Mi"}, "limits": {"memory": "150Mi"}}
    pod_stack.configure_operator(kind_profiles(resources=small))
    try:
        prediction = await create(pod_stack, fox_wav)
        await asyncio.to_thread(prediction.wait)
        assert prediction.status == "failed"
        assert status(pod_stack, prediction.id)["reason"] == "OOMKilled"
        ended = terminated(pod_stack, f"batch.kubernetes.io/job-name={prediction.id}", 10)
        assert ended["reason"] == "OOMKilled" and ended["exitCode"] == 137, ended
    finally:
        pod_stack.configure_operator(kind_profiles())


async def test_a_runner_image_that_is_not_there_fails_one_shot_and_warm_predictions(
    pod_stack: PodStack, fox_wav: Path
) -> None:
    # The kubelet's pull of a tag nobody imported fails (every registry is the loopback
    # discard port here) and backs off; after the waiting grace the operator ends the
    # one-shot prediction, and deletes the warm runner Job and fails what waits for it.
    profiles = kind_profiles()
    profiles["whisperx-a40-large"] = {**profiles["whisperx"], "idleSeconds": 60}
    pod_stack.configure_operator(
        profiles,
        WHISPERX_RUNNER_IMAGE=MISSING_IMAGE,
        WHISPERX_WAITING_GRACE_SECONDS="15",
    )
    try:
        one_shot = await create(pod_stack, fox_wav)
        warm = await create(pod_stack, fox_wav, model="whisperx/whisperx-a40-large")
        for prediction in (one_shot, warm):
            await asyncio.to_thread(prediction.wait)
            assert prediction.status == "failed"
            assert status(pod_stack, prediction.id)["reason"] == "ImagePullFailed"
            assert "cannot pull image" in (prediction.error or ""), prediction.error
            assert "after 15 s" in (prediction.error or ""), prediction.error

        def stuck_runners() -> list[str]:
            return [
                job["metadata"]["name"]
                for job in pod_stack.items("job", "whisperx.io/runner")
                if job["spec"]["template"]["spec"]["containers"][0]["image"] == MISSING_IMAGE
            ]

        eventually("the warm runner Job deleted", lambda: not stuck_runners())
    finally:
        pod_stack.configure_operator(
            kind_profiles(), WHISPERX_RUNNER_IMAGE=None, WHISPERX_WAITING_GRACE_SECONDS=None
        )


async def test_operator_pod_killed_mid_run_loses_nothing(
    pod_stack: PodStack, long_wav: Path
) -> None:
    prediction = await create(pod_stack, long_wav)
    await asyncio.to_thread(until_processing, pod_stack, prediction.id)
    (old,) = pod_stack.items("pod", "app.kubernetes.io/name=whisperx-operator", namespace=SYSTEM)
    pod_stack.kubectl("delete", "pod", "-n", SYSTEM, old["metadata"]["name"],
                      "--grace-period=0", "--force")  # fmt: skip
    await asyncio.to_thread(prediction.wait)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs)
    assert len(words(prediction.output)) > 100
    (new,) = pod_stack.items("pod", "app.kubernetes.io/name=whisperx-operator", namespace=SYSTEM)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]


async def test_an_evicted_runner_is_retried(pod_stack: PodStack, long_wav: Path) -> None:
    prediction = await create(pod_stack, long_wav)
    await asyncio.to_thread(until_processing, pod_stack, prediction.id)
    (pod,) = pod_stack.prediction_pods(prediction.id)
    name = pod["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": TENANT}}  # fmt: skip
    pod_stack.kubectl("create", "--raw", f"/api/v1/namespaces/{TENANT}/pods/{name}/eviction",
                      "-f", "-", stdin=json.dumps(eviction))  # fmt: skip
    await asyncio.to_thread(prediction.wait)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs)
    # The Job's podFailurePolicy ignores the disruption: a second pod ran it.
    job = pod_stack.get("job", prediction.id)
    assert job["status"].get("failed", 0) == 0
    assert status(pod_stack, prediction.id)["podName"] != name


def connects(stack: PodStack, pod: str, namespace: str, host: str, port: int) -> bool:
    code = (
        "import socket\n"
        f"try:\n socket.create_connection(({host!r}, {port}), timeout=3).close(); print('open')\n"
        "except OSError as e: print('blocked', e)\n"
    )
    out = stack.exec_python(pod, code, namespace)
    assert out.startswith(("open", "blocked")), out
    return out.startswith("open")


OTHER_TENANT = "other-tenant"


@pytest.fixture(scope="module")
def runner_like_pods(pod_stack: PodStack) -> Iterator[dict[str, str]]:
    """A pod carrying the runner's labels in the tenant namespace (the runner image,
    idle), and one listening on port 8080 in another namespace."""
    restricted = {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "name": "idle",
        "image": RUNNER_IMAGE,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pods = {TENANT: "runner-like", OTHER_TENANT: "listener"}
    commands = {
        TENANT: ["sleep", "3600"],
        OTHER_TENANT: ["python3", "-m", "http.server", "8080", "--directory", "/tmp"],
    }
    pod_stack.kubectl("create", "namespace", OTHER_TENANT)
    for namespace, name in pods.items():
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "whisperx-runner"}},
            "spec": {"securityContext": restricted,
                     "containers": [{**container, "command": commands[namespace]}],
                     "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 0},
        }  # fmt: skip
        pod_stack.kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    for namespace, name in pods.items():
        pod_stack.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}",
                          "--timeout=120s", timeout=130)  # fmt: skip
    try:
        yield pods
    finally:
        # (The lost node's test, last in the module, may have had them deleted already.)
        pod_stack.kubectl("delete", "namespace", OTHER_TENANT, "--wait=false")
        pod_stack.kubectl("delete", "pod", "-n", TENANT, pods[TENANT], "--wait=false",
                          "--ignore-not-found")  # fmt: skip


def test_network_policies_hold_for_runners(
    pod_stack: PodStack, runner_like_pods: dict[str, str]
) -> None:
    pod = runner_like_pods[TENANT]
    system = f"{SYSTEM}.svc.cluster.local"
    assert connects(pod_stack, pod, TENANT, f"whisperx-operator.{system}", 8081)
    assert connects(pod_stack, pod, TENANT, f"whisperx-gateway.{system}", 8000)
    # Redis listens (the gateway reaches it): only the policy refuses a runner.
    assert not connects(pod_stack, pod, TENANT, f"whisperx-redis.{system}", 6379)
    (redis,) = pod_stack.items("pod", "app.kubernetes.io/name=whisperx-redis", namespace=SYSTEM)
    assert not connects(pod_stack, pod, TENANT, redis["status"]["podIP"], 6379)
    # Another namespace's pod listens (the node reaches it; the engine lets the node's own
    # traffic pass), and the runner's policy refuses it.
    listener = pod_stack.get("pod", runner_like_pods[OTHER_TENANT], OTHER_TENANT)
    address = listener["status"]["podIP"]
    socket.create_connection((address, 8080), timeout=3).close()
    assert not connects(pod_stack, pod, TENANT, address, 8080)
    # Not checked: the API server. The runners' policy allows every address outside the
    # private ranges, and this node's (the API server's) is one of those here.


def test_network_policies_hold_for_the_gateway(pod_stack: PodStack) -> None:
    (gateway,) = pod_stack.items("pod", "app.kubernetes.io/name=whisperx-gateway",
                                 namespace=SYSTEM)  # fmt: skip
    name = gateway["metadata"]["name"]
    system = f"{SYSTEM}.svc.cluster.local"
    # What its policy names: Redis, the API server, DNS (the names resolve).
    assert connects(pod_stack, name, SYSTEM, f"whisperx-redis.{system}", 6379)
    assert connects(pod_stack, name, SYSTEM, "kubernetes.default.svc.cluster.local", 443)
    # Nothing else: not the operator's report endpoint.
    assert not connects(pod_stack, name, SYSTEM, f"whisperx-operator.{system}", 8081)


def test_probes_and_security_contexts_as_the_manifests_say(pod_stack: PodStack) -> None:
    for component, uid in (("whisperx-operator", 10001), ("whisperx-gateway", 10001),
                           ("whisperx-redis", 999)):  # fmt: skip
        (pod,) = pod_stack.items("pod", f"app.kubernetes.io/name={component}", namespace=SYSTEM)
        name = pod["metadata"]["name"]
        (state,) = pod["status"]["containerStatuses"]
        assert state["ready"] and state["restartCount"] == 0, state
        code = (
            "import os\n"
            "try:\n open('/probe', 'w')\nexcept OSError as e: print(os.getuid(), e.errno)\n"
        )
        if component == "whisperx-redis":
            # No Python in the Redis image: the shell's view of the same.
            out = pod_stack.kubectl("exec", "-n", SYSTEM, name, "--", "sh", "-c",
                                    "id -u; touch /probe || echo refused").stdout  # fmt: skip
            assert out.split() == [str(uid), "refused"], out
        else:
            assert pod_stack.exec_python(name, code, SYSTEM) == f"{uid} 30"  # EROFS


async def test_a_lost_node_ends_its_run_with_that_reason(
    pod_stack: PodStack, longer_wav: Path
) -> None:
    # Last in this module: it takes the node down and brings it back. The kubelet stops
    # and the runner's process dies, as when one machine of several goes dark. The node
    # turns NotReady and, past the pods' toleration, the taint eviction controller
    # deletes every pod on it (the stack's own too: their containers run on meanwhile, but their
    # Services lose their endpoints). No kubelet will end the runner's pod, so its Job
    # would wait for the node for ever: the operator ends the prediction instead.
    prediction = await create(pod_stack, longer_wav)
    await asyncio.to_thread(until_processing, pod_stack, prediction.id)
    (pod,) = pod_stack.prediction_pods(prediction.id)
    (runner,) = pod["status"]["containerStatuses"]
    node = pod_stack.node
    with contextlib.ExitStack() as down:
        # Another node stays up, as in any cluster of several (with all down, nothing is
        # evicted).
        down.enter_context(node.standing_peer())
        node.stop_kubelet()
        # Back at the end: the kubelet stops the deleted pods; their replacements start.
        down.callback(pod_stack.rollout)
        down.callback(node.start_kubelet, timeout=120)
        container = runner["containerID"].removeprefix("containerd://")
        node.ctr("tasks", "kill", "--signal", "SIGKILL", container)

        def lost() -> dict[str, Any] | None:
            found = status(pod_stack, prediction.id)
            return found if found.get("reason") == "NodeLost" else None

        ended = await asyncio.to_thread(eventually, "the prediction ended NodeLost", lost, 90)
        assert ended["phase"] == "failed"
    # What API callers see once the gateway is back.
    await asyncio.to_thread(prediction.wait)
    assert prediction.status == "failed"
    assert "stopped responding" in (prediction.error or ""), prediction.error
