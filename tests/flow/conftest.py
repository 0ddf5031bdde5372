"""The whole flow, as users run it, and the faults it must survive.

The cluster path: kmock's emulated API server, the real `whisperx-operator` (a child
process that can be SIGKILLed), the fake kubelet running each Job's own command and
environment, and the real `whisperx-gateway` (a child process too, so it can die in the
middle of a request). The official `replicate` client talks to the gateway; a loopback
receiver takes the client webhooks and records every delivery attempt.

The real runner runs in its Job as the kind overlay configures it: the shipped CPU
profiles (manifests/overlays/kind/profiles.yaml: tiny.en, int8), the model cache PVC
mapped to the runner tests' model directory (tiny.en's random-weight English aligner
and NLTK data; tiny.en itself comes from its package), loopback audio allowed through
`WHISPERX_RUNNER_ENV`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from replicate.client import Client
from replicate.webhook import Webhooks

from tests.cluster.fixtures import RealKube, node_agent_for, service_account_kubeconfig
from tests.conftest import REPO_ROOT, free_port
from tests.kube_fixtures import (  # noqa: F401  (kube: a fixture)
    AnyKubelet,
    ChildProcess,
    Emulator,
    Kubelet,
    OperatorProcess,
    emulator_url,
    kube,
    kube_plane,
    operator_environment,
    running_operator,
    wait_for,
)
from tests.runner.conftest import model_dir  # noqa: F401  (tiny.en's aligner folder)
from whisperx_api.records import PredictionRecord
from whisperx_api.store import Store

NS = "default"
TOKEN = "flow-token-0001"
REAL_RUNNER = [str(Path(sys.executable).with_name("whisperx-runner")), "run"]
KIND_PROFILES = REPO_ROOT / "manifests" / "overlays" / "kind" / "profiles.yaml"
MODEL_PVC = "whisperx-models"
GATEWAY_BIN = str(Path(sys.executable).with_name("whisperx-gateway"))
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
FOX_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


# --- espeak-ng speech over loopback HTTP ---


@dataclass
class AudioSource:
    url: str
    duration: float


@pytest.fixture(scope="session")
def fox_audio(fox_wav: Path) -> tuple[bytes, float]:
    """fox.wav's bytes and its duration in seconds."""
    with wave.open(str(fox_wav)) as wav:
        duration = wav.getnframes() / wav.getframerate()
    return fox_wav.read_bytes(), duration


@pytest.fixture
async def fox_url(fox_audio: tuple[bytes, float]) -> AsyncIterator[AudioSource]:
    """fox.wav on a loopback URL (the runner fetches it as it would any audio URL)."""
    data, duration = fox_audio

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=data, content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/fox.wav", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield AudioSource(f"http://127.0.0.1:{port}/fox.wav", duration)
    await runner.cleanup()


def stems(words: list[str]) -> list[str]:
    """Lowercase words without punctuation or a plural/verb `s`: tiny.en may hear
    "jumps" as "jump"."""
    return [re.sub(r"[^a-z']", "", w.lower()).removesuffix("s") for w in words]


def assert_fox_transcript(output: dict[str, Any], duration: float) -> None:
    """The right words, each with a timing inside the audio, in order."""
    assert output["detected_language"] == "en"
    segments = output["segments"]
    words = [w for s in segments for w in s["words"]]
    assert stems([w["word"] for w in words]) == stems(FOX_WORDS), words
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    for word in words:
        assert 0 <= word["start"] <= word["end"] <= duration + 0.1, word
    for segment in segments:
        assert 0 <= segment["start"] <= segment["end"] <= duration + 0.1, segment


# --- the client's webhook endpoint ---


