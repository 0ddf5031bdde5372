"""The prediction lifecycle as a pure state machine.

Every status writer (the operator for Prediction resources, local mode for predictions
kept in Redis) feeds events through `apply` and persists the resulting `PredictionState`.
Terminal phases absorb: nothing that arrives after the end (a late `start`, a second
`completed`, a Job failure after success) changes the outcome.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELED)


_TERMINAL_CONDITION = {
    Phase.SUCCEEDED: "Succeeded",
    Phase.FAILED: "Failed",
    Phase.CANCELED: "Canceled",
}


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    last_transition_time: datetime

    def to_dict(self) -> dict[str, str]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": format_time(self.last_transition_time) or "",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        return cls(
            type=data["type"],
            status=data["status"],
            reason=data.get("reason", ""),
            message=data.get("message", ""),
            last_transition_time=parse_time(data.get("lastTransitionTime")) or now_utc(),
        )


@dataclass(frozen=True)
class PredictionState:
    phase: Phase = Phase.STARTING
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    reason: str | None = None
    error: str | None = None
    detected_language: str | None = None
    audio_duration: float | None = None
    predict_time: float | None = None
    # Time the run spent suspended after it started (Kueue preemption): the run deadline
    # does not count it.
    suspended_seconds: float = 0.0
    conditions: tuple[Condition, ...] = field(default_factory=tuple)
    # The Job and pod the runner that took it runs as (a warm runner's Job serves many).
    job: str | None = None
    pod: str | None = None

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    @property
    def queued(self) -> bool:
        return self.holds("Queued")

    @property
    def waiting(self) -> bool:
        return self.holds("Waiting")

    def holds(self, type_: str) -> bool:
        """Whether condition `type_` is True."""
        return any(c.type == type_ and c.status == "True" for c in self.conditions)

    @property
    def total_time(self) -> float | None:
        if self.created_at is None or self.completed_at is None:
            return None
        return max(0.0, (self.completed_at - self.created_at).total_seconds())

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def with_condition(
        self, type_: str, status: bool, reason: str, message: str, at: datetime
    ) -> PredictionState:
        """Sets a condition, keeping lastTransitionTime when its status does not change."""
        value = "True" if status else "False"
        existing = self.condition(type_)
        when = existing.last_transition_time if existing and existing.status == value else at
        updated = Condition(type_, value, reason, message, when)
        others = tuple(c for c in self.conditions if c.type != type_)
        return dataclasses.replace(self, conditions=(*others, updated))

    # --- status subresource (camelCase, Kubernetes conventions) ---

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "phase": self.phase.value,
            "conditions": [c.to_dict() for c in self.conditions],
            "createdAt": format_time(self.created_at),
            "startedAt": format_time(self.started_at),
            "completedAt": format_time(self.completed_at),
            "reason": self.reason,
            "error": self.error,
            "detectedLanguage": self.detected_language,
            "audioDuration": self.audio_duration,
            "jobName": self.job,
            "podName": self.pod,
        }
        metrics = {"predictTime": self.predict_time, "totalTime": self.total_time}
        if any(v is not None for v in metrics.values()):
            status["metrics"] = {k: v for k, v in metrics.items() if v is not None}
        if self.suspended_seconds:
            status["suspendedSeconds"] = self.suspended_seconds
        return {k: v for k, v in status.items() if v is not None}

    @classmethod
    def from_status(cls, status: dict[str, Any] | None) -> PredictionState:
        status = status or {}
        metrics = status.get("metrics") or {}
        return cls(
            phase=Phase(status.get("phase", Phase.STARTING.value)),
            created_at=parse_time(status.get("createdAt")),
            started_at=parse_time(status.get("startedAt")),
            completed_at=parse_time(status.get("completedAt")),
            reason=status.get("reason"),
            error=status.get("error"),
            detected_language=status.get("detectedLanguage"),
            audio_duration=status.get("audioDuration"),
            predict_time=metrics.get("predictTime"),
            suspended_seconds=float(status.get("suspendedSeconds") or 0.0),
            conditions=tuple(Condition.from_dict(c) for c in status.get("conditions") or ()),
            job=status.get("jobName"),
            pod=status.get("podName"),
        )


# --- events ---


@dataclass(frozen=True)
class Created:
    at: datetime


@dataclass(frozen=True)
class Queued:
    """Waiting for capacity: Kueue suspended the Job, or its pod is not yet scheduled."""

    reason: str
    message: str
    at: datetime


@dataclass(frozen=True)
class Waiting:
    """The runner's container waits on what a kubelet retries: an image pull (a
    registry's rate limit), a Secret or ConfigMap that does not exist yet."""

    reason: str
    message: str
    at: datetime


@dataclass(frozen=True)
class Admitted:
    """The Job runs (admitted, resumed), its pod got a node and its container started, or
    a warm runner took the prediction; `pod` (and `job`) name where it runs, when known."""

    at: datetime
    job: str | None = None
    pod: str | None = None


