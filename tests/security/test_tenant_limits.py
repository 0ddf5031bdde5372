"""One tenant's slow or numerous requests cannot take the gateway from the others.

Before: no timeout on reading bodies (1,000 half-sent requests from one tenant made
every tenant's calls fail with 503 until they closed), no per-token share of the
in-flight limit, and a Redis pool (100) smaller than the in-flight limit (1,000), so
concurrent GETs got 503 "Redis is unavailable" while Redis was healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.gateway.conftest import OTHER_TOKEN, TOKEN, Gateway, serve_local
from tests.security.test_list_bounds import store_finished, transcript
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
async def raw_request(
    gw: Gateway, head: str, receive_buffer: int | None = None
) -> AsyncIterator[asyncio.StreamReader]:
    """`head` sent as it is on a connection of its own; its answer left to the caller
    (`receive_buffer`: the socket's, in bytes, when small)."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    port = int(gw.url.rsplit(":", 1)[1])
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    writer.write(head.encode())
    await writer.drain()
    try:
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def half_sent(
    gw: Gateway, token: str, path: str = "/v1/predictions", content_type: str = "application/json"
) -> contextlib.AbstractAsyncContextManager[asyncio.StreamReader]:
    """A request whose headers promise a body that never fully arrives."""
    return raw_request(
        gw,
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n{{",
    )


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


def unread_get(
    gw: Gateway, token: str, path: str
) -> contextlib.AbstractAsyncContextManager[asyncio.StreamReader]:
    """A GET whose client takes almost none of the answer: a receive buffer of 4 KiB,
    never read until the caller reads it."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    return raw_request(gw, head, receive_buffer=4096)


async def read_all(reader: asyncio.StreamReader) -> int:
    """Bytes until the connection ends (closed or reset)."""
    size = 0
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 16):
            size += len(chunk)
    return size


async def test_an_answer_its_client_does_not_take_counts_against_that_clients_share(
    redis_url: str,
) -> None:
    """A 12 MB transcript that two clients of one token ask for and do not read: both
    stay in flight (before, they left the count as soon as their answers were made, and
    any number of unread answers piled up in the gateway's memory)."""
    async with serve_local(redis_url, max_in_flight_per_token=2, body_timeout=60) as gw:
        (prediction,) = await store_finished(gw.store, "alpha", [transcript(84_000)], {})
        path = f"/v1/predictions/{prediction}"
        async with (
            unread_get(gw, TOKEN, path),
            unread_get(gw, TOKEN, path),
            aiohttp.ClientSession() as http,
        ):
            await asyncio.sleep(1)  # both answers made and stuck in sending
            async with http.get(gw.url + path, headers=gw.auth()) as resp:
                assert resp.status == 429
            async with http.get(gw.url + "/v1/predictions", headers=gw.auth(OTHER_TOKEN)) as resp:
                assert resp.status == 200
        async with (
            aiohttp.ClientSession() as http,
            http.get(gw.url + path, headers=gw.auth()) as resp,
        ):
            assert resp.status == 200 and len(await resp.read()) > 10_000_000


async def test_a_client_that_takes_nothing_is_disconnected_and_its_share_freed(
    redis_url: str,
) -> None:
    async with serve_local(redis_url, max_in_flight_per_token=1, body_timeout=1) as gw:
        (prediction,) = await store_finished(gw.store, "alpha", [transcript(84_000)], {})
        path = f"/v1/predictions/{prediction}"
        async with unread_get(gw, TOKEN, path) as reader:
            await asyncio.sleep(4)
            started = time.monotonic()
            received = await asyncio.wait_for(read_all(reader), 10)
            assert received < 10_000_000  # cut off, not the whole answer
            assert time.monotonic() - started < 5
        async with (
            aiohttp.ClientSession() as http,
            http.get(gw.url + path, headers=gw.auth()) as resp,
        ):
            assert resp.status == 200
