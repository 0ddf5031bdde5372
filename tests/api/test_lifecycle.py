from datetime import UTC, datetime, timedelta

import pytest

from whisperx_api import lifecycle as lc

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(*events: lc.Event) -> lc.PredictionState:
    state = lc.PredictionState()
    for event in events:
        state = lc.apply(state, event).state
    return state


def test_happy_path_sets_times_conditions_and_metrics() -> None:
    state = run(
        lc.Created(at=at(0)),
        lc.Started(at=at(2)),
        lc.Completed(
            status=lc.Phase.SUCCEEDED,
            at=at(10),
            predict_time=7.5,
            audio_duration=60.0,
            detected_language="en",
        ),
    )
    assert state.phase is lc.Phase.SUCCEEDED
    assert state.started_at == at(2) and state.completed_at == at(10)
    assert state.total_time == 10.0 and state.predict_time == 7.5
    assert {c.type: c.status for c in state.conditions} == {"Running": "False", "Succeeded": "True"}
    status = state.to_status()
    assert status["metrics"] == {"predictTime": 7.5, "totalTime": 10.0}
    assert lc.PredictionState.from_status(status) == state


def test_start_emits_start_webhook_and_completion_emits_completed() -> None:
    state = run(lc.Created(at=at(0)))
    started = lc.apply(state, lc.Started(at=at(1)))
    assert started.webhook_event == "start" and started.state.phase is lc.Phase.PROCESSING
    done = lc.apply(started.state, lc.Completed(status=lc.Phase.FAILED, at=at(2), error="boom"))
    assert done.webhook_event == "completed"
    assert done.state.error == "boom" and done.state.reason == "RunnerFailed"


@pytest.mark.parametrize(
    "late",
    [
        lc.Started(at=at(20)),
        lc.Completed(status=lc.Phase.FAILED, at=at(20), error="late"),
        lc.Failed(reason="OOMKilled", message="late", at=at(20)),
        lc.CancelRequested(at=at(20)),
        lc.Queued(reason="Suspended", message="", at=at(20)),
    ],
)
def test_terminal_phase_absorbs_every_later_event(late: lc.Event) -> None:
    done = run(lc.Created(at=at(0)), lc.Completed(status=lc.Phase.SUCCEEDED, at=at(5)))
    transition = lc.apply(done, late)
    assert not transition.changed and transition.state == done


def test_queued_then_admitted_keeps_starting_and_is_not_failed() -> None:
    queued = run(lc.Created(at=at(0)), lc.Queued("Suspended", "waiting for quota", at(1)))
    assert queued.phase is lc.Phase.STARTING and queued.queued
    assert not lc.apply(queued, lc.Queued("Suspended", "waiting for quota", at(2))).changed
    admitted = lc.apply(queued, lc.Admitted(at=at(3))).state
    assert not admitted.queued and admitted.phase is lc.Phase.STARTING


def test_condition_transition_time_kept_while_status_unchanged() -> None:
    state = run(lc.Created(at=at(0)), lc.Queued("Suspended", "a", at(1)))
    again = state.with_condition("Queued", True, "Suspended", "b", at(9))
    cond = again.condition("Queued")
    assert cond is not None and cond.last_transition_time == at(1) and cond.message == "b"


def test_cancel_before_start_and_failure_reason() -> None:
    canceled = run(lc.Created(at=at(0)), lc.CancelRequested(at=at(1)))
    assert canceled.phase is lc.Phase.CANCELED and canceled.error is None
    failed = run(lc.Created(at=at(0)), lc.Failed("OOMKilled", "runner ran out of memory", at(3)))
    assert failed.phase is lc.Phase.FAILED
    assert failed.reason == "OOMKilled" and failed.error == "runner ran out of memory"
    cond = failed.condition("Failed")
    assert cond is not None and cond.status == "True" and cond.reason == "OOMKilled"


def test_completed_requires_terminal_status() -> None:
    with pytest.raises(ValueError):
        lc.apply(lc.PredictionState(), lc.Completed(status=lc.Phase.PROCESSING, at=at(1)))


def test_creation_time_uses_the_gateway_annotation_only_within_the_servers_second() -> None:
    from whisperx_api.records import creation_time

    meta = {"creationTimestamp": "2026-01-01T00:00:05Z"}
    assert creation_time(meta) == at(5)
    precise = {**meta, "annotations": {"whisperx.io/created-at": "2026-01-01T00:00:04.750000Z"}}
    assert creation_time(precise) == at(4.75)
    forged = {**meta, "annotations": {"whisperx.io/created-at": "2025-01-01T00:00:00Z"}}
    assert creation_time(forged) == at(5)
    garbage = {**meta, "annotations": {"whisperx.io/created-at": "yesterday"}}
    assert creation_time(garbage) == at(5)


def test_waiting_on_a_kubelet_retry_is_a_condition_until_the_container_starts() -> None:
    queued = run(lc.Created(at=at(0)), lc.Queued("Unschedulable", "no node", at(1)))
    waiting = lc.apply(queued, lc.Waiting("ImagePullBackOff", "rate limited", at(2))).state
    assert waiting.phase is lc.Phase.STARTING and waiting.waiting and not waiting.queued
    # The kubelet's back-off alternates reasons; the condition keeps its start time.
    again = lc.apply(waiting, lc.Waiting("ErrImagePull", "rate limited", at(9))).state
    cond = again.condition("Waiting")
    assert cond is not None and cond.last_transition_time == at(2) and cond.reason == "ErrImagePull"
    admitted = lc.apply(again, lc.Admitted(at=at(10))).state
    assert not admitted.waiting and admitted.phase is lc.Phase.STARTING
    started = lc.apply(again, lc.Started(at=at(10))).state
    assert not started.waiting
    failed = lc.apply(again, lc.Failed("ImagePullFailed", "gave up", at(11))).state
    assert not failed.waiting
    running = run(lc.Created(at=at(0)), lc.Started(at=at(1)))
    assert not lc.apply(running, lc.Waiting("ImagePullBackOff", "", at(2))).changed


def test_a_suspended_run_is_queued_again_and_its_pause_is_counted() -> None:
    running = run(lc.Created(at=at(0)), lc.Started(at=at(1)))
    preempted = lc.apply(running, lc.Queued("Suspended", "preempted by Kueue", at(10))).state
    assert preempted.phase is lc.Phase.PROCESSING and preempted.queued
    assert not preempted.holds("Running")
    resumed = lc.apply(preempted, lc.Admitted(at=at(40))).state
    assert not resumed.queued and resumed.holds("Running") and resumed.suspended_seconds == 30
    again = lc.apply(
        lc.apply(resumed, lc.Queued("Suspended", "", at(50))).state, lc.Admitted(at=at(55))
    ).state
    assert again.suspended_seconds == 35
    assert lc.PredictionState.from_status(again.to_status()) == again
