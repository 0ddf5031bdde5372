"""What unauthenticated callers and API callers learn about the gateway's internals."""

from __future__ import annotations

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.gateway.conftest import Gateway


async def test_ready_does_not_show_where_redis_is(
    gateway: Gateway, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused() -> bool:
        raise RedisConnectionError("Error 111 connecting to 10.96.0.20:6379. Connection refused.")

    monkeypatch.setattr(gateway.backend.store.redis, "ping", refused)
    async with http.get(gateway.url + "/ready") as resp:
        text = await resp.text()
    assert resp.status == 503 and "Redis is unavailable" in text
    assert "10.96.0.20" not in text and "6379" not in text
