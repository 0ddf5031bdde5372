"""The whole cluster path with the real runner: the official client, the gateway, a
Prediction in the API server, the real operator, a Job whose own command and environment
run `whisperx-runner run` (tiny.en on CPU), status, Redis, and a signed webhook.

Word timings come from alignment (`align_output`), which runs offline with the runner
tests' random-weight English aligner: the words are the real model's, their timings are
checked for consistency (ordered, inside the audio), not for accuracy.
"""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest

from tests.flow.conftest import (
    NS,
    REAL_RUNNER,
    AudioSource,
    Cluster,
    HookReceiver,
    assert_fox_transcript,
    call,
)
from tests.kube_fixtures import JOBS, PREDICTIONS, wait_for, wait_for_phase

pytestmark = pytest.mark.whisperx


async def test_speech_through_the_cluster_path(
    real_cluster: Cluster, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    kube, client = real_cluster.kube, real_cluster.client()
    prediction = await call(
        client.models.predictions.create,
        model="whisperx/whisperx",
        input={"audio_file": fox_url.url, "align_output": True},
        webhook=hooks.url,
    )
    assert prediction.status == "starting"
    await call(prediction.wait)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs)
    assert_fox_transcript(prediction.output, fox_url.duration)
    assert prediction.metrics["audio_duration"] == pytest.approx(fox_url.duration, abs=0.05)
    assert "Transcribing" in prediction.logs and "Aligning" in prediction.logs

    # The Job ran the real runner from its own command and the kind overlay's CPU profile.
    job = kube.get(JOBS, NS, prediction.id)
    assert job is not None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == REAL_RUNNER
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WHISPERX_MODEL"] == "tiny.en" and env["WHISPERX_DEVICE"] == "cpu"
    (run,) = real_cluster.kubelet.runs(prediction.id)
    # It reports its end, then exits: 0, one pod, no retry.
    await wait_for(lambda: run.exit_code is not None, within=30)
    assert run.exit_code == 0

    # What kubectl shows: a small status, the transcript left in Redis.
    obj = await wait_for_phase(kube, prediction.id, namespace=NS)
    status = obj["status"]
    assert status["phase"] == "succeeded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Succeeded"]["lastTransitionTime"]
    assert status["detectedLanguage"] == "en"
    assert status["audioDuration"] == pytest.approx(fox_url.duration, abs=0.05)
    assert 0 < status["metrics"]["predictTime"] <= status["metrics"]["totalTime"]
    assert status["output"] == {"store": "redis", "key": f"wx:p:{NS}:{prediction.id}:out"}
    assert "segments" not in json.dumps(obj)

    # Every webhook is signed as Replicate signs them (checked with the client's own
    # helper and the secret the gateway hands out); the terminal one comes once and
    # carries what GET answers.
    terminal = await hooks.terminal_once(prediction.id, "succeeded")
    # `start`, `logs` and `output` events (the default filter) all read `processing`.
    assert {d.data["status"] for d in hooks.accepted(prediction.id)} == {
        "processing",
        "succeeded",
    }
    hooks.validate_all(await call(client.webhooks.default.secret))
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            prediction.urls["get"], headers={"Authorization": f"Bearer {client._api_token}"}
        ) as resp,
    ):
        assert terminal.data == await resp.json()
    page = await call(client.predictions.list)
    assert [(p.id, p.status) for p in page.results] == [(prediction.id, "succeeded")]
    assert kube.get(PREDICTIONS, NS, prediction.id) is not None

    # Who wrote what, as `kubectl get --show-managed-fields` shows it.
    def managers(obj: dict[str, Any]) -> set[str]:
        return {entry["manager"] for entry in obj["metadata"]["managedFields"]}

    assert {"whisperx-gateway", "whisperx-operator"} <= managers(obj)
    assert "whisperx-operator" in managers(job)


async def test_an_uploaded_file_reaches_the_runner(
    real_cluster: Cluster, fox_audio: tuple[bytes, float]
) -> None:
    """The official client uploads a local file input to /v1/files and passes its signed
    link; the runner in its pod fetches it from the gateway."""
    client = real_cluster.client()
    data, duration = fox_audio
    prediction = await call(
        client.predictions.create,
        version="whisperx",
        input={"audio_file": io.BytesIO(data), "language": "en"},
    )
    assert prediction.input["audio_file"].startswith(real_cluster.gateway.url + "/v1/files/")
    await call(prediction.wait)
    assert prediction.status == "succeeded", (prediction.error, prediction.logs)
    assert prediction.metrics["audio_duration"] == pytest.approx(duration, abs=0.05)
    assert "fox" in json.dumps(prediction.output).lower()
