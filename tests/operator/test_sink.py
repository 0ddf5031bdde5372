"""The status patch and the Events a status change posts (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from whisperx_api import lifecycle as lc
from whisperx_api.kube import KubeClient
from whisperx_api.records import PredictionRecord
from whisperx_operator.events import transition_events
from whisperx_operator.sink import KubeStatusSink, status_patch

AT = lc.now_utc()


def test_status_patch_carries_generation_job_and_output_reference() -> None:
    state = lc.apply(lc.PredictionState(created_at=AT), lc.Started(at=AT)).state
    done = lc.apply(state, lc.Completed(status=lc.Phase.SUCCEEDED, at=AT, audio_duration=2.0)).state
    record = PredictionRecord(id="p1", namespace="ns", input={}, state=done)
    status = status_patch(record, 3)["status"]
    assert status["phase"] == "succeeded" and status["observedGeneration"] == 3
    assert status["jobName"] == "p1" and status["audioDuration"] == 2.0
    assert status["output"] == {"store": "redis", "key": "wx:p:ns:p1:out"}
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    running = status_patch(dataclasses.replace(record, state=state), None)["status"]
    assert "output" not in running and "observedGeneration" not in running


def test_events_for_transitions_only() -> None:
    start = lc.PredictionState(created_at=AT)
    queued = lc.apply(start, lc.Queued("Unschedulable", "0/3 nodes", AT)).state
    assert transition_events(start, queued) == [("Normal", "Queued", "Unschedulable: 0/3 nodes")]
    assert transition_events(queued, queued) == []
    running = lc.apply(queued, lc.Started(at=AT)).state
    assert [e[1] for e in transition_events(queued, running)] == ["Started"]
    failed = lc.apply(running, lc.Failed("OOMKilled", "out of memory", AT)).state
    assert transition_events(running, failed) == [("Warning", "OOMKilled", "out of memory")]
    canceled = lc.apply(start, lc.CancelRequested(at=AT)).state
    assert [e[1] for e in transition_events(None, canceled)] == ["Canceled"]
    waiting = lc.apply(start, lc.Waiting("ImagePullBackOff", "cannot pull image x", AT)).state
    assert transition_events(start, waiting) == [
        ("Warning", "ImagePullBackOff", "cannot pull image x")
    ]
    again = lc.apply(waiting, lc.Waiting("ErrImagePull", "cannot pull image x", AT)).state
    assert transition_events(waiting, again) == []


class CountingKube:
    """The two calls the sink makes, on one stored Prediction."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.patches = 0

    async def get(self, path: str) -> dict[str, Any]:
        return self.obj

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches += 1
        self.obj = {**self.obj, "status": patch["status"]}
        return self.obj


async def test_a_save_that_changes_nothing_is_not_sent() -> None:
    meta = {"name": "p1", "namespace": "ns", "uid": "u1", "generation": 1}
    kube = CountingKube({"metadata": meta, "spec": {"input": {}}})
    sink = KubeStatusSink(cast(KubeClient, kube))
    new = await sink.load("ns", "p1")
    assert new is not None
    await sink.save(new)  # no status yet: written
    assert kube.patches == 1
    again = await sink.load("ns", "p1")
    assert again is not None
    await sink.save(again)  # as loaded, and the status holds it already
    assert kube.patches == 1
    queued = lc.apply(again.state, lc.Queued("Suspended", "waiting", AT)).state
    await sink.save(dataclasses.replace(again, state=queued))
    assert kube.patches == 2


async def test_a_prediction_for_a_warm_runner_names_only_the_runner_job_that_takes_it() -> None:
    meta = {"name": "p1", "namespace": "ns", "uid": "u1", "generation": 1}
    kube = CountingKube({"metadata": meta, "spec": {"input": {}, "hardware": "warm"}})
    sink = KubeStatusSink(cast(KubeClient, kube), own_job=lambda hardware: hardware != "warm")
    record = await sink.load("ns", "p1")
    assert record is not None
    queued = lc.apply(record.state, lc.Queued("WaitingForRunner", "waiting", AT)).state
    await sink.save(dataclasses.replace(record, state=queued))
    assert "jobName" not in kube.obj["status"]
    taken = lc.apply(queued, lc.Admitted(AT, job="whisperx-warm-abc123", pod="pod-1")).state
    await sink.save(dataclasses.replace(record, state=taken))
    assert kube.obj["status"]["jobName"] == "whisperx-warm-abc123"
