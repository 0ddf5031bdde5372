"""A gateway served over real HTTP on loopback, with a real Redis.

Most tests here use local mode's backend with the stand-in runner (`fake_runner.py`,
same environment and report contract as `whisperx-runner run`), so the HTTP API, the
lifecycle and webhooks are exercised end to end in seconds. The real runner runs in
tests/local; the Kubernetes backend in test_kube_backend.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from whisperx_api.netguard import HostAllowList
from whisperx_api.store import Store
from whisperx_api.webhooks import generate_secret
from whisperx_gateway.app import create_app
from whisperx_gateway.auth import TokenMap
from whisperx_gateway.backend import Backend
from whisperx_gateway.config import GatewayConfig
from whisperx_gateway.local_backend import LocalBackend, LocalSettings

STAND_IN_RUNNER = [sys.executable, str(Path(__file__).with_name("fake_runner.py"))]
TOKEN = "token-alpha-0001"
OTHER_TOKEN = "token-beta-00002"
TOKENS = {TOKEN: "alpha", OTHER_TOKEN: "beta"}
# The tests' webhook receivers listen on loopback, an internal address.
LOOPBACK = HostAllowList.parse("127.0.0.1")


@dataclass
class Gateway:
    url: str
    store: Store
    backend: Any
    config: GatewayConfig
    token: str = TOKEN

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


@contextlib.asynccontextmanager
async def serve(
    redis_url: str,
    make_backend: Callable[[Store, str, str], Backend],
    *,
    port: int | None = None,
    **config: Any,
) -> AsyncIterator[Gateway]:
    """The gateway app on a free loopback port; `make_backend(store, url, secret)`."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    config.setdefault("webhook_secret", generate_secret())
    config.setdefault("files_key", b"test-files-key")
    config.setdefault("webhook_allow_hosts", LOOPBACK)
    gateway_config = GatewayConfig(
        tokens=TokenMap.from_mapping(TOKENS), redis_url=redis_url, public_url=url, **config
    )
    store = Store.from_url(redis_url, gateway_config.redis_pool_size)
    backend = make_backend(store, url, gateway_config.webhook_secret or "")
    runner = web.AppRunner(create_app(gateway_config, store, backend))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        inspect = Store.from_url(redis_url)
        try:
            yield Gateway(url=url, store=inspect, backend=backend, config=gateway_config)
        finally:
            await inspect.close()
    finally:
        await stop_within(runner, 60)


def runner_processes(gw: Gateway) -> list[asyncio.subprocess.Process]:
    """Local mode's runner processes now."""
    return [runner.process for runner in gw.backend.runners._runners.values()]


def process_holding(gw: Gateway, prediction_id: str) -> asyncio.subprocess.Process:
    """The runner process holding this prediction."""
    process: asyncio.subprocess.Process
    (process,) = [
        runner.process
        for runner in gw.backend.runners._runners.values()
        if runner.holding is not None and runner.holding[1] == prediction_id
    ]
    return process


async def stop_within(runner: web.AppRunner, seconds: float) -> None:
    """Stops the app, or fails naming what each task was waiting on."""
    try:
        await asyncio.wait_for(runner.cleanup(), seconds)
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        pytest.fail(f"the gateway did not stop within {seconds} s; tasks:\n{stacks.getvalue()}")


def serve_local(
    redis_url: str,
    *,
    runner: Sequence[str] = STAND_IN_RUNNER,
    concurrency: int = 2,
    stop_grace: float = 5.0,
    idle_seconds: float = 300.0,
    max_predictions: int = 0,
    **config: Any,
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """The gateway with local mode's backend running `runner`."""

    def make_backend(store: Store, url: str, secret: str) -> LocalBackend:
        settings = LocalSettings(
            runner_command=runner,
            model="tiny.en",
            concurrency=concurrency,
            stop_grace=stop_grace,
            idle_seconds=idle_seconds,
            max_predictions=max_predictions,
            allow_hosts="127.0.0.1",
            webhook_allow_hosts=LOOPBACK,
        )
        return LocalBackend(
            store, settings, report_key=b"test-report-key", webhook_secret=secret, public_url=url
        )

    return serve(redis_url, make_backend, **config)


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[Gateway]:
    async with serve_local(redis_url) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session


T = TypeVar("T")


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass
class Receiver:
    """A client's webhook endpoint on loopback: records what arrives."""

    url: str
    deliveries: list[tuple[dict[str, str], str]] = field(default_factory=list)
    # Status codes to answer, in order, before answering 200.
    failures: list[int] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.deliveries]

    async def wait_for(self, predicate: Callable[[Receiver], bool], seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"webhooks received: {self.bodies()}"
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/hook")

    async def hook(request: web.Request) -> web.Response:
        if state.failures:
            return web.Response(status=state.failures.pop(0))
        state.deliveries.append((dict(request.headers), await request.text()))
        state.arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


def completed(r: Receiver) -> bool:
    return any(b["status"] in ("succeeded", "failed", "canceled") for b in r.bodies())


# --- local mode as a process (`whisperx-local`) ---

WHISPERX_LOCAL = str(Path(sys.executable).with_name("whisperx-local"))


@dataclass
class LocalMode:
    url: str
    token: str
    process: asyncio.subprocess.Process
    log_path: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def local_mode(
    log_path: Path, *args: str, env: dict[str, str] | None = None, ready_within: float = 30
) -> AsyncIterator[LocalMode]:
    """`whisperx-local --port <free> ARGS...` with its token in the environment, stopped
    with SIGTERM. Its data folder is `local-data` beside the log unless ARGS name one
    (a second local mode of the same test is a restart on the same data)."""
    port, token = free_port(), "local-token-0123"
    if "--data-dir" not in args:
        args = (*args, "--data-dir", str(log_path.parent / "local-data"))
    environment = {
        **(os.environ if env is None else env),
        "WHISPERX_LOCAL_TOKEN": token,
        # The tests' webhook receivers listen on loopback.
        "WHISPERX_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    }
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            WHISPERX_LOCAL, "--port", str(port), *args,
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=environment,
        )  # fmt: skip
    mode = LocalMode(f"http://127.0.0.1:{port}", token, process, log_path)
    try:
        deadline = time.monotonic() + ready_within
        async with aiohttp.ClientSession() as http:
            while True:
                assert process.returncode is None, f"whisperx-local exited:\n{mode.log()}"
                assert time.monotonic() < deadline, f"whisperx-local not ready:\n{mode.log()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(mode.url + "/ready") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield mode
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