@dataclass
class Delivery:
    headers: dict[str, str]
    body: str
    answered: int

    @property
    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class HookReceiver:
    """Records every delivery attempt and what it answered; refuses while `refusing`."""

    url: str
    attempts: list[Delivery] = field(default_factory=list)
    refusing: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def accepted(self, prediction_id: str) -> list[Delivery]:
        return [d for d in self.attempts if d.answered < 300 and d.data["id"] == prediction_id]

    def terminal(self, prediction_id: str) -> list[Delivery]:
        return [d for d in self.accepted(prediction_id) if d.data["status"] in TERMINAL]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            remaining = deadline - time.monotonic()
            assert remaining > 0, [(d.answered, d.body[:200]) for d in self.attempts]
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    async def terminal_once(
        self, prediction_id: str, status: str, *, settle: float = 1.5
    ) -> Delivery:
        """The one accepted terminal delivery, after waiting for any duplicate."""
        await self.wait_for(lambda: bool(self.terminal(prediction_id)))
        await asyncio.sleep(settle)  # a duplicate would be sent right away
        (delivery,) = self.terminal(prediction_id)
        assert delivery.data["status"] == status, delivery.body[:500]
        # The protocol (Standard Webhooks): one message id per message, kept on retries.
        attempts = [
            d
            for d in self.attempts
            if d.data["id"] == prediction_id and d.data["status"] in TERMINAL
        ]
        assert {d.webhook_id for d in attempts} == {delivery.webhook_id}
        return delivery

    def validate_all(self, secret: Any) -> None:
        for delivery in self.attempts:
            Webhooks.validate(
                headers=delivery.headers, body=delivery.body, secret=secret, tolerance=120
            )


@pytest.fixture
async def hooks() -> AsyncIterator[HookReceiver]:
    port = free_port()
    receiver = HookReceiver(url=f"http://127.0.0.1:{port}/hook")

    async def hook(request: web.Request) -> web.Response:
        answered = 503 if receiver.refusing else 204
        receiver.attempts.append(Delivery(dict(request.headers), await request.text(), answered))
        receiver.arrived.set()
        return web.Response(status=answered)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver
    await runner.cleanup()


async def pending_deliveries(redis_url: str, prediction_id: str) -> list[dict[str, str]]:
    """The webhook outbox entries of one prediction (wx:wh:d:*), as Redis holds them."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        found = []
        for key in await client.keys("wx:wh:d:*"):
            data = {str(k): str(v) for k, v in (await client.hgetall(key)).items()}
            if data.get("id") == prediction_id:
                found.append({**data, "key": str(key)})
        return found
    finally:
        await client.aclose()


async def stored_record(redis_url: str, prediction_id: str) -> PredictionRecord | None:
    """The Replicate-facing record the status writer keeps in Redis."""
    store = Store.from_url(redis_url)
    try:
        return await store.get_record(NS, prediction_id)
    finally:
        await store.close()


# --- the gateway as a process ---


async def waiting_requests(gateway_url: str) -> float:
    """Requests held open by `Prefer: wait`, from the gateway's own metrics."""
    async with aiohttp.ClientSession() as http, http.get(gateway_url + "/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^whisperx_gateway_waiting_requests (\S+)$", text, re.M)
    assert found, text
    return float(found[1])