@dataclass(frozen=True)
class Started:
    at: datetime


@dataclass(frozen=True)
class Completed:
    """The runner's terminal report."""

    status: Phase
    at: datetime
    error: str | None = None
    reason: str | None = None
    predict_time: float | None = None
    audio_duration: float | None = None
    detected_language: str | None = None


@dataclass(frozen=True)
class Failed:
    """Ended from outside the runner: a dead pod, a deadline, an invalid spec."""

    reason: str
    message: str
    at: datetime


@dataclass(frozen=True)
class CancelRequested:
    at: datetime
    message: str = "canceled by request"


Event = Created | Queued | Waiting | Admitted | Started | Completed | Failed | CancelRequested


@dataclass(frozen=True)
class Transition:
    state: PredictionState
    changed: bool
    # The client webhook event this transition emits ("start" or "completed"), if any.
    webhook_event: str | None = None


def _finish(
    state: PredictionState,
    phase: Phase,
    at: datetime,
    reason: str,
    message: str,
    **fields: Any,
) -> PredictionState:
    ended = dataclasses.replace(
        state,
        phase=phase,
        completed_at=at,
        reason=reason,
        error=message if phase is Phase.FAILED else state.error,
        **fields,
    )
    ended = ended.with_condition("Running", False, reason, message, at)
    for passing in ("Queued", "Waiting"):
        if ended.condition(passing) is not None:
            ended = ended.with_condition(passing, False, reason, "", at)
    return ended.with_condition(_TERMINAL_CONDITION[phase], True, reason, message, at)


def apply(state: PredictionState, event: Event) -> Transition:
    """The state after `event`; unchanged (changed=False) when the event has no effect."""
    if state.terminal:
        return Transition(state, changed=False)

    match event:
        case Created(at=at):
            if state.created_at is not None:
                return Transition(state, changed=False)
            return Transition(dataclasses.replace(state, created_at=at), changed=True)

        case Queued(reason=reason, message=message, at=at):
            new = state.with_condition("Queued", True, reason, message, at)
            if state.phase is Phase.PROCESSING:
                # Preempted (Kueue suspended the Job): queued again until re-admitted.
                new = new.with_condition("Running", False, reason, message, at)
            return Transition(new, changed=new != state)

        case Waiting(reason=reason, message=message, at=at):
            if state.phase is not Phase.STARTING:
                return Transition(state, changed=False)
            new = state.with_condition("Waiting", True, reason, message, at)
            if new.queued:
                new = new.with_condition("Queued", False, "Scheduled", "", at)
            return Transition(new, changed=new != state)

        case Admitted(at=at, job=job, pod=pod):
            new = state
            if pod is not None:
                new = dataclasses.replace(new, job=job or new.job, pod=pod)
            if state.queued:
                new = new.with_condition("Queued", False, "Admitted", "", at)
                queued = state.condition("Queued")
                if state.phase is Phase.PROCESSING and queued is not None:
                    paused = max(0.0, (at - queued.last_transition_time).total_seconds())
                    new = dataclasses.replace(
                        new, suspended_seconds=state.suspended_seconds + paused
                    )
                    new = new.with_condition("Running", True, "Resumed", "transcribing", at)
            if state.waiting:
                new = new.with_condition("Waiting", False, "Admitted", "", at)
            return Transition(new, changed=new != state)

        case Started(at=at):
            if state.phase is not Phase.STARTING:
                return Transition(state, changed=False)
            new = dataclasses.replace(state, phase=Phase.PROCESSING, started_at=at)
            for passing in ("Queued", "Waiting"):
                if new.condition(passing) is not None:
                    new = new.with_condition(passing, False, "Started", "", at)
            new = new.with_condition("Running", True, "RunnerStarted", "transcribing", at)
            return Transition(new, changed=True, webhook_event="start")

        case Completed(status=status, at=at) as done:
            if not status.terminal:
                raise ValueError(f"Completed needs a terminal status, not {status}")
            default_reason = {
                Phase.SUCCEEDED: "Succeeded",
                Phase.FAILED: "RunnerFailed",
                Phase.CANCELED: "Canceled",
            }[status]
            message = done.error or ("transcription finished" if status is Phase.SUCCEEDED else "")
            started = state.started_at or at
            new = _finish(
                dataclasses.replace(state, started_at=started),
                status,
                at,
                done.reason or default_reason,
                message,
                predict_time=done.predict_time,
                audio_duration=done.audio_duration,
                detected_language=done.detected_language,
            )
            return Transition(new, changed=True, webhook_event="completed")

        case Failed(reason=reason, message=message, at=at):
            new = _finish(state, Phase.FAILED, at, reason, message)
            return Transition(new, changed=True, webhook_event="completed")

        case CancelRequested(at=at, message=message):
            new = _finish(state, Phase.CANCELED, at, "Canceled", message)
            return Transition(new, changed=True, webhook_event="completed")

    raise TypeError(f"unknown event {event!r}")
