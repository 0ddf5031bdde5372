"""The status sink of the operator: a Prediction's status subresource.

`StatusWriter` (whisperx_api.status_writer) loads a record, applies an event and saves it,
always under its per-prediction lock, so every save follows a load of the same
prediction. The sink remembers what it loaded to post Events on transitions and to stamp
`observedGeneration`, and tells the deadline scheduler about every saved state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from whisperx_api import lifecycle as lc
from whisperx_api.kube import ApiError, KubeClient, resource_path
from whisperx_api.records import PredictionRecord
from whisperx_api.store import output_key
from whisperx_operator.events import EventPoster, involved_object, transition_events
from whisperx_operator.jobs import job_name

log = logging.getLogger(__name__)

SavedCallback = Callable[[PredictionRecord], None]


def status_patch(
    record: PredictionRecord, generation: int | None, *, own_job: bool = True
) -> dict[str, Any]:
    """The merge patch of the status subresource for `record`. `own_job`: the prediction
    runs as a Job of its own (named after it) rather than on a warm runner's."""
    status = record.state.to_status()
    if own_job:
        status.setdefault("jobName", job_name(record.id))
    if generation is not None:
        status["observedGeneration"] = generation
    if record.state.phase is lc.Phase.SUCCEEDED:
        status["output"] = {"store": "redis", "key": output_key(record.namespace, record.id)}
    return {"status": status}


class KubeStatusSink:
    def __init__(
        self,
        kube: KubeClient,
        events: EventPoster | None = None,
        on_saved: SavedCallback | None = None,
        own_job: Callable[[str], bool] = lambda hardware: True,
    ) -> None:
        self.kube = kube
        self.events = events
        self.on_saved = on_saved
        # Whether a prediction of this hardware profile runs as a Job of its own (not on a
        # warm runner's).
        self.own_job = own_job
        # (namespace, id) -> (generation, state, whether the status held is the patch of
        # that state) as last loaded or saved.
        self._seen: dict[tuple[str, str], tuple[int | None, lc.PredictionState, bool]] = {}

    def forget(self, namespace: str, prediction_id: str) -> None:
        self._seen.pop((namespace, prediction_id), None)

    def _patch(self, record: PredictionRecord, generation: int | None) -> dict[str, Any]:
        return status_patch(record, generation, own_job=self.own_job(record.hardware))

    def remember(self, obj: dict[str, Any]) -> PredictionRecord:
        """The record of a Prediction body already at hand (a kopf handler's `body`)."""
        record = PredictionRecord.from_resource(obj)
        generation = (obj.get("metadata") or {}).get("generation")
        held = obj.get("status") or {}
        written = all(
            held.get(k) == v for k, v in self._patch(record, generation)["status"].items()
        )
        self._seen[(record.namespace, record.id)] = (generation, record.state, written)
        return record

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        try:
            obj = await self.kube.get(resource_path(namespace, prediction_id))
        except ApiError as exc:
            if exc.status == 404:
                self.forget(namespace, prediction_id)
                return None
            raise
        return self.remember(obj)

    async def save(self, record: PredictionRecord) -> None:
        key = (record.namespace, record.id)
        generation, old_state, written = self._seen.get(key, (None, None, False))
        # A save of the state just loaded, whose status is already this one (a create
        # handler after a Job event wrote it), would be a patch that changes nothing.
        if not (written and old_state == record.state):
            path = resource_path(record.namespace, record.id, subresource="status")
            try:
                await self.kube.merge_patch(path, self._patch(record, generation))
            except ApiError as exc:
                if exc.status == 404:
                    log.info("prediction %s/%s is gone; status not saved", *key)
                    return
                raise
        self._seen[key] = (generation, record.state, True)
        if self.events is not None:
            for type_, reason, message in transition_events(old_state, record.state):
                self.events.post(involved_object(record), type_, reason, message)
        if self.on_saved is not None:
            self.on_saved(record)
