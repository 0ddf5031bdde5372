"""A gateway served over real HTTP on loopback, with a real Redis.

Most tests here use local mode's backend with the stand-in runner (`fake_runner.py`,
same environment and report contract as `whisperx-runner run`), so the HTTP API, the
lifecycle and webhooks are exercised end to end in seconds. The real runner runs in
tests/local; the Kubernetes backend in test_kube_backend.py.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from whisperx_api.store import Store
from whisperx_api.webhooks import generate_secret
from whisperx_gateway.app import create_app
from whisperx_gateway.auth import TokenMap
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.local_backend import LocalBackend, LocalSettings

STAND_IN_RUNNER = [sys.executable, str(Path(__file__).with_name("fake_runner.py"))]
TOKEN = "token-alpha-0001"
OTHER_TOKEN = "token-beta-00002"
TOKENS = {TOKEN: "alpha", OTHER_TOKEN: "beta"}


@dataclass
class Gateway:
    url: str
    store: Store
    backend: LocalBackend
    config: GatewayConfig
    token: str = TOKEN
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


@contextlib.asynccontextmanager
async def serve_local(
    redis_url: str,
    *,
    runner: Sequence[str] = STAND_IN_RUNNER,
    concurrency: int = 2,
    stop_grace: float = 5.0,
    **config: Any,
) -> AsyncIterator[Gateway]:
    """The gateway app with local mode's backend, listening on a free loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret = generate_secret()
    gateway_config = GatewayConfig(
        tokens=TokenMap.from_mapping(TOKENS),
        redis_url=redis_url,
        public_url=url,
        webhook_secret=secret,
        **config,
    )
    store = Store.from_url(redis_url)
    backend = LocalBackend(
        store,
        LocalSettings(
            runner_command=runner,
            model="tiny.en",
            concurrency=concurrency,
            stop_grace=stop_grace,
            allow_hosts="127.0.0.1",
        ),
        report_key=b"test-report-key",
        webhook_secret=secret,
        public_url=url,
    )
    runner_ = web.AppRunner(create_app(gateway_config, store, backend))
    await runner_.setup()
    try:
        await web.TCPSite(runner_, "127.0.0.1", port).start()
        inspect = Store.from_url(redis_url)
        try:
            yield Gateway(url=url, store=inspect, backend=backend, config=gateway_config)
        finally:
            await inspect.close()
    finally:
        await runner_.cleanup()


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[Gateway]:
    async with serve_local(redis_url) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session


WEBHOOK_EVENTS_ALL = ("start", "output", "logs", "completed")
