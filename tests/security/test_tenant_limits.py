"""One tenant's slow or numerous requests cannot take the gateway from the others.

Before: no timeout on reading bodies (1,000 half-sent requests from one tenant made
every tenant's calls fail with 503 until they closed), no per-token share of the
in-flight limit, and a Redis pool (100) smaller than the in-flight limit (1,000), so
concurrent GETs got 503 "Redis is unavailable" while Redis was healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.gateway.conftest import OTHER_TOKEN, TOKEN, Gateway, serve_local
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.errors import ApiError
from whisperx_gateway.limits import InFlight
from whisperx_gateway.local_backend import LocalBackend


def test_a_tenant_gets_429_beyond_its_share_while_others_are_admitted() -> None:
    limits = InFlight(total_limit=5, tenant_limit=2)
    limits.admit("a")
    limits.admit("a")
    with pytest.raises(ApiError) as caught:
        limits.admit("a")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "1"
    limits.admit("b")
    limits.admit(None)
    limits.admit("b")
    with pytest.raises(ApiError) as full:
        limits.admit("c")
    assert full.value.status == 503
    limits.release("a")
    limits.release(None)
    limits.admit("a")
    assert limits.total == 4 and limits.by_tenant == {"a": 2, "b": 2}


def test_the_share_and_the_pool_derive_from_the_in_flight_limit() -> None:
    tokens = GatewayConfig.from_env({"WHISPERX_TOKENS": f"{TOKEN}=alpha"}).tokens
    config = GatewayConfig(tokens=tokens, max_in_flight=1000)
    assert config.tenant_in_flight == 250 and config.redis_pool_size >= 1000
    env = {"WHISPERX_TOKENS": f"{TOKEN}=alpha", "WHISPERX_MAX_IN_FLIGHT_PER_TOKEN": "7",
           "WHISPERX_BODY_TIMEOUT_SECONDS": "9"}  # fmt: skip
    configured = GatewayConfig.from_env(env)
    assert configured.tenant_in_flight == 7 and configured.body_timeout == 9


@contextlib.asynccontextmanager
async def half_sent(
    gw: Gateway, token: str, path: str = "/v1/predictions", content_type: str = "application/json"
) -> AsyncIterator[asyncio.StreamReader]:
    """A request whose headers promise a body that never fully arrives."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n{{".encode()
    )
    await writer.drain()
    try:
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/predictions", "application/json"), ("/v1/files", "multipart/form-data; boundary=x")],
)
async def test_a_half_sent_body_is_answered_408(
    redis_url: str, path: str, content_type: str
) -> None:
    async with (
        serve_local(redis_url, body_timeout=1) as gw,
        half_sent(gw, TOKEN, path, content_type) as reader,
    ):
        started = time.monotonic()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.split()[1] == b"408", status_line
        assert time.monotonic() - started < 5


async def test_half_sent_bodies_of_one_tenant_leave_the_others_served(redis_url: str) -> None:
    async with (
        serve_local(redis_url, max_in_flight=8, max_in_flight_per_token=4, body_timeout=60) as gw,
        contextlib.AsyncExitStack() as stack,
    ):
        held = [await stack.enter_async_context(half_sent(gw, TOKEN)) for _ in range(10)]
        # Four are held; the other six are answered at once.
        answers = await asyncio.gather(
            *(asyncio.wait_for(r.readline(), 0.5) for r in held), return_exceptions=True
        )
        refused = [a for a in answers if isinstance(a, bytes)]
        assert len(refused) == 6 and all(a.split()[1] == b"429" for a in refused), answers
        async with (
            aiohttp.ClientSession() as http,
            http.get(gw.url + "/v1/predictions", headers=gw.auth(OTHER_TOKEN)) as resp,
        ):
            assert resp.status == 200


async def test_concurrent_reads_up_to_the_in_flight_limit_all_succeed(redis_url: str) -> None:
    async with serve_local(redis_url, max_in_flight=300, max_in_flight_per_token=300) as gw:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def read(i: int) -> int:
                url = f"{gw.url}/v1/predictions/{'a' * 25}{i % 10}"
                async with http.get(url, headers=gw.auth()) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(read(i) for i in range(250)))
        assert set(statuses) == {404}, sorted(set(statuses))


async def test_a_runner_report_gets_503_not_500_when_redis_fails(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = gateway.backend
    assert isinstance(backend, LocalBackend)

    async def failing(*args: object) -> None:
        raise RedisConnectionError("Too many connections")

    monkeypatch.setattr(backend.writer, "handle_report", failing)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{backend.report_base_url}/reports/alpha/p", data=b"{}") as resp,
    ):
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
