"""kopf handlers: thin adapters onto `Runtime` (runtime.py), which holds the logic.

Predictions get changing handlers (create, resume, cancel, delete with a finalizer that
removes the Redis data), and an event handler that starts a new one's Job early. Jobs,
pods and the Job controller's FailedCreate Events get event handlers only: they store
nothing on those objects and only feed the lifecycle, which ignores repeats. Every
handler that calls the API server takes one of the runtime's `handler_slots`
(WHISPERX_MAX_CONCURRENT_HANDLERS), by `bounded`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
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


Handler = Callable[..., Awaitable[None]]


def bounded(handler: Handler) -> Handler:
    """Runs `handler` in one of the runtime's handler slots. kopf names a handler after
    the function `functools.wraps` keeps, so its id, stored on objects, stays the same."""

    @functools.wraps(handler)
    async def in_a_slot(*, memo: Any, **kwargs: Any) -> None:
        async with _runtime(memo).handler_slots:
            await handler(memo=memo, **kwargs)

    return in_a_slot


def not_deleted(type: str | None, **_: Any) -> bool:
    return type != "DELETED"


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
@bounded
async def created(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).reconcile(dict(body))


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=BACKOFF)
@bounded
async def resumed(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).reconcile(dict(body))


@kopf.on.update(GROUP, VERSION, PLURAL, when=cancel_requested, backoff=BACKOFF)
@bounded
async def cancel(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).cancel(body.metadata.namespace or "default", body.metadata.name)


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=BACKOFF)
@bounded
async def deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).forget(body.metadata.namespace or "default", body.metadata.name)


@kopf.on.event("batch", "v1", "jobs", labels={PREDICTION_LABEL: kopf.PRESENT})
@bounded
async def job_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).job_changed(type, dict(body))


# Only the Job controller's FailedCreate Events on Jobs reach it (a server-side field
# selector, main.py): a pod that could not even be created has no status to watch.
@kopf.on.event("v1", "events", when=not_deleted)
@bounded
async def job_warning(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).pod_not_created(dict(body))


# Warm runners' Jobs and pods (pools.py): their predictions are not in their labels.
@kopf.on.event("batch", "v1", "jobs", labels={RUNNER_LABEL: kopf.PRESENT})
@bounded
async def runner_job_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).pools.job_changed(type, dict(body))


@kopf.on.event("v1", "pods", labels={RUNNER_LABEL: kopf.PRESENT}, when=not_deleted)
@bounded
async def runner_pod_event(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).pools.pod_changed(dict(body))


@kopf.on.event("v1", "pods", labels={PREDICTION_LABEL: kopf.PRESENT}, when=not_deleted)
@bounded
async def pod_event(body: kopf.Body, memo: Any, **_: Any) -> None:
    await _runtime(memo).pod_changed(dict(body))
