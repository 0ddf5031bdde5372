"""Local mode's backend: predictions kept in Redis, run by the real runner as warm local
processes (`LocalRunners`) instead of Kubernetes Jobs.

Only two things differ from the cluster: where status lives (`LocalSink`, Redis only,
instead of the Prediction's status subresource) and what runs the runner (processes
instead of Jobs). The lifecycle is the shared `StatusWriter` (state machine, report
handling, Redis record, webhooks through the same `WebhookSender` outbox), and runners
ask for work and report over the same runner endpoint as the operator's
(`whisperx_api.runner_endpoint`), here on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web
from redis.exceptions import RedisError

from whisperx_api import lifecycle as lc
from whisperx_api.netguard import HostAllowList
from whisperx_api.records import PredictionRecord
from whisperx_api.runner_endpoint import runner_app
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.webhooks import WebhookSender
from whisperx_gateway.backend import NewPrediction
from whisperx_gateway.local_runners import LocalRunners, RunnerLimits

log = logging.getLogger(__name__)

# Predictions local mode accepted and has not finished ("ns/id"): after a crash, the
# next start ends them as Interrupted instead of leaving them `starting` forever.
ACTIVE_KEY = "wx:local:active"
# Gateway secrets the runner must not inherit from local mode's environment.
_PRIVATE_ENV = ("WHISPERX_TOKENS", "WHISPERX_TOKENS_FILE", "WHISPERX_WEBHOOK_SECRET",
                "WHISPERX_REPORT_KEY", "REDIS_URL", "WHISPERX_LOCAL_TOKEN",
                "WHISPERX_FILES_KEY")  # fmt: skip
DEFAULT_IDLE_SECONDS = 300.0
RUNNER_MEMORY_BYTES = 2 << 30  # whisperx + alignment + diarization on CPU peak near 2 GB


def default_concurrency() -> int:
    """Runner processes the machine can hold: one per 2 cores and per 2 GiB of memory."""
    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(cores // 2, memory // RUNNER_MEMORY_BYTES))


@dataclass
class LocalSettings:
    runner_command: Sequence[str]
    # WHISPERX_MODEL for the runner: a model name in the model dir, or a model folder.
    model: str
    model_dir: str | None = None
    device: str = "cpu"
    compute_type: str = "int8"
    concurrency: int = field(default_factory=default_concurrency)
    # WHISPERX_ALLOW_HOSTS for the runner, e.g. loopback so local audio URLs work.
    allow_hosts: str | None = None
    # Internal hosts client webhooks may reach (WHISPERX_WEBHOOK_ALLOW_HOSTS).
    webhook_allow_hosts: HostAllowList = field(default_factory=HostAllowList)
    # Seconds a runner gets to exit after SIGTERM before SIGKILL.
    stop_grace: float = 10.0
    # How long a runner with its model loaded waits for the next prediction before it
    # exits (0: one prediction per runner), and the most one serves (0: no limit).
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    max_predictions: int = 0


class LocalSink:
    """Status kept in Redis only: the record the StatusWriter stores is the status.

    `save` has nothing to do: the writer stores that record right after calling it (in
    the cluster, this is where the Prediction's status subresource is patched).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        return await self.store.get_record(namespace, prediction_id)

    async def save(self, record: PredictionRecord) -> None:
        return None


_PR_SET_PDEATHSIG = 1


# Resolved here, in the parent: loading a library between fork and exec can deadlock on
# a loader lock another thread held at fork time.
_prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def die_with_parent() -> None:
    """In the runner, before exec: SIGKILL it should local mode itself die (even by
    SIGKILL), instead of leaving it transcribing outside any concurrency limit with
    nobody to report to. Linux only; elsewhere the next start still ends the
    prediction as Interrupted."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalBackend:
    def __init__(
        self,
        store: Store,
        settings: LocalSettings,
        *,
        report_key: bytes,
        webhook_secret: str,
        public_url: str,
    ) -> None:
        self.store = store
        self.settings = settings
        self.sender = WebhookSender(store, webhook_secret, allow=settings.webhook_allow_hosts)
        self.writer = StatusWriter(
            store=store,
            sink=LocalSink(store),
            report_key=report_key,
            public_url=public_url,
            webhooks=self.sender,
        )
        self.runners = LocalRunners(
            settings.runner_command,
            self._runner_env,
            RunnerLimits(
                max_runners=settings.concurrency,
                idle_seconds=settings.idle_seconds,
                max_predictions=settings.max_predictions,
            ),
            store=store,
            writer=self.writer,
            on_done=self._done,
            stop_grace=settings.stop_grace,
            preexec=die_with_parent,
        )
        self._endpoint: web.AppRunner | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self.report_base_url = ""

    # --- Backend ---

    async def start(self) -> None:
        app = runner_app(self.writer, self.store, work=self.runners)
        self._endpoint = web.AppRunner(app, access_log=None)
        await self._endpoint.setup()
        site = web.TCPSite(self._endpoint, "127.0.0.1", 0)
        await site.start()
        host, port = self._endpoint.addresses[0][:2]
        self.report_base_url = self.runners.base_url = f"http://{host}:{port}"
        self._sender_task = asyncio.create_task(self.sender.run(), name="wx-webhooks")
        await self._end_interrupted()

    async def close(self) -> None:
        unfinished = self.runners.unfinished()
        for namespace, prediction_id in unfinished:
            await self.writer.apply(
                namespace,
                prediction_id,
                lc.Failed(
                    reason="Interrupted",
                    message="local mode stopped before the prediction finished",
                    at=lc.now_utc(),
                ),
            )
        await self.runners.close()
        if unfinished:
            await self.store.redis.srem(ACTIVE_KEY, *(f"{ns}/{pid}" for ns, pid in unfinished))
        if self._sender_task is not None:
            self._sender_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender_task
        if self._endpoint is not None:
            await self._endpoint.cleanup()

    def metric_lines(self) -> list[str]:
        return self.runners.metrics.render()

    async def create(self, new: NewPrediction) -> PredictionRecord:
        record = PredictionRecord(
            id=new.id,
            namespace=new.namespace,
            uid=uuid.uuid4().hex,
            input=new.input,
            state=lc.apply(lc.PredictionState(), lc.Created(at=lc.now_utc())).state,
            model=new.model.full_name,
            version=new.model.version,
            hardware=new.model.hardware,
            webhook=new.webhook,
            webhook_events_filter=new.webhook_events_filter,
        )
        # Marked active before the record exists, so a crash in between leaves no
        # prediction that nothing will ever end.
        await self.store.redis.sadd(ACTIVE_KEY, f"{new.namespace}/{new.id}")
        await self.writer.publish(record)
        await self.runners.submit(record, new.secrets, new.run_deadline_seconds)
        log.info("prediction %s/%s created (%s)", new.namespace, new.id, record.model)
        return record

    async def cancel(self, record: PredictionRecord) -> PredictionRecord:
        ns, pid = record.namespace, record.id
        # The end is recorded first, so the runner's own reports after SIGTERM change
        # nothing and the answer already says `canceled`.
        updated = await self.writer.apply(ns, pid, lc.CancelRequested(at=lc.now_utc()))
        await self.runners.cancel(ns, pid)
        return updated or record

    async def lookup(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        # Redis is where local predictions live: a miss there is a miss.
        return None

    # --- runs ---

    async def _done(self, namespace: str, prediction_id: str) -> None:
        """A prediction has left the runners (ended, or canceled while queued)."""
        self.writer.forget(namespace, prediction_id)
        with contextlib.suppress(RedisError, OSError):
            await self.store.redis.srem(ACTIVE_KEY, f"{namespace}/{prediction_id}")

    def _runner_env(self) -> dict[str, str]:
        """The environment contract of a runner (docs/architecture.md), but for the
        prediction: that comes with each assignment."""
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        settings = self.settings
        env.update(
            WHISPERX_MODEL=settings.model,
            WHISPERX_DEVICE=settings.device,
            WHISPERX_COMPUTE_TYPE=settings.compute_type,
            PYANNOTE_METRICS_ENABLED="false",
        )
        # Concurrent runners share the cores instead of each taking all of them.
        cores = len(os.sched_getaffinity(0))
        env.setdefault("WHISPERX_CPU_THREADS", str(max(1, cores // settings.concurrency)))
        if settings.model_dir:
            env["WHISPERX_MODEL_DIR"] = settings.model_dir
        if settings.allow_hosts:
            env["WHISPERX_ALLOW_HOSTS"] = settings.allow_hosts
        return env

    async def _end_interrupted(self) -> None:
        """Ends what a previous local mode process accepted but never finished."""
        for member in await self.store.redis.smembers(ACTIVE_KEY):
            namespace, _, prediction_id = str(member).partition("/")
            ended = await self.writer.apply(
                namespace,
                prediction_id,
                lc.Failed(
                    reason="Interrupted",
                    message="local mode stopped before the prediction finished; submit it again",
                    at=lc.now_utc(),
                ),
            )
            if ended is not None:
                log.warning("prediction %s/%s interrupted by a restart", namespace, prediction_id)
            await self.store.redis.srem(ACTIVE_KEY, member)
