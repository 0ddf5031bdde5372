"""The deadline scheduler: which deadline applies, and that it fires once, on time."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

from whisperx_api import lifecycle as lc
from whisperx_operator.deadlines import (
    RESUME_GRACE_SECONDS,
    Deadlines,
    Kind,
    Limits,
    kept_after_ttl,
    next_deadline,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Limits(start=60, run=600, ttl=3600, waiting=30)


def test_the_state_decides_the_deadline() -> None:
    starting = lc.PredictionState(created_at=T0)
    assert next_deadline(starting, LIMITS) == ("start", (T0 + timedelta(seconds=60)).timestamp())
    running = dataclasses.replace(
        starting, phase=lc.Phase.PROCESSING, started_at=T0 + timedelta(seconds=5)
    )
    assert next_deadline(running, LIMITS) == ("run", (T0 + timedelta(seconds=605)).timestamp())
    done = dataclasses.replace(
        running, phase=lc.Phase.FAILED, completed_at=T0 + timedelta(seconds=9)
    )
    assert next_deadline(done, LIMITS) == ("ttl", (T0 + timedelta(seconds=3609)).timestamp())
    assert next_deadline(done, dataclasses.replace(LIMITS, ttl=None)) is None


def test_a_wait_on_kubelet_retries_ends_at_its_grace_within_the_start_deadline() -> None:
    starting = lc.PredictionState(created_at=T0)
    waiting = lc.apply(
        starting, lc.Waiting("ImagePullBackOff", "", T0 + timedelta(seconds=5))
    ).state
    assert next_deadline(waiting, LIMITS) == ("waiting", (T0 + timedelta(seconds=35)).timestamp())
    late = lc.apply(starting, lc.Waiting("ImagePullBackOff", "", T0 + timedelta(seconds=50))).state
    assert next_deadline(late, LIMITS) == ("start", (T0 + timedelta(seconds=60)).timestamp())


def test_the_run_deadline_pauses_while_the_job_is_suspended() -> None:
    running = lc.apply(
        lc.PredictionState(created_at=T0), lc.Started(at=T0 + timedelta(seconds=5))
    ).state
    preempted = lc.apply(running, lc.Queued("Suspended", "", T0 + timedelta(seconds=100))).state
    # Suspended: no run deadline; the start deadline bounds the wait to be admitted again.
    assert next_deadline(preempted, LIMITS) == ("start", (T0 + timedelta(seconds=160)).timestamp())
    resumed = lc.apply(preempted, lc.Admitted(T0 + timedelta(seconds=130))).state
    assert next_deadline(resumed, LIMITS) == ("run", (T0 + timedelta(seconds=635)).timestamp())


def test_limits_from_spec_override_the_defaults() -> None:
    spec = {"startDeadlineSeconds": 5, "ttlSecondsAfterFinished": 0}
    assert Limits.from_spec(spec, start=60, run=600, ttl=None, waiting=9) == Limits(5, 600, 0, 9)
    assert Limits.from_spec({}, start=60, run=600, ttl=None, waiting=9) == Limits(60, 600, None, 9)


async def test_fires_the_current_deadline_once_and_waits_while_standby() -> None:
    fired: list[tuple[Kind, str]] = []
    active = asyncio.Event()
    any_fired = asyncio.Event()

    async def fire(kind: Kind, namespace: str, name: str) -> None:
        fired.append((kind, name))
        any_fired.set()

    deadlines = Deadlines(fire, active=active.is_set)
    task = asyncio.create_task(deadlines.run())
    now = lc.now_utc()
    limits = Limits(start=1, run=1, ttl=0, waiting=1)
    try:
        # a: starting, its start deadline 0.2 s away; b: superseded by a later state.
        deadlines.track(
            "ns", "a", limits, lc.PredictionState(created_at=now - timedelta(seconds=0.8))
        )
        deadlines.track("ns", "b", limits, lc.PredictionState(created_at=now))
        started = lc.PredictionState(
            phase=lc.Phase.PROCESSING, created_at=now, started_at=now + timedelta(seconds=30)
        )
        deadlines.update("ns", "b", started)
        await asyncio.sleep(0.5)
        assert fired == []  # standby: nothing fires
        active.set()
        async with asyncio.timeout(3):
            await any_fired.wait()
        await asyncio.sleep(0.3)
        assert fired == [("start", "a")]
        assert deadlines.planned("ns", "b") is not None and deadlines.planned("ns", "a") is None
        deadlines.forget("ns", "b")
        assert len(deadlines) == 0
    finally:
        task.cancel()


async def test_a_failed_action_is_retried() -> None:
    attempted = asyncio.Event()

    async def fire(kind: Kind, namespace: str, name: str) -> None:
        attempted.set()
        raise RuntimeError("API down")

    deadlines = Deadlines(fire)
    task = asyncio.create_task(deadlines.run())
    try:
        done = lc.PredictionState(phase=lc.Phase.SUCCEEDED, completed_at=lc.now_utc())
        deadlines.track("ns", "a", Limits(1, 1, 0, 1), done)
        async with asyncio.timeout(3):
            await attempted.wait()
        await asyncio.sleep(0.05)
        assert deadlines.planned("ns", "a") is not None  # rescheduled
    finally:
        task.cancel()


def test_predictions_declared_elsewhere_are_kept_after_their_ttl() -> None:
    assert kept_after_ttl({}) is None
    assert kept_after_ttl({"annotations": {"whisperx.io/keep": "false"}}) is None
    assert "keep" in str(kept_after_ttl({"annotations": {"whisperx.io/keep": "True"}}))
    tracked = {"annotations": {"argocd.argoproj.io/tracking-id": "app:whisperx.io/Prediction:ns/p"}}
    assert "Argo CD" in str(kept_after_ttl(tracked))
    assert "instance" in str(kept_after_ttl({"labels": {"app.kubernetes.io/instance": "app"}}))


def test_a_run_deadline_past_at_resume_waits_for_a_finished_runners_report() -> None:
    async def fire(kind: Kind, namespace: str, name: str) -> None:
        raise AssertionError("not run here")

    now = 1_000_000.0
    deadlines = Deadlines(fire, clock=lambda: now)
    started = datetime.fromtimestamp(now - 700, UTC)  # the run deadline (600 s) is past
    running = lc.PredictionState(phase=lc.Phase.PROCESSING, created_at=started, started_at=started)
    deadlines.track("ns", "a", LIMITS, running)
    assert deadlines.planned("ns", "a") == ("run", now + RESUME_GRACE_SECONDS)
    # Only at resume: a save while the operator runs plans the deadline as it is.
    deadlines.update("ns", "a", running)
    assert deadlines.planned("ns", "a") == ("run", now - 100)
