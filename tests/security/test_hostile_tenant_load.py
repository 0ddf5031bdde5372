"""A load test on loopback: one hostile tenant cannot make another tenant's calls fail.

The hostile tenant holds half-sent bodies, lists a namespace full of big inputs twenty
at a time, and bursts creates, all at once; meanwhile the other tenant creates, reads,
lists and uploads, and every one of its calls must succeed. Bounded: a few hundred
requests, under a minute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time

import aiohttp

from tests.gateway.conftest import OTHER_TOKEN, TOKEN, Gateway, serve_local
from tests.security.test_tenant_limits import half_sent

BIG_AUDIO = "data:audio/wav;base64," + base64.b64encode(b"\0" * 600_000).decode()
HANG = {"initial_prompt": "stand-in:hang"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def hostile(gw: Gateway, http: aiohttp.ClientSession, stop: asyncio.Event) -> list[int]:
    statuses: list[int] = []
    body = {"version": "whisperx", "input": {"audio_file": BIG_AUDIO, **HANG}}
    for _ in range(6):  # a namespace of big inputs
        async with http.post(gw.url + "/v1/predictions", json=body, headers=auth(TOKEN)) as r:
            statuses.append(r.status)

    async def listing() -> None:
        while not stop.is_set():
            async with http.get(gw.url + "/v1/predictions", headers=auth(TOKEN)) as r:
                await r.read()
                statuses.append(r.status)

    async def create() -> None:
        small = {"version": "whisperx", "input": {"audio_file": "https://e.com/a", **HANG}}
        async with http.post(gw.url + "/v1/predictions", json=small, headers=auth(TOKEN)) as r:
            statuses.append(r.status)

    async with contextlib.AsyncExitStack() as stack:
        for _ in range(60):  # slow bodies: alone nearly all of the gateway's slots
            await stack.enter_async_context(half_sent(gw, TOKEN))
        listers = [asyncio.create_task(listing()) for _ in range(20)]
        await asyncio.gather(*(create() for _ in range(100)))  # a burst of creates
        await stop.wait()
        await asyncio.gather(*listers)
    return statuses


async def victim(gw: Gateway, http: aiohttp.ClientSession) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    for round_ in range(8):
        body = {"version": "whisperx", "input": {"audio_file": "https://e.com/b", **HANG}}
        async with http.post(gw.url + "/v1/predictions", json=body, headers=auth(OTHER_TOKEN)) as r:
            calls.append(("create", r.status))
            created = await r.json()
        if r.status == 201:
            async with http.get(created["urls"]["get"], headers=auth(OTHER_TOKEN)) as r:
                calls.append(("get", r.status))
        async with http.get(gw.url + "/v1/predictions", headers=auth(OTHER_TOKEN)) as r:
            calls.append(("list", r.status))
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("content", b"RIFF" * 100, filename=f"{round_}.wav", content_type="audio/wav")
        async with http.post(gw.url + "/v1/files", data=form, headers=auth(OTHER_TOKEN)) as r:
            calls.append(("upload", r.status))
        await asyncio.sleep(0.1)
    return calls


async def test_one_hostile_tenant_cannot_fail_another_tenants_calls(redis_url: str) -> None:
    started = time.monotonic()
    async with (
        serve_local(redis_url, concurrency=1, max_in_flight=64, max_in_flight_per_token=16) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        stop = asyncio.Event()
        attack = asyncio.create_task(hostile(gw, http, stop))
        await asyncio.sleep(1)  # the attack is under way
        async with asyncio.timeout(45):
            calls = await victim(gw, http)
        stop.set()
        async with asyncio.timeout(30):
            attacked = await attack
    failed = [(name, status) for name, status in calls if status >= 400]
    assert failed == [], failed
    assert len(calls) == 32
    assert 429 in attacked and 500 not in attacked  # the share held the hostile tenant back
    assert time.monotonic() - started < 60
