"""The status writer against a real redis-server, with an in-memory status sink."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.conftest import free_port
from whisperx_api import lifecycle as lc
from whisperx_api.netguard import HostAllowList
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import prediction_token, sign
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.webhooks import WebhookSender, generate_secret, signature, tenant_secret

KEY = b"k" * 32
NS = "tenant-a"


class MemorySink:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], PredictionRecord] = {}
        self.saves = 0

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        return self.records.get((namespace, prediction_id))

    async def save(self, record: PredictionRecord) -> None:
        self.saves += 1
        self.records[(record.namespace, record.id)] = record


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_url)
    yield store
    await store.close()


def new_record(pid: str, webhook: str | None = None, **kw: object) -> PredictionRecord:
    return PredictionRecord(
        id=pid,
        namespace=NS,
        uid=f"uid-{pid}",
        input={"audio_file": "https://example.com/a.wav", "huggingface_access_token": "hf_x"},
        state=lc.PredictionState(created_at=lc.now_utc()),
        webhook=webhook,
        **kw,  # type: ignore[arg-type]
    )


def body(payload: dict[str, object]) -> bytes:
    return json.dumps(payload).encode()


async def report(
    writer: StatusWriter,
    record: PredictionRecord,
    payload: dict[str, object],
    token: str | None = None,
) -> tuple[int, dict[str, object]]:
    raw = body(payload)
    token = token or prediction_token(KEY, record.namespace, record.id, record.uid or "")
    result = await writer.handle_report(record.namespace, record.id, raw, sign(token, raw))
    return result.http_status, result.body


async def test_reports_drive_the_lifecycle_and_keep_output_in_redis(store: Store) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    rec = new_record("p1")
    sink.records[(NS, "p1")] = rec
    await writer.publish(rec)

    assert (await report(writer, rec, {"event": "start", "seq": 1}))[0] == 200
    assert (await report(writer, rec, {"event": "logs", "seq": 2, "logs": "10%\n"}))[0] == 200
    output = {"segments": [{"start": 0, "end": 1, "text": "hi"}], "detected_language": "en"}
    done = {
        "event": "completed",
        "seq": 3,
        "status": "succeeded",
        "output": output,
        "metrics": {"predict_time": 1.5, "audio_duration": 2.0},
    }
    assert await report(writer, rec, done) == (200, {"applied": True})

    state = sink.records[(NS, "p1")].state
    assert state.phase is lc.Phase.SUCCEEDED and state.detected_language == "en"
    assert state.predict_time == 1.5 and state.audio_duration == 2.0
    view = await store.get_view(NS, "p1")
    assert view is not None and view.output == output and view.logs == "10%\n"
    assert view.record.state.phase is lc.Phase.SUCCEEDED
    assert "huggingface_access_token" not in view.record.input

    # A retried completed and a late start change nothing.
    saves = sink.saves
    assert (await report(writer, rec, done))[1]["applied"] is False
    assert (await report(writer, rec, {"event": "start", "seq": 9}))[1]["applied"] is False
    assert sink.saves == saves


async def test_a_replacement_pod_numbers_its_reports_anew_and_its_predecessor_is_refused(
    store: Store,
) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    rec = new_record("r")
    sink.records[(NS, "r")] = rec
    first = {"attempt": "pod-a"}
    assert (await report(writer, rec, {"event": "start", "seq": 1, **first}))[0] == 200
    logs = {"event": "logs", "seq": 2, "logs": "a\n", **first}
    assert (await report(writer, rec, logs))[1] == {"applied": True}
    # Evicted: the replacement pod starts counting from 1 again, and is heard.
    second = {"attempt": "pod-b"}
    assert await report(writer, rec, {"event": "start", "seq": 1, **second}) == (
        200, {"applied": True}
    )  # fmt: skip
    assert await report(writer, rec, {"event": "logs", "seq": 2, "logs": "b\n", **second}) == (
        200, {"applied": True}
    )  # fmt: skip
    # A replay within an attempt is still a no-op.
    replay = {"event": "logs", "seq": 2, "logs": "b\n", **second}
    assert (await report(writer, rec, replay))[1]["applied"] is False
    # The replaced pod (cut off, given up for lost) cannot write over its successor.
    late = {"event": "completed", "seq": 3, "status": "failed", "error": "lost", **first}
    status, detail = await report(writer, rec, late)
    assert status == 409 and detail["applied"] is False
    output = {"segments": [{"start": 0, "end": 1, "text": "hi"}]}
    done = {"event": "completed", "seq": 3, "status": "succeeded", "output": output, **second}
    assert (await report(writer, rec, done))[1] == {"applied": True}
    assert sink.records[(NS, "r")].state.phase is lc.Phase.SUCCEEDED
    view = await store.get_view(NS, "r")
    assert view is not None and view.output == output and view.logs == "a\nb\n"


async def test_credentials_are_per_prediction_and_replays_are_refused(store: Store) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    a, b = new_record("a"), new_record("b")
    sink.records.update({(NS, "a"): a, (NS, "b"): b})
    token_a = prediction_token(KEY, NS, "a", "uid-a")

    status, detail = await report(writer, b, {"event": "start", "seq": 1}, token=token_a)
    assert status == 401 and "signature" in str(detail["detail"])
    raw = body({"event": "start", "seq": 1})
    missing = await writer.handle_report(NS, "a", raw, None)
    assert missing.http_status == 401
    stale = await writer.handle_report(NS, "a", raw, sign(token_a, raw, timestamp=1))
    assert stale.http_status == 401 and "window" in str(stale.body["detail"])
    # A name reused by a new object (new uid) does not accept the old object's token.
    sink.records[(NS, "a")] = dataclasses.replace(a, uid="uid-a-2")
    assert (await report(writer, a, {"event": "start", "seq": 1}, token=token_a))[0] == 401
    assert (await writer.handle_report(NS, "nope", raw, sign(token_a, raw))).http_status == 404
    bad = body({"event": "explode", "seq": 1})
    assert (
        await writer.handle_report(NS, "b", bad, sign(prediction_token(KEY, NS, "b", "uid-b"), bad))
    ).http_status == 422


async def test_cancel_wins_over_a_late_completion(store: Store) -> None:
    sink = MemorySink()
    writer = StatusWriter(store=store, sink=sink, report_key=KEY, public_url="http://gw")
    rec = new_record("c")
    sink.records[(NS, "c")] = rec
    await writer.apply(NS, "c", lc.Started(at=lc.now_utc()))
    await writer.apply(NS, "c", lc.CancelRequested(at=lc.now_utc()))
    late = {"event": "completed", "seq": 5, "status": "succeeded", "output": {"segments": []}}
    assert (await report(writer, rec, late))[1]["applied"] is False
    assert sink.records[(NS, "c")].state.phase is lc.Phase.CANCELED
    view = await store.get_view(NS, "c")
    assert view is not None and view.output is None


async def test_webhooks_are_signed_filtered_and_the_terminal_one_is_queued_once(
    store: Store,
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    failures_left = {"n": 1}

    async def receiver(request: web.Request) -> web.Response:
        payload = await request.read()
        if json.loads(payload)["status"] == "succeeded" and failures_left["n"]:
            failures_left["n"] -= 1
            return web.Response(status=503)
        received.append((dict(request.headers), payload))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", receiver)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    secret = generate_secret()
    # The receiver is on loopback, an internal address webhooks need allow-listed for.
    loopback = HostAllowList.parse("127.0.0.1")
    sender = WebhookSender(store, secret, allow=loopback, poll_interval=0.05)
    sink = MemorySink()
    writer = StatusWriter(
        store=store, sink=sink, report_key=KEY, public_url="http://gw", webhooks=sender
    )
    task = asyncio.create_task(sender.run())
    try:
        rec = new_record(
            "w", webhook=f"http://127.0.0.1:{port}/hook", webhook_events_filter=("completed",)
        )
        sink.records[(NS, "w")] = rec
        await report(writer, rec, {"event": "start", "seq": 1})
        done = {"event": "completed", "seq": 2, "status": "succeeded", "output": {"segments": []}}
        await report(writer, rec, done)
        # Re-publishing (as a resumed operator does) must not queue a second delivery.
        await writer.publish(sink.records[(NS, "w")])
        # The first attempt gets a 503; the retry after backoff (2 s) succeeds.
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert len(received) == 1, "exactly one delivery: start is filtered out"
        headers, payload = received[0]
        expected = signature(  # each namespace has its own secret
            tenant_secret(secret, NS),
            headers["webhook-id"],
            int(headers["webhook-timestamp"]),
            payload.decode(),
        )
        assert headers["webhook-signature"] == expected
        sent = json.loads(payload)
        assert sent["status"] == "succeeded" and sent["output"] == {"segments": []}
        assert sent["urls"]["get"] == "http://gw/v1/predictions/w"
        assert await store.pending_webhooks() == 0
    finally:
        task.cancel()
        await runner.cleanup()


async def test_logs_stop_at_their_cap_on_a_character_boundary(store: Store) -> None:
    from whisperx_api.store import LOGS_TRUNCATED, MAX_LOGS_BYTES

    await store.put_record(new_record("logs1"))
    await store.append_logs(NS, "logs1", "a" * (MAX_LOGS_BYTES - 1))
    # "é" is two bytes: only its first would fit, so neither goes in.
    await store.append_logs(NS, "logs1", "é and more")
    await store.append_logs(NS, "logs1", "and still more")
    view = await store.get_view(NS, "logs1")
    assert view is not None
    assert view.logs == "a" * (MAX_LOGS_BYTES - 1) + LOGS_TRUNCATED.format(MAX_LOGS_BYTES)
