"""Faults on the cluster path: nothing accepted is lost, and every terminal webhook is
delivered exactly once (Standard Webhooks: one message id, kept across retries).

Which runner: the operator crash and the runner kill use the real runner (tiny.en), whose
own report retries and process are what is under test there; its run (~15 s) leaves a
wide window to strike in. The Redis restart and the gateway kill use the stand-in
(tests/operator/fake_runner.py, `/succeed?seconds=N`), because their assertions need the
fault to land inside a run of known length, and the runner is not what they exercise.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import RedisServer, free_port
from tests.flow.conftest import (
    NS,
    AudioSource,
    Cluster,
    HookReceiver,
    assert_fox_transcript,
    call,
    kill_process_group,
    pending_deliveries,
    stored_record,
)
from tests.kube_fixtures import JOBS, PREDICTIONS, PodRun, wait_for, wait_for_phase
from whisperx_runner import report


async def running_pod(cluster: Cluster, prediction_id: str) -> PodRun:
    """The prediction's one pod, once its runner process has started."""

    def started() -> PodRun | None:
        runs = cluster.kubelet.runs(prediction_id)
        return runs[0] if runs and runs[0].process is not None else None

    run: PodRun = await wait_for(started, within=30)
    return run


def still_running(run: PodRun) -> bool:
    return run.process is not None and run.process.returncode is None


async def create(cluster: Cluster, audio: str, hooks: HookReceiver, **input_: Any) -> Any:
    return await call(
        cluster.client().predictions.create,
        version="whisperx",
        input={"audio_file": audio, **input_},
        webhook=hooks.url,
        webhook_events_filter=["completed"],
    )


