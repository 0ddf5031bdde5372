"""kopf handlers: thin adapters onto `Runtime` (runtime.py), which holds the logic.

Predictions get changing handlers (create, resume, cancel, delete with a finalizer that
removes the Redis data), and an event handler that starts a new one's Job early. Jobs,
pods and the Job controller's FailedCreate Events get event handlers only: they store
nothing on those objects and only feed the lifecycle, which ignores repeats. Every
handler that calls the API server takes one of the runtime's `handler_slots`
(WHISPERX_MAX_CONCURRENT_HANDLERS).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from whisperx_api.crd import CANCEL_ANNOTATION, GROUP, PLURAL, PREDICTION_LABEL, VERSION
from whisperx_operator.jobs import RUNNER_LABEL
from whisperx_operator.runtime import Runtime

# Seconds between retries of a failed handler (kopf's default is 60).
BACKOFF = 5


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


def cancel_requested(spec: Mapping[str, Any], annotations: Mapping[str, str], **_: Any) -> bool:
    return spec.get("cancel") is True or annotations.get(CANCEL_ANNOTATION, "").lower() == "true"


@kopf.on.cleanup()
async def stopping(memo: Any, **_: Any) -> None:
    # Stop the operator's own servers and loops while kopf stops, so that kopf does not
    # wait for their inner tasks as "hung" ones.
    await _runtime(memo).stop()


# Event handlers run before kopf's finalizer step, which delays the changing handlers
# (create, resume...) by a write and its watch event: a new Prediction's Job starts here.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def prediction_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        await _runtime(memo).prepare(body)


@kopf.on.create(GROUP, VERSION, PLURAL, backoff=BACKOFF)
async def created(body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).reconcile(dict(body))


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=BACKOFF)
async def resumed(body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).reconcile(dict(body))


@kopf.on.update(GROUP, VERSION, PLURAL, when=cancel_requested, backoff=BACKOFF)
async def cancel(body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).cancel(body.metadata.namespace or "default", body.metadata.name)


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=BACKOFF)
async def deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).forget(body.metadata.namespace or "default", body.metadata.name)


@kopf.on.event("batch", "v1", "jobs", labels={PREDICTION_LABEL: kopf.PRESENT})
async def job_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).job_changed(type, dict(body))


# Only the Job controller's FailedCreate Events on Jobs reach it (a server-side field
# selector, main.py): a pod that could not even be created has no status to watch.
@kopf.on.event("v1", "events")
async def job_warning(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        async with _runtime(memo).handler_slots:
            await _runtime(memo).pod_not_created(dict(body))


# Warm runners' Jobs and pods (pools.py): their predictions are not in their labels.
@kopf.on.event("batch", "v1", "jobs", labels={RUNNER_LABEL: kopf.PRESENT})
async def runner_job_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    async with _runtime(memo).handler_slots:
        await _runtime(memo).pools.job_changed(type, dict(body))


@kopf.on.event("v1", "pods", labels={RUNNER_LABEL: kopf.PRESENT})
async def runner_pod_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        async with _runtime(memo).handler_slots:
            await _runtime(memo).pools.pod_changed(dict(body))


@kopf.on.event("v1", "pods", labels={PREDICTION_LABEL: kopf.PRESENT})
async def pod_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        async with _runtime(memo).handler_slots:
            await _runtime(memo).pod_changed(dict(body))
