"""The shared webhook delivery loop keeps going past a webhook it cannot send to.

Found by the API fuzz run: a webhook URL whose credentials aiohttp cannot encode raised
out of the delivery and ended the loop, so no later webhook was ever sent. The gateway
now refuses such URLs at create time; kubectl users can still write one into a spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.gateway.conftest import LOOPBACK, Receiver, completed
from whisperx_api.store import Store, WebhookDelivery
from whisperx_api.webhooks import WebhookSender, generate_secret


async def test_an_unsendable_url_fails_only_its_own_delivery(
    redis_url: str, receiver: Receiver
) -> None:
    store = Store.from_url(redis_url)
    sender = WebhookSender(store, generate_secret(), allow=LOOPBACK)
    task = asyncio.create_task(sender.run())
    try:
        bad = await store.enqueue_webhook(
            url="http://\U000f0c83:x@example.com/hook",
            body="{}",
            event="completed",
            namespace="ns",
            prediction_id="bad",
        )
        deadline = time.monotonic() + 10
        while await store.redis.hget(f"wx:wh:d:{bad}", "attempts") != "1":
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        await store.enqueue_webhook(
            url=receiver.url,
            body='{"status": "succeeded"}',
            event="completed",
            namespace="ns",
            prediction_id="good",
        )
        sender.wake()
        await receiver.wait_for(completed, seconds=10)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


async def test_a_failing_lease_is_logged_and_the_loop_goes_on(
    redis_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    store = Store.from_url(redis_url)
    lease = store.lease_due_webhooks
    failures = [RuntimeError("a bug"), RedisConnectionError("Redis went away")]

    async def flaky() -> list[WebhookDelivery]:
        if failures:
            raise failures.pop(0)
        return await lease()

    monkeypatch.setattr(store, "lease_due_webhooks", flaky)
    sender = WebhookSender(store, generate_secret(), allow=LOOPBACK, poll_interval=0.05)
    task = asyncio.create_task(sender.run())
    try:
        await store.enqueue_webhook(
            url=receiver.url, body='{"status": "succeeded"}', event="completed",
            namespace="ns", prediction_id="p",
        )  # fmt: skip
        await receiver.wait_for(completed, seconds=10)
        assert not task.done() and not failures
        bug = [r for r in caplog.records if r.getMessage() == "leasing due webhooks failed"]
        assert len(bug) == 1 and bug[0].exc_info is not None
        assert "webhook outbox (Redis) unavailable: a bug" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