@pytest.mark.whisperx
async def test_an_operator_killed_mid_prediction_loses_nothing(
    real_cluster: Cluster, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    kube, operator = real_cluster.kube, real_cluster.operator
    prediction = await create(real_cluster, fox_url.url, hooks, align_output=True)
    await wait_for_phase(kube, prediction.id, ["processing"], within=60)
    run = await running_pod(real_cluster, prediction.id)
    await operator.kill()
    assert still_running(run)  # the kill lands mid-prediction
    await asyncio.sleep(2)  # whatever the runner reports meanwhile fails; it retries
    await operator.restart(kube)

    obj = await wait_for_phase(kube, prediction.id, within=90)
    assert obj["status"]["phase"] == "succeeded", obj["status"]
    assert obj["status"]["detectedLanguage"] == "en"
    # Resuming did not start the work again.
    assert kube.creations[JOBS, NS, prediction.id] == 1
    assert len(real_cluster.kubelet.runs(prediction.id)) == 1
    await call(prediction.wait)
    assert prediction.status == "succeeded"
    assert_fox_transcript(prediction.output, fox_url.duration)
    assert "Transcribing" in prediction.logs
    await hooks.terminal_once(prediction.id, "succeeded")
    hooks.validate_all(await call(real_cluster.client().webhooks.default.secret))

    # A crash after the end: resuming re-publishes, and repeats no webhook.
    await operator.kill()
    await operator.restart(kube)
    await asyncio.sleep(1.5)
    await hooks.terminal_once(prediction.id, "succeeded", settle=0)
    again = await call(real_cluster.client().predictions.get, prediction.id)
    assert again.status == "succeeded" and again.output == prediction.output


@pytest.mark.whisperx
async def test_an_operator_down_while_the_runner_finishes_loses_nothing(
    real_cluster: Cluster, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    """The pieces together: the runner keeps its pod and retries, and the operator back
    takes the report. The outage (about 30 s) is shorter than the 120 s after which the
    runner used to give up, so this alone would pass with that limit: outlasting 120 s
    here would add two minutes to a test of minutes. The test after this one holds the
    result past any such limit, on a clock that runs ten minutes per reading."""
    kube, operator = real_cluster.kube, real_cluster.operator
    prediction = await create(real_cluster, fox_url.url, hooks, align_output=True)
    await wait_for_phase(kube, prediction.id, ["processing"], within=60)
    run = await running_pod(real_cluster, prediction.id)
    await operator.kill()
    # The runner finishes with nowhere to deliver its result: it keeps it, and retries.
    await wait_for(
        lambda: "report completed" in real_cluster.kubelet.logs(prediction.id), within=90
    )
    await asyncio.sleep(20)  # the operator stays away past the runner's slowest backoff
    assert still_running(run)
    await operator.restart(kube)

    obj = await wait_for_phase(kube, prediction.id, within=60)
    assert obj["status"]["phase"] == "succeeded", obj["status"]
    await call(prediction.wait)
    assert_fox_transcript(prediction.output, fox_url.duration)
    assert len(real_cluster.kubelet.runs(prediction.id)) == 1
    await hooks.terminal_once(prediction.id, "succeeded")


@pytest.fixture
async def flaky_report_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A report endpoint that answers 503 to the first three posts (the operator away)."""
    answered: list[int] = []

    async def endpoint(request: web.Request) -> web.Response:
        await request.read()
        answered.append(503 if len(answered) < 3 else 200)
        return web.json_response({}, status=answered[-1])

    app = web.Application()
    app.router.add_post("/reports/ns/p", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/reports/ns/p", answered
    await runner.cleanup()


async def test_the_runner_holds_its_result_however_long_the_operator_is_away(
    flaky_report_server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, answered = flaky_report_server
    # The report client's clock runs ten minutes per reading: the outage lasts far beyond
    # the 120 s after which it used to give up (and the Job completed without a result).
    ticks = itertools.count()
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + 600 * next(ticks))
    monkeypatch.setattr(report, "time", clock)
    reporter = report.HttpReporter(url, "token")
    try:
        delivered = await reporter.completed("succeeded", output={"segments": []})
    finally:
        await reporter.aclose()
    assert delivered and answered == [503, 503, 503, 200]


async def test_redis_restarts_mid_prediction_and_after_it_lose_nothing(
    stand_in_cluster: Cluster, redis_server: RedisServer, hooks: HookReceiver
) -> None:
    cluster, kube = stand_in_cluster, stand_in_cluster.kube
    hooks.refusing = True  # the terminal webhook stays pending in the outbox
    prediction = await create(cluster, "https://fake.test/succeed?seconds=4", hooks)
    await wait_for_phase(kube, prediction.id, ["processing"], within=20)
    run = await running_pod(cluster, prediction.id)
    await asyncio.to_thread(redis_server.restart)  # AOF on
    assert still_running(run)  # mid-prediction: its end is still to be reported

    obj = await wait_for_phase(kube, prediction.id, within=30)
    assert obj["status"]["phase"] == "succeeded", obj["status"]

    async def retry_scheduled() -> bool:
        pending = await pending_deliveries(cluster.redis_url, prediction.id)
        return len(pending) == 1 and pending[0]["attempts"] == "1"

    # The first attempt was refused and its retry written back (not merely leased).
    await wait_for(retry_scheduled, within=20)
    await asyncio.to_thread(redis_server.restart)
    (pending,) = await pending_deliveries(cluster.redis_url, prediction.id)
    assert pending["event"] == "completed" and pending["attempts"] == "1"

    record = await stored_record(cluster.redis_url, prediction.id)
    assert record is not None and record.state.phase.value == "succeeded"
    client = cluster.client()
    got = await call(client.predictions.get, prediction.id)
    assert got.status == "succeeded"
    assert got.output["segments"][0]["text"] == " the quick brown fox"
    assert "loading model" in got.logs and "transcribed" in got.logs
    assert got.metrics["predict_time"] == 0.25
    page = await call(client.predictions.list)
    assert [(p.id, p.status) for p in page.results] == [(prediction.id, "succeeded")]

    hooks.refusing = False
    delivery = await hooks.terminal_once(prediction.id, "succeeded")
    assert delivery.webhook_id == pending["key"].removeprefix("wx:wh:d:")
    assert delivery.data["output"] == got.output
    assert await pending_deliveries(cluster.redis_url, prediction.id) == []
    hooks.validate_all(await call(client.webhooks.default.secret))


@pytest.mark.whisperx
async def test_a_killed_runner_fails_the_prediction_with_the_reason(
    real_cluster: Cluster, fox_url: AudioSource, hooks: HookReceiver
) -> None:
    kube = real_cluster.kube
    prediction = await create(real_cluster, fox_url.url, hooks)
    await wait_for_phase(kube, prediction.id, ["processing"], within=60)
    run = await running_pod(real_cluster, prediction.id)
    assert run.process is not None
    kill_process_group(run.process.pid)

    obj = await wait_for_phase(kube, prediction.id, within=30)
    status = obj["status"]
    assert status["phase"] == "failed", status
    assert status["reason"] == "RunnerCrashed"
    assert status["error"].startswith("the runner exited with code 137"), status["error"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RunnerCrashed"
    # A crash counts against backoffLimit (0 by default): no second pod.
    assert len(real_cluster.kubelet.runs(prediction.id)) == 1

    got = await call(real_cluster.client().predictions.get, prediction.id)
    assert got.status == "failed" and got.error == status["error"]
    delivery = await hooks.terminal_once(prediction.id, "failed")
    assert delivery.data["error"] == status["error"]
    hooks.validate_all(await call(real_cluster.client().webhooks.default.secret))


async def test_a_gateway_killed_during_prefer_wait(
    stand_in_cluster: Cluster, hooks: HookReceiver
) -> None:
    cluster, kube = stand_in_cluster, stand_in_cluster.kube
    client = cluster.client()
    held = asyncio.create_task(
        call(
            client.run,
            "whisperx/whisperx",
            input={"audio_file": "https://fake.test/succeed?seconds=4"},
            webhook=hooks.url,
            webhook_events_filter=["completed"],
        )
    )

    async def held_open() -> bool:
        return await cluster.gateway.waiting_requests() == 1

    await wait_for(held_open, within=20)
    (obj,) = kube.list(PREDICTIONS, NS)  # the 201 never came: the id is only here
    prediction_id = obj["metadata"]["name"]
    await cluster.gateway.kill()
    with pytest.raises(httpx.TransportError):
        await held
    assert kube.get(PREDICTIONS, NS, prediction_id) is not None

    # The operator does not need the gateway: the prediction ends as it would have.
    obj = await wait_for_phase(kube, prediction_id, within=30)
    assert obj["status"]["phase"] == "succeeded"
    await cluster.gateway.start()  # a new gateway process, same address
    got = await call(client.predictions.get, prediction_id)
    assert got.status == "succeeded"
    assert got.output["segments"][0]["text"] == " the quick brown fox"
    page = await call(client.predictions.list)
    assert [(p.id, p.status, p.output) for p in page.results] == [
        (prediction_id, "succeeded", got.output)
    ]
    await hooks.terminal_once(prediction_id, "succeeded")
    hooks.validate_all(await call(client.webhooks.default.secret))


async def test_a_gateway_stopped_during_prefer_wait_answers_and_the_next_one_serves(
    stand_in_cluster: Cluster,
) -> None:
    """A rollout: SIGTERM to a gateway holding `Prefer: wait` answers the held request
    at once with `starting` (what a wait that runs out answers), so the client polls on,
    through the next gateway, instead of losing its connection at the kill."""
    cluster = stand_in_cluster
    client = cluster.client()
    held = asyncio.create_task(
        call(
            client.predictions.create,
            version="whisperx",
            input={"audio_file": "https://fake.test/succeed?seconds=8"},
            wait=True,
        )
    )

    async def held_open() -> bool:
        return await cluster.gateway.waiting_requests() == 1

    await wait_for(held_open, within=20)
    started = time.monotonic()
    await cluster.gateway.stop()  # SIGTERM; SIGKILL after 15 s
    stopped_in = time.monotonic() - started
    assert stopped_in < 5, f"the gateway took {stopped_in:.1f} s to stop"
    prediction = await held
    assert prediction.status == "starting"

    await cluster.gateway.start()
    await call(prediction.wait)
    assert prediction.status == "succeeded"
    assert prediction.output["segments"][0]["text"] == " the quick brown fox"
