"""Local mode's backend: predictions kept in Redis, each run by the real runner as a local
process instead of a Kubernetes Job.

Only two things differ from the cluster: where status lives (`LocalSink`, Redis only,
instead of the Prediction's status subresource) and what runs the runner (a subprocess
instead of a Job). The lifecycle is the shared `StatusWriter` (state machine, report
handling, Redis record, webhooks through the same `WebhookSender` outbox), the runner gets
the same environment contract as in a Job, and it reports over the same signed protocol
to an in-process endpoint on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from whisperx_api import lifecycle as lc
from whisperx_api.netguard import HostAllowList
from whisperx_api.records import PredictionRecord
from whisperx_api.reports import MAX_REPORT_BYTES, SIGNATURE_HEADER
from whisperx_api.status_writer import StatusWriter
from whisperx_api.store import Store
from whisperx_api.webhooks import WebhookSender
from whisperx_gateway.backend import NewPrediction

log = logging.getLogger(__name__)

# Predictions local mode accepted and has not finished ("ns/id"): after a crash, the
# next start ends them as Interrupted instead of leaving them `starting` forever.
ACTIVE_KEY = "wx:local:active"
# Gateway secrets the runner must not inherit from local mode's environment.
_PRIVATE_ENV = ("WHISPERX_TOKENS", "WHISPERX_TOKENS_FILE", "WHISPERX_WEBHOOK_SECRET",
                "WHISPERX_REPORT_KEY", "REDIS_URL", "WHISPERX_LOCAL_TOKEN",
                "WHISPERX_FILES_KEY")  # fmt: skip
_OUTPUT_TAIL_LINES = 20
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
    # Where runners' input files are written (they may hold a Hugging Face token): a
    # folder of this process alone, emptied at start of what a crash left; None: a new
    # temporary folder.
    input_dir: Path | None = None


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


def exit_message(code: int) -> str:
    """Why a runner that did not report its end stopped, as the caller sees it: its
    output (internal paths, tracebacks) goes to local mode's log only."""
    if code == 0:
        text = "the runner exited without reporting a result"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        text = f"the runner was killed by {name}"
        if code == -signal.SIGKILL:
            text += " (out of memory?)"
    else:
        text = f"the runner exited with code {code}"
    return text


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
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._processes: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._report_site: web.AppRunner | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self.report_base_url = ""
        self._input_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._input_dir = Path()

    # --- Backend ---

    async def start(self) -> None:
        self._input_dir = self._prepare_input_dir()
        app = web.Application(client_max_size=MAX_REPORT_BYTES)
        app.router.add_post("/reports/{ns}/{id}", self._report)
        self._report_site = web.AppRunner(app, access_log=None)
        await self._report_site.setup()
        site = web.TCPSite(self._report_site, "127.0.0.1", 0)
        await site.start()
        host, port = self._report_site.addresses[0][:2]
        self.report_base_url = f"http://{host}:{port}"
        self._sender_task = asyncio.create_task(self.sender.run(), name="wx-webhooks")
        await self._end_interrupted()

    async def close(self) -> None:
        unfinished = list(self._tasks)
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
        await asyncio.gather(
            *(self._stop(p) for p in list(self._processes.values())), *self._stopping
        )
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if unfinished:
            await self.store.redis.srem(ACTIVE_KEY, *(f"{ns}/{pid}" for ns, pid in unfinished))
        if self._sender_task is not None:
            self._sender_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender_task
        if self._report_site is not None:
            await self._report_site.cleanup()
        if self._input_tmp is not None:
            self._input_tmp.cleanup()

    def _prepare_input_dir(self) -> Path:
        folder = self.settings.input_dir
        if folder is None:
            self._input_tmp = tempfile.TemporaryDirectory(prefix="whisperx-local-")
            return Path(self._input_tmp.name)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        left = [path for path in folder.iterdir() if path.is_file()]
        for path in left:
            path.unlink()
        if left:
            log.warning("removed %d input file(s) a previous run left behind", len(left))
        return folder

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
        key = (new.namespace, new.id)
        self._tasks[key] = asyncio.create_task(
            self._run(record, new.secrets, new.run_deadline_seconds), name=f"wx-run-{new.id}"
        )
        log.info("prediction %s/%s created (%s)", new.namespace, new.id, record.model)
        return record

    async def cancel(self, record: PredictionRecord) -> PredictionRecord:
        ns, pid = record.namespace, record.id
        # The end is recorded first, so the runner's own reports after SIGTERM change
        # nothing and the answer already says `canceled`.
        updated = await self.writer.apply(ns, pid, lc.CancelRequested(at=lc.now_utc()))
        process = self._processes.get((ns, pid))
        if process is not None:
            # SIGTERM now; the SIGKILL after the grace period must not hold the answer.
            stopping = asyncio.create_task(self._stop(process))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
        return updated or record

    async def lookup(self, namespace: str, prediction_id: str) -> PredictionRecord | None:
        # Redis is where local predictions live: a miss there is a miss.
        return None

    # --- runs ---

    async def _run(
        self, record: PredictionRecord, secrets: dict[str, str], deadline: int | None
    ) -> None:
        ns, pid = record.namespace, record.id
        try:
            await self._queue_and_execute(record, secrets, deadline)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Redis unavailable mid-run: the active set still names the prediction, so
            # the next start ends it if nothing else did.
            log.exception("prediction %s/%s: supervising its runner failed", ns, pid)
        else:
            with contextlib.suppress(RedisError, OSError):
                await self.store.redis.srem(ACTIVE_KEY, f"{ns}/{pid}")
        finally:
            self._tasks.pop((ns, pid), None)
            self.writer.forget(ns, pid)

    async def _queue_and_execute(
        self, record: PredictionRecord, secrets: dict[str, str], deadline: int | None
    ) -> None:
        ns, pid = record.namespace, record.id
        if self._slots.locked():
            await self.writer.apply(
                ns,
                pid,
                lc.Queued(
                    reason="WaitingForRunnerSlot",
                    message=f"all {self.settings.concurrency} runner slot(s) are busy",
                    at=lc.now_utc(),
                ),
            )
        async with self._slots:
            current = await self.store.get_record(ns, pid)
            if current is None or current.state.terminal:
                return  # canceled while queued
            if current.state.queued:
                await self.writer.apply(ns, pid, lc.Admitted(at=lc.now_utc()))
            await self._execute(current, secrets, deadline)

    async def _execute(
        self, record: PredictionRecord, secrets: dict[str, str], deadline: int | None
    ) -> None:
        ns, pid = record.namespace, record.id
        input_file = self._write_input(record, secrets)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.runner_command,
                env=self._runner_env(record, input_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # SIGTERM reaches its children (ffmpeg) too
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            input_file.unlink(missing_ok=True)
            await self._fail(ns, pid, "RunnerNotStarted", f"cannot start the runner: {exc}")
            return
        self._processes[(ns, pid)] = process
        log.info("prediction %s/%s: runner started (pid %d)", ns, pid, process.pid)
        tail: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
        assert process.stdout is not None
        pump = asyncio.create_task(_pump(process.stdout, tail, f"{ns}/{pid}"))
        try:
            latest = await self.store.get_record(ns, pid)
            if latest is None or latest.state.terminal:
                await self._stop(process)  # canceled while it was being started
            elif deadline is None:
                await process.wait()
            else:
                try:
                    await asyncio.wait_for(process.wait(), deadline)
                except TimeoutError:
                    await self._fail(
                        ns, pid, "DeadlineExceeded", f"the run took longer than {deadline} s"
                    )
                    await self._stop(process)
            await pump
        finally:
            self._processes.pop((ns, pid), None)
            input_file.unlink(missing_ok=True)
        code = process.returncode if process.returncode is not None else -1
        log.info("prediction %s/%s: runner exited with code %d", ns, pid, code)
        # A no-op when the runner reported its end (the status writer logged it).
        await self._fail(ns, pid, "RunnerExited", exit_message(code))
        if code != 0 and tail:
            log.warning("prediction %s/%s: the runner's last output: %s", ns, pid, " | ".join(tail))

    async def _fail(
        self, namespace: str, prediction_id: str, reason: str, message: str
    ) -> PredictionRecord | None:
        """Ends the prediction as failed unless it has ended already."""
        event = lc.Failed(reason=reason, message=message, at=lc.now_utc())
        return await self.writer.apply(namespace, prediction_id, event)

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.settings.stop_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def _write_input(self, record: PredictionRecord, secrets: dict[str, str]) -> Path:
        """The input for WHISPERX_INPUT_FILE, readable by this user only (it may hold a token)."""
        fd, path = tempfile.mkstemp(suffix=".json", dir=self._input_dir)
        with os.fdopen(fd, "w") as file:  # mkstemp creates it 0600
            json.dump({**record.input, **secrets}, file)
        return Path(path)

    def _runner_env(self, record: PredictionRecord, input_file: Path) -> dict[str, str]:
        """The environment contract of a Job's runner container (docs/architecture.md)."""
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        settings = self.settings
        env.update(
            WHISPERX_INPUT_FILE=str(input_file),
            WHISPERX_REPORT_URL=f"{self.report_base_url}/reports/{record.namespace}/{record.id}",
            WHISPERX_REPORT_TOKEN=self.writer.report_token(record),
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
            ended = await self._fail(
                namespace,
                prediction_id,
                "Interrupted",
                "local mode stopped before the prediction finished; submit it again",
            )
            if ended is not None:
                log.warning("prediction %s/%s interrupted by a restart", namespace, prediction_id)
            await self.store.redis.srem(ACTIVE_KEY, member)

    # --- the report endpoint (the operator's :8081 in a cluster) ---

    async def _report(self, request: web.Request) -> web.Response:
        try:
            result = await self.writer.handle_report(
                request.match_info["ns"],
                request.match_info["id"],
                await request.read(),
                request.headers.get(SIGNATURE_HEADER),
            )
        except (RedisError, OSError) as exc:
            # The runner retries a 503: the report is not lost, and no 500 is logged.
            log.warning("report for %s: Redis unavailable: %s", request.path, exc)
            return web.json_response(
                {"detail": "Redis is unavailable; retry shortly"},
                status=503,
                headers={"Retry-After": "1"},
            )
        return web.json_response(result.body, status=result.http_status)


_LINE_BREAK = re.compile(rb"[\r\n]+")
_MAX_LINE = 4096


async def _pump(stream: asyncio.StreamReader, tail: deque[str], label: str) -> None:
    """Keeps the runner's last output lines (for the error of a crash) and logs them."""
    pending = b""
    while chunk := await stream.read(65536):
        *lines, pending = _LINE_BREAK.split(pending + chunk)
        pending = pending[-_MAX_LINE:]
        for raw in lines:
            line = raw.decode(errors="replace").strip()[:_MAX_LINE]
            if line:
                tail.append(line)
                log.debug("runner %s: %s", label, line)
    if pending.strip():
        tail.append(pending.decode(errors="replace").strip())
