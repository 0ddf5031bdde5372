"""Webhook targets are client-chosen URLs: signed bodies go to public addresses only.

The sender checks the address it connects to (after DNS, so a public-looking name that
resolves to loopback is refused too), does not follow redirects, and the gateway refuses
visibly internal targets at create time. Each namespace signs with its own secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.gateway.conftest import LOOPBACK, OTHER_TOKEN, Gateway, Receiver, completed
from whisperx_api.netguard import AddressRefused, HostAllowList
from whisperx_api.resolver import GuardedResolver
from whisperx_api.store import Store
from whisperx_api.webhooks import (
    WebhookSender,
    allow_list,
    generate_secret,
    signature,
    tenant_secret,
)
from whisperx_gateway.config import GatewayConfig

REBOUND = "hooks.rebound.test"  # a public-looking name whose DNS answer is loopback


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == REBOUND else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@contextlib.asynccontextmanager
async def sending(store: Store, allow: HostAllowList) -> AsyncIterator[WebhookSender]:
    sender = WebhookSender(store, generate_secret(), allow=allow, poll_interval=0.05)
    task = asyncio.create_task(sender.run())
    try:
        yield sender
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def deliver(store: Store, sender: WebhookSender, url: str, event: str = "completed") -> None:
    """Queues a webhook to `url` and waits until the sender is done with it."""
    delivery = await store.enqueue_webhook(
        url=url, body='{"status": "succeeded"}', event=event, namespace="ns", prediction_id="p"
    )
    sender.wake()
    for _ in range(200):
        if not await store.redis.exists(f"wx:wh:d:{delivery}"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"webhook to {url} still pending after 10 s")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", REBOUND])
async def test_internal_targets_get_nothing_and_are_not_retried(
    redis_url: str, receiver: Receiver, rebinding_dns: None, host: str
) -> None:
    url = receiver.url.replace("127.0.0.1", host)
    store = Store.from_url(redis_url)
    try:
        async with sending(store, HostAllowList()) as sender:
            await deliver(store, sender, url)  # dropped at once: a refusal is final
        assert receiver.deliveries == []
    finally:
        await store.close()


async def test_allow_listed_targets_are_delivered(
    redis_url: str, receiver: Receiver, rebinding_dns: None
) -> None:
    store = Store.from_url(redis_url)
    try:
        async with sending(store, LOOPBACK) as sender:
            await deliver(store, sender, receiver.url.replace("127.0.0.1", REBOUND))
        assert len(receiver.deliveries) == 1
    finally:
        await store.close()


async def test_redirects_are_not_followed(redis_url: str, receiver: Receiver) -> None:
    port = free_port()

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(receiver.url)

    app = web.Application()
    app.router.add_post("/hook", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = Store.from_url(redis_url)
    try:
        # Both servers allow-listed: only the redirect itself keeps the body away.
        async with sending(store, LOOPBACK) as sender:
            await deliver(store, sender, f"http://127.0.0.1:{port}/hook", event="start")
        assert receiver.deliveries == []
    finally:
        await store.close()
        await runner.cleanup()


async def test_the_resolver_refuses_names_that_resolve_to_internal_addresses(
    rebinding_dns: None,
) -> None:
    resolver = GuardedResolver(HostAllowList())
    try:
        with pytest.raises(AddressRefused, match=r"resolves to 127\.0\.0\.1, a loopback address"):
            await resolver.resolve(REBOUND, 80)
    finally:
        await resolver.close()


async def test_create_refuses_internal_webhooks_with_422(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    body = {"version": "whisperx", "input": {"audio_file": "https://example.com/a.wav"}}
    for url in ("http://169.254.169.254/latest", "http://localhost:6379/", "http://10.0.0.1/"):
        gateway.config.webhook_allow_hosts = HostAllowList()
        async with http.post(
            gateway.url + "/v1/predictions", json={**body, "webhook": url}, headers=gateway.auth()
        ) as resp:
            problem = await resp.json()
        assert resp.status == 422 and problem["detail"].startswith("webhook: "), problem


async def test_each_tenant_has_its_own_signing_secret(
    gateway: Gateway, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    secrets = {}
    for token in (gateway.token, OTHER_TOKEN):
        async with http.get(
            gateway.url + "/v1/webhooks/default/secret", headers=gateway.auth(token)
        ) as resp:
            secrets[token] = (await resp.json())["key"]
    assert secrets[gateway.token] != secrets[OTHER_TOKEN]
    assert all(s.startswith("whsec_") for s in secrets.values())
    body = {
        "version": "whisperx",
        "input": {"audio_file": "https://example.com/a.wav"},
        "webhook": receiver.url,
    }
    async with http.post(gateway.url + "/v1/predictions", json=body, headers=gateway.auth()):
        pass
    await receiver.wait_for(completed)
    headers, payload = receiver.deliveries[-1]
    signed = (headers["webhook-id"], int(headers["webhook-timestamp"]), payload)
    assert headers["webhook-signature"] == signature(secrets[gateway.token], *signed)
    assert headers["webhook-signature"] != signature(secrets[OTHER_TOKEN], *signed)
    assert gateway.config.webhook_secret is not None
    assert secrets[gateway.token] == tenant_secret(gateway.config.webhook_secret, "alpha")


def test_the_allow_list_setting_reaches_the_gateway() -> None:
    env = {
        "WHISPERX_TOKENS": "token-alpha-0001=alpha",
        "WHISPERX_WEBHOOK_ALLOW_HOSTS": "10.0.0.0/8",
    }
    config = GatewayConfig.from_env(env)
    assert config.webhook_allow_hosts == allow_list(env) == HostAllowList.parse("10.0.0.0/8")
