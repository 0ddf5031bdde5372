"""The prediction record (the summary kept in Redis) and its Replicate representation.

The record is what gateways read on the hot path: one Redis read answers
`GET /v1/predictions/{id}`. Its `status` is the Prediction's status subresource, so the
resource and the record cannot disagree in shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from whisperx_api.crd import CANCEL_ANNOTATION, CREATED_AT_ANNOTATION
from whisperx_api.lifecycle import PredictionState, format_time, parse_time
from whisperx_api.schema import WEBHOOK_EVENTS, public_input

DEFAULT_MODEL = "whisperx/whisperx"


@dataclass
class PredictionRecord:
    id: str
    namespace: str
    input: dict[str, Any]
    state: PredictionState
    model: str = DEFAULT_MODEL
    version: str | None = None
    hardware: str = "whisperx"
    webhook: str | None = None
    webhook_events_filter: tuple[str, ...] = WEBHOOK_EVENTS
    source: str = "api"
    uid: str | None = None
    cancel_requested: bool = False
    data_removed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "uid": self.uid,
            "input": public_input(self.input),
            "status": self.state.to_status(),
            "model": self.model,
            "version": self.version,
            "hardware": self.hardware,
            "webhook": self.webhook,
            "webhook_events_filter": list(self.webhook_events_filter),
            "source": self.source,
            "cancel_requested": self.cancel_requested,
            "data_removed": self.data_removed,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictionRecord:
        return cls(
            id=data["id"],
            namespace=data["namespace"],
            uid=data.get("uid"),
            input=data.get("input") or {},
            state=PredictionState.from_status(data.get("status")),
            model=data.get("model") or DEFAULT_MODEL,
            version=data.get("version"),
            hardware=data.get("hardware") or "whisperx",
            webhook=data.get("webhook"),
            webhook_events_filter=tuple(data.get("webhook_events_filter") or WEBHOOK_EVENTS),
            source=data.get("source") or "api",
            cancel_requested=bool(data.get("cancel_requested")),
            data_removed=bool(data.get("data_removed")),
            extra=data.get("extra") or {},
        )

    @classmethod
    def from_resource(cls, obj: dict[str, Any]) -> PredictionRecord:
        """The record of a Prediction custom resource."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        annotations = meta.get("annotations") or {}
        state = PredictionState.from_status(obj.get("status"))
        if state.created_at is None:
            state = dataclasses.replace(state, created_at=creation_time(meta))
        return cls(
            id=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid"),
            input=spec.get("input") or {},
            state=state,
            model=spec.get("model") or DEFAULT_MODEL,
            version=spec.get("version"),
            hardware=spec.get("hardware") or "whisperx",
            webhook=spec.get("webhook"),
            webhook_events_filter=tuple(spec.get("webhookEventsFilter") or WEBHOOK_EVENTS),
            source=(meta.get("labels") or {}).get("whisperx.io/source", "kubectl"),
            cancel_requested=bool(spec.get("cancel"))
            or annotations.get(CANCEL_ANNOTATION, "").lower() == "true",
        )


def creation_time(meta: dict[str, Any]) -> datetime | None:
    """creationTimestamp, refined by the gateway's annotation when the two agree.

    The API server stamps whole seconds; the annotation is trusted only within the second
    the server saw, so a hand-written one cannot move a prediction in time.
    """
    server = parse_time(meta.get("creationTimestamp"))
    try:
        precise = parse_time((meta.get("annotations") or {}).get(CREATED_AT_ANNOTATION))
    except ValueError:
        precise = None
    if server is None or precise is None:
        return server
    if server - timedelta(seconds=1) < precise < server + timedelta(seconds=1):
        return precise
    return server


def to_replicate(
    record: PredictionRecord,
    output: Any,
    logs: str | None,
    base_url: str,
) -> dict[str, Any]:
    """Replicate's prediction object (the body of GET /v1/predictions/{id})."""
    state = record.state
    base = base_url.rstrip("/")
    metrics: dict[str, float] = {}
    if state.predict_time is not None:
        metrics["predict_time"] = state.predict_time
    if state.total_time is not None:
        metrics["total_time"] = state.total_time
    if state.audio_duration is not None:
        metrics["audio_duration"] = state.audio_duration
    get_url = f"{base}/v1/predictions/{record.id}"
    return {
        "id": record.id,
        "model": record.model,
        "version": record.version or record.hardware,
        "input": public_input(record.input),
        "output": None if record.data_removed else output,
        "logs": logs or "",
        "error": state.error,
        "status": state.phase.value,
        "created_at": format_time(state.created_at),
        "started_at": format_time(state.started_at),
        "completed_at": format_time(state.completed_at),
        "urls": {
            "get": get_url,
            "cancel": f"{get_url}/cancel",
            "web": get_url,
        },
        "metrics": metrics,
        "data_removed": record.data_removed,
        "source": record.source if record.source in ("api", "web") else "api",
    }
