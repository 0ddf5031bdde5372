"""The operator's own limits under bulk load: how many kopf handlers run at once, and a
Redis pool that holds every command they and the rest of the operator have in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import kopf
import pytest

from whisperx_operator import deadlines, handlers
from whisperx_operator.config import OperatorConfig, parse_profiles
from whisperx_operator.main import kopf_settings
from whisperx_operator.runtime import OTHER_REDIS_CONNECTIONS, Runtime

KEY = b"k" * 32


def body(name: str) -> kopf.Body:
    """A new Prediction, as its first watch event brings it."""
    return kopf.Body(
        {
            "apiVersion": "whisperx.io/v1alpha1",
            "kind": "Prediction",
            "metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"input": {"audio_file": "https://example.test/a.wav"}},
        }
    )


async def test_handlers_beyond_the_limit_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = Runtime(OperatorConfig(report_key=KEY, max_concurrent_handlers=3), identity="t")
    running, peak = 0, 0

    async def work(*_: Any, **__: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    for name in ("reconcile", "_start", "job_changed", "pod_changed", "forget"):
        monkeypatch.setattr(runtime, name, work)
    memo = kopf.Memo(runtime=runtime)
    # kopf's decorators type these as its handler protocols: called as kopf calls them.
    kinds: list[tuple[Any, dict[str, str]]] = [
        (handlers.created, {}),
        (handlers.prediction_event, {"type": "ADDED"}),
        (handlers.job_event, {"type": "MODIFIED"}),
        (handlers.pod_event, {"type": "MODIFIED"}),
        (handlers.deleted, {}),
    ]
    calls = [fn(body=body(f"p{i}"), memo=memo, **kw) for fn, kw in kinds for i in range(6)]
    await asyncio.gather(*calls)
    assert peak == 3 and running == 0
    await runtime.stop()


async def test_the_redis_pool_holds_every_command_in_flight(redis_url: str) -> None:
    config = OperatorConfig(report_key=KEY, redis_url=redis_url, max_concurrent_handlers=40)
    runtime = Runtime(config, identity="t")
    redis = runtime.store.redis
    try:
        # As many commands as handlers and deadlines may have in flight run at once, none
        # waiting for another's connection: each blocks 1 s, all are done well before 2 s.
        at_once = config.max_concurrent_handlers + deadlines.CONCURRENCY
        began = time.monotonic()
        await asyncio.gather(*(redis.blpop([f"nothing-{i}"], timeout=1) for i in range(at_once)))
        assert time.monotonic() - began < 1.9
        # Past the pool (more than redis-py's default of 100), commands wait for a
        # connection instead of failing with MaxConnectionsError.
        beyond = config.max_concurrent_handlers + OTHER_REDIS_CONNECTIONS + 60
        assert beyond > 100
        await asyncio.gather(*(redis.blpop([f"nothing-{i}"], timeout=0.2) for i in range(beyond)))
    finally:
        await runtime.stop()


def test_kopf_knows_the_handlers_by_their_own_names() -> None:
    # kopf stores handler ids on Predictions (its progress and diff-base annotations):
    # the slot decorator must not change them.
    registry = kopf.get_default_registry()
    ids = {
        str(h.id)
        for handlers_of_kind in (registry._changing, registry._watching)
        for h in handlers_of_kind.get_all_handlers()
        if h.fn.__module__ == handlers.__name__
    }
    assert ids == {
        "created", "resumed", "cancel", "deleted",
        "prediction_event", "job_event", "job_warning", "pod_event",
        "runner_job_event", "runner_pod_event",
    }  # fmt: skip


async def test_kopf_runs_a_bounded_number_of_object_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bulk creation, objects past kopf's worker limit wait as their raw events
    only; each is still handled, in the order its events came."""
    from kopf._cogs.clients import watching
    from kopf._cogs.structs import references
    from kopf._core.reactor import queueing

    settings = kopf_settings(OperatorConfig(report_key=KEY, max_concurrent_handlers=3))
    limit = settings.queueing.worker_limit
    uids = [f"u{i}" for i in range(40)]
    events = [{"type": "ADDED", "object": {"metadata": {"uid": uid}}} for uid in uids]

    async def stream(**_: Any) -> Any:
        for event in events:
            yield event
        await asyncio.Event().wait()  # the watch stays open

    monkeypatch.setattr(watching, "infinite_watch", stream)
    running, peak, handled = 0, 0, []
    release, all_handled = asyncio.Event(), asyncio.Event()

    async def processor(*, raw_event: Any, **_: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        handled.append(raw_event["object"]["metadata"]["uid"])
        running -= 1
        if len(handled) == len(events):
            all_handled.set()

    resource = references.Resource("whisperx.io", "v1alpha1", "predictions")
    watcher = asyncio.create_task(
        queueing.watcher(namespace=None, settings=settings, resource=resource, processor=processor)
    )
    try:
        await asyncio.sleep(0.2)
        assert running == peak == limit
        release.set()
        # Each worker gives its slot up 0.5 s after its object's last event.
        await asyncio.wait_for(all_handled.wait(), 10)
        assert peak == limit
        assert handled == uids
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_only_predictions_of_a_profile_without_warm_runners_get_a_job_of_their_own() -> None:
    profiles = parse_profiles({"warm": {"idleSeconds": 30}, "gpu": {}})
    runtime = Runtime(OperatorConfig(report_key=KEY, profiles=profiles), identity="t")
    assert not runtime.sink.own_job("warm")
    assert runtime.sink.own_job("gpu") and runtime.sink.own_job("unknown")
    await runtime.stop()
