"""The single writer of prediction status, independent of where status is kept.

The operator plugs in a sink that patches the Prediction's status subresource; local mode
plugs in one that keeps status in Redis only. Both share this code: the state machine,
report handling, the Redis record, and client webhooks.

Ordering keeps results safe: runner data (output, logs) is written to Redis before the
status that points at it, the authoritative status is saved before the Redis record
(re-derivable from it on resume), and the terminal webhook is queued once per prediction
(a marker in Redis) so a resume after a crash neither loses nor repeats it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from whisperx_api import lifecycle as lc
from whisperx_api.records import PredictionRecord, to_replicate
from whisperx_api.reports import (
    CompletedReport,
    LogsReport,
    OutputReport,
    ReportAuthError,
    StartReport,
    parse_report,
    prediction_token,
    verify,
)
from whisperx_api.store import Store
from whisperx_api.webhooks import Throttle, WebhookSender, wanted

log = logging.getLogger(__name__)


class StatusSink(Protocol):
    """Where the authoritative status lives."""

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None: ...

    async def save(self, record: PredictionRecord) -> None: ...


@dataclass
class ReportResult:
    http_status: int
    body: dict[str, Any]


class StatusWriter:
    def __init__(
        self,
        *,
        store: Store,
        sink: StatusSink,
        report_key: bytes,
        public_url: str,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.store = store
        self.sink = sink
        self.report_key = report_key
        self.public_url = public_url
        self.webhooks = webhooks
        self.throttle = Throttle()
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, namespace: str, prediction_id: str) -> asyncio.Lock:
        """Serializes every change to one prediction within this process."""
        return self._locks[(namespace, prediction_id)]

    def forget(self, namespace: str, prediction_id: str) -> None:
        self._locks.pop((namespace, prediction_id), None)
        self.throttle.forget(namespace, prediction_id)

    def report_token(self, record: PredictionRecord) -> str:
        return prediction_token(self.report_key, record.namespace, record.id, record.uid or "")

    # --- events ---

    async def publish(self, record: PredictionRecord) -> None:
        """Brings the Redis record in line with `record` and queues a due terminal webhook."""
        await self.store.put_record(record)
        if record.state.terminal:
            await self._webhook(record, "completed")

    async def apply(
        self, namespace: str, prediction_id: str, event: lc.Event
    ) -> PredictionRecord | None:
        async with self.lock(namespace, prediction_id):
            return await self._apply_locked(namespace, prediction_id, event)

    async def _apply_locked(
        self, namespace: str, prediction_id: str, event: lc.Event
    ) -> PredictionRecord | None:
        record = await self.sink.load(namespace, prediction_id)
        if record is None:
            return None
        transition = lc.apply(record.state, event)
        if not transition.changed:
            return record
        record = dataclasses.replace(record, state=transition.state)
        await self.sink.save(record)
        await self.store.put_record(record)
        if transition.webhook_event:
            await self._webhook(record, transition.webhook_event)
        if record.state.terminal:
            log.info(
                "prediction %s/%s %s (%s)",
                namespace, prediction_id, record.state.phase.value, record.state.reason,
            )  # fmt: skip
        return record

    async def _webhook(self, record: PredictionRecord, event: str) -> None:
        if not record.webhook or not wanted(event, record.webhook_events_filter):
            return
        if not self.throttle.allow(record.namespace, record.id, event):
            return
        view = await self.store.get_view(record.namespace, record.id)
        output = view.output if view else None
        logs = view.logs if view else ""
        # Compact, as JSON.stringify writes it: clients that re-serialize a parsed body
        # before checking the signature then usually match.
        body = json.dumps(
            to_replicate(record, output, logs, self.public_url), separators=(",", ":")
        )
        queued = await self.store.enqueue_webhook(
            url=record.webhook,
            body=body,
            event=event,
            namespace=record.namespace,
            prediction_id=record.id,
            once=event == "completed",
        )
        if queued and self.webhooks is not None:
            self.webhooks.wake()

    # --- runner reports ---

    async def handle_report(
        self, namespace: str, prediction_id: str, body: bytes, signature: str | None
    ) -> ReportResult:
        async with self.lock(namespace, prediction_id):
            record = await self.sink.load(namespace, prediction_id)
            if record is None:
                return ReportResult(404, {"detail": "no such prediction"})
            try:
                verify(self.report_token(record), body, signature)
            except ReportAuthError as exc:
                return ReportResult(401, {"detail": str(exc)})
            try:
                report = parse_report(body)
            except ValidationError as exc:
                return ReportResult(422, {"detail": f"invalid report: {exc.errors()[0]['msg']}"})
            if record.state.terminal:
                return ReportResult(200, {"applied": False, "reason": "prediction has ended"})
            order = await self.store.order_report(
                namespace, prediction_id, report.attempt, report.seq
            )
            if order == "superseded":
                # A pod the Job has replaced (say, cut off from the network and given up
                # for lost) must not write over its successor's work.
                return ReportResult(
                    409, {"applied": False, "reason": "a newer runner attempt has started"}
                )
            if order == "replay":
                return ReportResult(200, {"applied": False, "reason": "already applied"})
            await self._apply_report(record, report)
            return ReportResult(200, {"applied": True})

    async def _apply_report(
        self,
        record: PredictionRecord,
        report: StartReport | LogsReport | OutputReport | CompletedReport,
    ) -> None:
        ns, pid = record.namespace, record.id
        now = lc.now_utc()
        match report:
            case StartReport():
                await self._apply_locked(ns, pid, lc.Started(at=now))
            case LogsReport(logs=text):
                await self.store.append_logs(ns, pid, text)
                await self._webhook(record, "logs")
            case OutputReport(output=output):
                await self.store.put_output(ns, pid, output)
                await self._webhook(record, "output")
            case CompletedReport(status="canceled") as done if not record.cancel_requested:
                # A runner reports `canceled` when it gets SIGTERM, which also comes from a
                # preemption, an eviction or a node drain. Only a requested cancel ends the
                # prediction as canceled; otherwise the pod's fate decides (a retry that
                # does not count, or a failure with its reason).
                await self.store.append_logs(ns, pid, done.logs)
            case CompletedReport() as done:
                await self.store.append_logs(ns, pid, done.logs)
                if done.output is not None:
                    await self.store.put_output(ns, pid, done.output)
                if record.state.phase is lc.Phase.STARTING:
                    await self._apply_locked(ns, pid, lc.Started(at=now))
                metrics = done.metrics
                await self._apply_locked(
                    ns,
                    pid,
                    lc.Completed(
                        status=lc.Phase(done.status),
                        at=now,
                        error=done.error,
                        reason=done.reason,
                        predict_time=metrics.get("predict_time"),
                        audio_duration=metrics.get("audio_duration"),
                        detected_language=done.detected_language
                        or (done.output or {}).get("detected_language"),
                    ),
                )
