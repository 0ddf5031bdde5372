"""Shutdown stays bounded when redis-py's close stalls (redis/redis-py#3941: closing a
connection can wait forever on its `wait_closed`)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from whisperx_api.store import CONNECT_SECONDS, Store
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


async def test_store_close_is_bounded_when_a_connection_close_hangs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.from_url(redis_url, max_connections=4)
    await store.redis.ping()

    async def hang(self: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(asyncio.StreamWriter, "wait_closed", hang)
    started = time.monotonic()
    await asyncio.wait_for(store.close(), CONNECT_SECONDS + 5)
    assert time.monotonic() - started < CONNECT_SECONDS + 1
