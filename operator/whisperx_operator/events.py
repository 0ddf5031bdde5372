"""Kubernetes Events on Predictions, for `kubectl describe` (posted in the background).

The operator posts these itself rather than through kopf, because most transitions happen
outside kopf handlers (runner reports, deadlines). Posting never delays a status write and
a failed post is only logged: Events are a courtesy, status is the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from whisperx_api import lifecycle as lc
from whisperx_api.crd import GROUP, KIND, VERSION
from whisperx_api.kube import ApiError, KubeClient, resource_path
from whisperx_api.records import PredictionRecord

log = logging.getLogger(__name__)

COMPONENT = "whisperx-operator"
_MAX_MESSAGE = 1024


def involved_object(record: PredictionRecord) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": record.id,
        "namespace": record.namespace,
        "uid": record.uid,
    }


def transition_events(
    old: lc.PredictionState | None, new: lc.PredictionState
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a status change deserves."""
    events: list[tuple[str, str, str]] = []
    old_phase = old.phase if old is not None else None
    queued = new.condition("Queued")
    was_queued = old is not None and old.queued
    if queued is not None and new.queued and not was_queued:
        events.append(("Normal", "Queued", f"{queued.reason}: {queued.message}".strip(": ")))
    waiting = new.condition("Waiting")
    if waiting is not None and new.waiting and not (old is not None and old.waiting):
        # Retried by the kubelet for a while (WHISPERX_WAITING_GRACE_SECONDS): a warning.
        events.append(("Warning", waiting.reason, waiting.message))
    if new.pod is not None and new.pod != (old.pod if old is not None else None):
        events.append(("Normal", "RunnerAssigned", f"runs on pod {new.pod} of Job {new.job}"))
    if new.phase == old_phase:
        return events
    match new.phase:
        case lc.Phase.PROCESSING:
            events.append(("Normal", "Started", "the runner started transcribing"))
        case lc.Phase.SUCCEEDED:
            events.append(("Normal", "Succeeded", "transcription finished"))
        case lc.Phase.FAILED:
            events.append(("Warning", new.reason or "Failed", new.error or "prediction failed"))
        case lc.Phase.CANCELED:
            events.append(("Normal", "Canceled", "the prediction was canceled"))
    return events


class EventPoster:
    def __init__(self, kube: KubeClient, instance: str, *, max_pending: int = 10_000) -> None:
        self.kube = kube
        self.instance = instance
        self._queue: asyncio.Queue[tuple[dict[str, Any], str, str, str]] = asyncio.Queue(
            max_pending
        )

    def post(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait((involved, type_, reason, message))

    async def run(self) -> None:
        while True:
            involved, type_, reason, message = await self._queue.get()
            now = lc.format_time(lc.now_utc())
            namespace = involved["namespace"]
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
                "involvedObject": involved,
                "type": type_,
                "reason": reason,
                "message": message[:_MAX_MESSAGE],
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": self.instance,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            try:
                await self.kube.create(
                    resource_path(namespace, group="", version="v1", plural="events"), event
                )
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("could not post event %s on %s: %s", reason, involved["name"], exc)