@dataclass
class GatewayProcess(ChildProcess):
    """`whisperx-gateway` (Kubernetes backend) on a fixed loopback port."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['WHISPERX_GATEWAY_PORT']}"

    def spawn(self) -> None:
        assert self.process is None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [GATEWAY_BIN], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    async def start(self, within: float = 30) -> None:
        """Spawns it and waits until it is ready (Redis reachable, events subscribed)."""
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process.poll() is None, f"gateway exited:\n{self.log()}"
                assert time.monotonic() < deadline, f"gateway not ready:\n{self.log()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/ready") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)

    async def waiting_requests(self) -> float:
        return await waiting_requests(self.url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- the cluster ---

RunnerKind = Literal["real", "stand-in"]


@dataclass
class Cluster:
    kube: Emulator
    kubelet: Kubelet
    operator: OperatorProcess
    gateway: GatewayProcess
    redis_url: str

    def client(self) -> Client:
        return Client(api_token=TOKEN, base_url=self.gateway.url)


@contextlib.asynccontextmanager
async def cluster(
    kube: Emulator,  # noqa: F811
    redis_url: str,
    workdir: Path,
    *,
    runner: RunnerKind,
    models: Path | None = None,
) -> AsyncIterator[Cluster]:
    gateway_url = f"http://127.0.0.1:{free_port()}"
    overrides = {"WHISPERX_PUBLIC_URL": gateway_url}  # webhook bodies carry gateway URLs
    host_volumes = {}
    if runner == "real":
        assert models is not None
        overrides.update(
            WHISPERX_RUNNER_COMMAND=json.dumps(REAL_RUNNER),
            WHISPERX_PROFILES_FILE=str(KIND_PROFILES),
            WHISPERX_MODEL_CACHE_PVC=MODEL_PVC,
            WHISPERX_RUNNER_ENV=json.dumps(
                {"WHISPERX_ALLOW_HOSTS": "127.0.0.1", "PYANNOTE_METRICS_ENABLED": "false"}
            ),
        )
        host_volumes[MODEL_PVC] = models
    # else: operator_environment's default command, tests/operator/fake_runner.py.
    env = operator_environment(kube, redis_url, workdir, **overrides)
    if isinstance(kube, RealKube):
        # Its own ServiceAccount's token: the manifests' Role authorizes its calls.
        kubeconfig = service_account_kubeconfig(
            kube.plane, "whisperx-gateway", workdir / "gateway.kubeconfig"
        )
        api = {"KUBECONFIG": str(kubeconfig)}
    else:
        api = {"WHISPERX_KUBE_SERVER": emulator_url(kube)}
    gateway = GatewayProcess(
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(workdir),
            "REDIS_URL": redis_url,
            "WHISPERX_TOKENS": f"{TOKEN}={NS}",
            **api,
            "WHISPERX_GATEWAY_HOST": "127.0.0.1",
            "WHISPERX_GATEWAY_PORT": gateway_url.rsplit(":", 1)[1],
            "WHISPERX_PUBLIC_URL": gateway_url,
            # Uploads (/v1/files), fetched by runners from where they reach the gateway.
            "WHISPERX_FILES_KEY": "flow-files-key-0123456789abcdef",
            "WHISPERX_INTERNAL_URL": gateway_url,
            # The operator signs webhooks; the gateway hands the same secret to clients.
            "WHISPERX_WEBHOOK_SECRET": env["WHISPERX_WEBHOOK_SECRET"],
            "WHISPERX_WEBHOOK_ALLOW_HOSTS": env["WHISPERX_WEBHOOK_ALLOW_HOSTS"],
            "PYTHONUNBUFFERED": "1",
        },
        log_path=workdir / "gateway.log",
    )
    if isinstance(kube, RealKube):
        # The claim is bound to the cluster's model folder (the `aligner` fixture's).
        node: contextlib.AbstractAsyncContextManager[AnyKubelet] = node_agent_for(
            kube, workdir / "kubelet"
        )
    else:
        node = Kubelet(kube, workdir / "kubelet", host_volumes=host_volumes)
    async with node as kubelet, running_operator(kube, env, workdir / "operator.log") as operator:
        await gateway.start()
        try:
            yield Cluster(kube, kubelet, operator, gateway, redis_url)
        finally:
            await gateway.stop()
            print(f"--- operator log (tail) ---\n{operator.log_tail(80)}")
            print(f"--- gateway log ---\n{gateway.log()[-4000:]}")


@pytest.fixture
async def real_cluster(
    kube: Emulator,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    if isinstance(kube, RealKube):
        request.getfixturevalue("aligner")  # the aligner in the cluster's model cache
    async with cluster(kube, redis_url, tmp_path, runner="real", models=model_dir) as c:
        yield c


@pytest.fixture
async def stand_in_cluster(
    kube: Emulator,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with cluster(kube, redis_url, tmp_path, runner="stand-in") as c:
        yield c


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The official client is synchronous: off the loop that serves the emulator."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def kill_process_group(pid: int) -> None:
    """SIGKILL a runner and whatever it started (ffmpeg): its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- local mode (`whisperx-local`) ---

# The cluster's stand-in works in local mode too (same environment and report contract),
# and retries its reports as the real runner does, so a Redis outage is survivable.
STAND_IN_COMMAND = f"{sys.executable} {REPO_ROOT / 'tests' / 'operator' / 'fake_runner.py'}"


async def local_runner_pid(log: Callable[[], str], prediction_id: str) -> int:
    """The pid of a prediction's runner, from whisperx-local's log."""
    pattern = re.compile(rf"prediction {NS}/{prediction_id}: on runner \w+ \(pid (\d+)")

    def started() -> int | None:
        found = pattern.search(log())
        return int(found[1]) if found else None

    pid: int = await wait_for(started, within=30)
    return pid


async def wait_for_status(
    client: Client, prediction_id: str, statuses: set[str], within: float = 60
) -> Any:
    """The prediction, as the client reads it, once its status is one of `statuses`."""

    async def reached() -> Any:
        prediction = await call(client.predictions.get, prediction_id)
        return prediction if prediction.status in statuses else None

    return await wait_for(reached, within=within, interval=0.2)
