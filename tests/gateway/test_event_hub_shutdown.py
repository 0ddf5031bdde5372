"""The event hub stops even when redis-py's pub/sub close stalls (redis/redis-py#3941:
`PubSub.aclose` can wait forever on the connection's `wait_closed`)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from whisperx_gateway.waiting import EventHub


async def test_close_is_bounded_when_the_pubsub_close_hangs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hang(self: PubSub) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(PubSub, "aclose", hang)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    hub = EventHub(client)
    await hub.start()
    assert hub.subscribed.is_set()
    started = time.monotonic()
    await asyncio.wait_for(hub.close(), 10)
    assert time.monotonic() - started < 5
    await client.aclose()
