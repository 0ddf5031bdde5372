"""The report endpoint in front of the status writer (real Redis, in-memory status)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import free_port
from whisperx_api import lifecycle as lc
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import SIGNATURE_HEADER, prediction_token, sign
from whisperx_api.runner_endpoint import runner_app
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store

KEY = b"k" * 32


class MemorySink:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], PredictionRecord] = {}

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        return self.records.get((namespace, prediction_id))

    async def save(self, record: PredictionRecord) -> None:
        self.records[(record.namespace, record.id)] = record


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_url)
    yield store
    await store.close()


def add(sink: MemorySink, name: str, *, cancel_requested: bool = False) -> PredictionRecord:
    record = PredictionRecord(
        id=name,
        namespace="ns",
        uid=f"uid-{name}",
        input={"audio_file": "https://x/a.wav"},
        state=lc.PredictionState(created_at=lc.now_utc()),
        cancel_requested=cancel_requested,
    )
    sink.records[("ns", name)] = record
    return record


async def post(client: TestClient[Any, Any], name: str, payload: dict[str, object]) -> int:
    body = json.dumps(payload).encode()
    token = prediction_token(KEY, "ns", name, f"uid-{name}")
    headers = {SIGNATURE_HEADER: sign(token, body)}
    async with client.post(f"/reports/ns/{name}", data=body, headers=headers) as resp:
        return resp.status


async def test_sigterm_cancel_counts_only_when_the_cancel_was_requested(store: Store) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    add(sink, "evicted")
    add(sink, "asked", cancel_requested=True)
    async with TestClient(TestServer(runner_app(writer, store))) as client:
        for name in ("evicted", "asked"):
            assert await post(client, name, {"event": "start", "seq": 1}) == 200
            canceled = {"event": "completed", "seq": 2, "status": "canceled", "logs": "bye\n"}
            assert await post(client, name, canceled) == 200
    # SIGTERM from an eviction or preemption: the pod's fate decides, not the runner.
    assert sink.records[("ns", "evicted")].state.phase is lc.Phase.PROCESSING
    assert sink.records[("ns", "asked")].state.phase is lc.Phase.CANCELED
    assert (await store.get_view("ns", "evicted")).logs == "bye\n"  # type: ignore[union-attr]


async def test_standby_refuses_reports_and_is_not_ready(store: Store) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    add(sink, "p")
    active = False
    app = runner_app(writer, store, active=lambda: active)
    async with TestClient(TestServer(app)) as client:
        assert await post(client, "p", {"event": "start", "seq": 1}) == 503
        async with client.get("/readyz") as resp:
            assert resp.status == 503
        active = True
        async with client.get("/readyz") as resp:
            assert resp.status == 200
        assert await post(client, "p", {"event": "start", "seq": 1}) == 200
    assert sink.records[("ns", "p")].state.phase is lc.Phase.PROCESSING


async def test_not_ready_without_redis() -> None:
    down = Store.from_url(f"redis://127.0.0.1:{free_port()}/0")
    writer = StatusWriter(store=down, sink=MemorySink(), report_key=KEY, public_url="http://gw")
    async with (
        TestClient(TestServer(runner_app(writer, down))) as client,
        client.get("/readyz") as resp,
    ):
        assert resp.status == 503 and "redis" in (await resp.json())["detail"]
    await down.close()
